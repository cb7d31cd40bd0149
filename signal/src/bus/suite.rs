//! The behaviour every bus backend must show, run against each one by its
//! tests (the Redis one on the test Redis of `scripts/test.sh`).

use std::sync::Arc;

use super::{Bus, Creation, JoinOutcome};
use crate::hub::{Hub, Mailbox, Outbound, close};
use crate::room::tests::{member, record};
use crate::room::{Admission, Refusal, RoomRecord};

fn room(tenant: &str, id: &str, public: bool, named: bool) -> RoomRecord {
    let mut r = record(3, false);
    r.tenant = tenant.into();
    r.id = id.into();
    r.public = public;
    r.named = named;
    r.expires_at = floe_proto::time::unix_now() + 600;
    r
}

/// Rooms: global ids, per-tenant names, limits counted per kind, listing
/// and deletion.
pub async fn rooms(bus: &dyn Bus, tenant: &str) {
    let now = floe_proto::time::unix_now();
    let other = format!("{tenant}-other");
    let public = room(tenant, &format!("{tenant}g1"), true, false);
    assert_eq!(
        bus.create_room(&public, Some(1), now)
            .await
            .expect("create"),
        Creation::Done
    );
    assert_eq!(
        bus.resolve(&public.id).await.expect("resolve").as_deref(),
        Some(tenant)
    );
    // A second public room is over the public limit of 1 ...
    let public2 = room(tenant, &format!("{tenant}g2"), true, false);
    assert_eq!(
        bus.create_room(&public2, Some(1), now)
            .await
            .expect("create"),
        Creation::TenantFull
    );
    // ... which token rooms do not count against, nor the reverse.
    let named = room(tenant, "standup", false, true);
    assert_eq!(
        bus.create_room(&named, Some(1), now).await.expect("create"),
        Creation::Done
    );
    // Names are per tenant; server-chosen ids are global.
    let theirs = room(&other, "standup", false, true);
    assert_eq!(
        bus.create_room(&theirs, Some(1), now)
            .await
            .expect("create"),
        Creation::Done
    );
    assert_eq!(
        bus.create_room(&named, None, now).await.expect("create"),
        Creation::Exists
    );
    let clash = room(&other, &public.id, true, false);
    assert_eq!(
        bus.create_room(&clash, None, now).await.expect("create"),
        Creation::Exists
    );
    assert_eq!(bus.resolve("standup").await.expect("resolve"), None);
    assert_eq!(
        bus.room(&named.key()).await.expect("room"),
        Some(named.clone())
    );

    let listed: Vec<String> = bus
        .rooms(tenant, now)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut expected = vec![public.id.clone(), "standup".to_owned()];
    expected.sort();
    assert_eq!(listed, expected);

    assert!(bus.delete_room(&public, "deleted").await.expect("delete"));
    assert!(!bus.delete_room(&public, "deleted").await.expect("delete"));
    assert_eq!(bus.resolve(&public.id).await.expect("resolve"), None);
    assert_eq!(
        bus.create_room(&public2, Some(1), now)
            .await
            .expect("create"),
        Creation::Done,
        "deleting freed the public slot"
    );
}

/// Joins: capacity, replacement only with the reconnect secret (or a
/// token), one-time pairs, leaving, and delivery of presence.
pub async fn joins(bus: &dyn Bus, hub: &Hub, tenant: &str) {
    let now = floe_proto::time::unix_now();
    let r = room(tenant, &format!("{tenant}j"), true, false);
    bus.create_room(&r, None, now).await.expect("create");
    let key = r.key();
    let (a, b) = (member("a", "s1"), member("b", "s2"));
    let (ma, mb) = (Mailbox::new(), Mailbox::new());
    // Registered in the hub once admitted, then announced, as a
    // connection does (a Redis resync writes back what the hub holds).
    assert!(matches!(
        bus.join(&r, &a, false, now).await.expect("join"),
        JoinOutcome::Admitted {
            admission: Admission::Joined,
            ..
        }
    ));
    hub.register(r.clone(), &a, None, ma.clone());
    match bus.join(&r, &b, false, now).await.expect("join") {
        JoinOutcome::Admitted { peers, admission } => {
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].peer_id, "a");
            hub.register(r.clone(), &b, None, mb.clone());
            bus.announce(&r, &b, &admission).await.expect("announce");
        }
        other => panic!("unexpected {other:?}"),
    }
    let got = ma.try_next();
    assert!(
        matches!(&got, Some(Outbound::Text(t)) if t.contains("peer-joined")),
        "{got:?}"
    );

    // Someone who knows a's id but not its secret is refused ...
    let mut impostor = member("a", "s9");
    impostor.secret = crate::room::secret_hash("somebody else's guess");
    assert!(matches!(
        bus.join(&r, &impostor, false, now).await.expect("join"),
        JoinOutcome::Refused(Refusal::PeerIdTaken)
    ));
    // ... a with its secret replaces its old connection.
    let a2 = member("a", "s3");
    let JoinOutcome::Admitted {
        admission: replaced @ Admission::Replaced { .. },
        ..
    } = bus.join(&r, &a2, false, now).await.expect("join")
    else {
        panic!("a with its secret replaces");
    };
    bus.announce(&r, &a2, &replaced).await.expect("announce");
    assert!(matches!(
        ma.try_next(),
        Some(Outbound::Close {
            code: close::REPLACED,
            ..
        })
    ));
    // Full at 3.
    bus.join(&r, &member("c", "s4"), false, now)
        .await
        .expect("join");
    assert!(matches!(
        bus.join(&r, &member("d", "s5"), false, now)
            .await
            .expect("join"),
        JoinOutcome::Refused(Refusal::Full)
    ));
    // A stale session cannot leave for the current one.
    bus.leave(&key, &a, "left").await.expect("leave");
    assert_eq!(bus.members(&key).await.expect("members").len(), 3);
    bus.leave(&key, &a2, "left").await.expect("leave");
    let mut left: Vec<String> = bus
        .members(&key)
        .await
        .expect("members")
        .into_iter()
        .map(|m| m.peer_id)
        .collect();
    left.sort();
    assert_eq!(left, ["b", "c"]);

    // One-time: the first two distinct clients, even one after the other.
    let mut once = room(tenant, &format!("{tenant}o"), true, false);
    once.one_time = true;
    bus.create_room(&once, None, now).await.expect("create");
    for m in [&a, &b] {
        bus.join(&once, m, false, now).await.expect("join");
        bus.leave(&once.key(), m, "left").await.expect("leave");
    }
    assert!(matches!(
        bus.join(&once, &member("c", "s6"), false, now)
            .await
            .expect("join"),
        JoinOutcome::Refused(Refusal::Sealed)
    ));
    assert!(matches!(
        bus.join(&once, &member("b", "s7"), false, now)
            .await
            .expect("join"),
        JoinOutcome::Admitted { .. }
    ));
    assert!(matches!(
        bus.join(&room(tenant, "nope", true, false), &a, false, now)
            .await
            .expect("join"),
        JoinOutcome::NoRoom
    ));
}

/// Concurrent joins of one room never admit more than it holds.
pub async fn concurrent_joins(bus: Arc<dyn Bus>, tenant: &str) {
    let now = floe_proto::time::unix_now();
    let r = room(tenant, &format!("{tenant}c"), true, false);
    bus.create_room(&r, None, now).await.expect("create");
    let joins = (0..12).map(|i| {
        let (bus, r) = (bus.clone(), r.clone());
        tokio::spawn(async move {
            let m = member(&format!("p{i}"), &format!("s{i}"));
            matches!(
                bus.join(&r, &m, false, now).await.expect("join"),
                JoinOutcome::Admitted { .. }
            )
        })
    });
    let mut admitted = 0;
    for j in joins {
        admitted += usize::from(j.await.expect("task"));
    }
    assert_eq!(admitted, 3);
    assert_eq!(bus.members(&r.key()).await.expect("members").len(), 3);
}
