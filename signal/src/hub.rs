//! The WebSocket connections this node holds, by room and peer, and
//! delivery of ready-made message text to them.
//!
//! Every connection task owns a [`Mailbox`]: a queue bounded in messages
//! and bytes that delivery fills without ever waiting on a socket. A peer
//! whose mailbox is full is too slow to keep: it is removed at once, its
//! task is woken even if it is stuck writing to the socket, and the sender
//! hears that the message could not be delivered.
//!
//! Rooms are keyed by room key (`tenant/id`, see
//! [`RoomRecord::key`](crate::room::RoomRecord::key)).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;

use axum::extract::ws::Utf8Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::room::{Member, RoomRecord};

/// Messages queued for one connection.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A text frame to send.
    Text(Utf8Bytes),
    /// Close the connection with this code and reason.
    Close { code: u16, reason: String },
}

/// Close codes floe uses (4000–4999 are for applications).
pub(crate) mod close {
    /// Replaced by a newer connection of the same peer.
    pub const REPLACED: u16 = 4001;
    /// Too slow to read its messages.
    pub const SLOW: u16 = 4002;
    /// The room closed (expired or deleted).
    pub const ROOM_CLOSED: u16 = 4004;
    /// Access revoked: the tenant was disabled or deleted, or the API key
    /// that signed the join token was revoked.
    pub const REVOKED: u16 = 4005;
    /// A message over the size limit (RFC 6455 "message too big").
    pub const TOO_BIG: u16 = 1009;
    /// Refused at join; the `error` message before it says why.
    pub const REFUSED: u16 = 4003;
    /// No heartbeat answer.
    pub const DEAD: u16 = 4008;
    /// Server going away; reconnect (to another node).
    pub const DRAINING: u16 = 1012;
    /// A dependency is down; retry later.
    pub const TRY_AGAIN: u16 = 1013;
}

/// Close reason sent to a replaced connection.
pub(crate) const REPLACED_REASON: &str = "replaced by a newer connection of this peer";

/// Messages queued per connection before it counts as too slow.
pub(crate) const QUEUE: usize = 256;
/// Bytes queued per connection before it counts as too slow: what a
/// connection holds in memory, whatever its peers send it.
pub(crate) const QUEUE_BYTES: usize = 4 << 20;

/// A connection's outgoing queue: texts up to [`QUEUE`] and
/// [`QUEUE_BYTES`], then the close. It allocates only while messages wait
/// (an idle connection's mailbox is a few dozen bytes; a channel would
/// hold a block of slots).
#[derive(Default)]
pub(crate) struct Mailbox {
    state: Mutex<MailboxState>,
    ready: Notify,
    /// Wakes a task stuck writing to its socket when the mailbox aborts.
    aborted: Notify,
}

#[derive(Default)]
struct MailboxState {
    queue: VecDeque<Utf8Bytes>,
    bytes: usize,
    close: Option<(u16, String)>,
    aborted: bool,
}

impl Mailbox {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Queues a text; `false` when full or closing.
    pub fn push(&self, text: Utf8Bytes) -> bool {
        let mut s = lock(&self.state);
        if s.close.is_some() || s.queue.len() >= QUEUE || s.bytes + text.len() > QUEUE_BYTES {
            return false;
        }
        s.bytes += text.len();
        s.queue.push_back(text);
        drop(s);
        self.ready.notify_one();
        true
    }

    /// Closes after the queued texts are sent.
    pub fn close(&self, code: u16, reason: &str) {
        lock(&self.state)
            .close
            .get_or_insert_with(|| (code, reason.to_owned()));
        self.ready.notify_one();
    }

    /// Drops what is queued and closes at once.
    pub fn abort(&self, code: u16, reason: &str) {
        let mut s = lock(&self.state);
        s.queue = VecDeque::new();
        s.bytes = 0;
        s.aborted = true;
        s.close.get_or_insert_with(|| (code, reason.to_owned()));
        drop(s);
        self.ready.notify_one();
        self.aborted.notify_waiters();
    }

    /// Resolves once [`abort`](Self::abort) was called.
    pub async fn aborted(&self) {
        loop {
            let notified = self.aborted.notified();
            tokio::pin!(notified);
            // Registered before the check, so an abort in between wakes us.
            notified.as_mut().enable();
            if lock(&self.state).aborted {
                return;
            }
            notified.await;
        }
    }

    /// The next thing to send, if any: queued texts first, then the close.
    pub fn try_next(&self) -> Option<Outbound> {
        let mut s = lock(&self.state);
        if let Some(t) = s.queue.pop_front() {
            s.bytes -= t.len();
            if s.queue.is_empty() && s.queue.capacity() > 16 {
                // A burst is over: give its memory back.
                s.queue = VecDeque::new();
            }
            return Some(Outbound::Text(t));
        }
        s.close
            .clone()
            .map(|(code, reason)| Outbound::Close { code, reason })
    }

    /// Waits for the next thing to send.
    pub async fn next(&self) -> Outbound {
        loop {
            if let Some(o) = self.try_next() {
                return o;
            }
            self.ready.notified().await;
        }
    }
}

struct LocalPeer {
    session: String,
    /// Hash of the reconnect secret (restored into Redis on a resync).
    secret: Box<str>,
    /// API key that signed the peer's join token, if it had one.
    key_id: Option<Box<str>>,
    mailbox: Arc<Mailbox>,
}

struct LocalRoom {
    /// Shared by every local connection of the room.
    record: Arc<RoomRecord>,
    peers: HashMap<String, LocalPeer>,
}

/// Where a message goes.
pub(crate) enum Target<'a> {
    /// One peer, optionally only if its session is `session`.
    Peer {
        peer: &'a str,
        session: Option<&'a str>,
    },
    /// Every peer of the room but `except`.
    Room { except: Option<&'a str> },
}

/// What happened to a message for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Delivered,
    NoPeer,
    StaleSession,
    /// The peer's queue was full: it has been closed.
    Dropped,
}

const SHARDS: usize = 32;

/// The local connection registry.
pub(crate) struct Hub {
    shards: Vec<Mutex<HashMap<String, LocalRoom>>>,
    hasher: std::collections::hash_map::RandomState,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, room: &str) -> &Mutex<HashMap<String, LocalRoom>> {
        &self.shards[(self.hasher.hash_one(room) as usize) % SHARDS]
    }

    /// Counts a connection from `ip`; `false` if it already has `max`.
    pub fn acquire_ip(&self, ip: IpAddr, max: u32) -> bool {
        let mut map = lock(&self.per_ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    pub fn release_ip(&self, ip: IpAddr) {
        let mut map = lock(&self.per_ip);
        if let Entry::Occupied(mut e) = map.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Registers a connection. Returns the room record every local
    /// connection of the room shares, and the mailbox of a previous local
    /// connection of the same peer, which the caller closes.
    pub fn register(
        &self,
        record: RoomRecord,
        member: &Member,
        key_id: Option<String>,
        mailbox: Arc<Mailbox>,
    ) -> (Arc<RoomRecord>, Option<Arc<Mailbox>>) {
        let key = record.key();
        let mut shard = lock(self.shard(&key));
        let room = shard.entry(key).or_insert_with(|| LocalRoom {
            record: Arc::new(record),
            peers: HashMap::new(),
        });
        let old = room
            .peers
            .insert(
                member.peer_id.clone(),
                LocalPeer {
                    session: member.session_id.clone(),
                    secret: member.secret.as_str().into(),
                    key_id: key_id.map(String::into_boxed_str),
                    mailbox,
                },
            )
            .map(|old| old.mailbox);
        (room.record.clone(), old)
    }

    /// Removes a connection if `session` is still the peer's current one.
    pub fn unregister(&self, room: &str, peer: &str, session: &str) -> bool {
        let mut shard = lock(self.shard(room));
        let Some(r) = shard.get_mut(room) else {
            return false;
        };
        let current = r.peers.get(peer).is_some_and(|p| p.session == session);
        if current {
            r.peers.remove(peer);
            if r.peers.is_empty() {
                shard.remove(room);
            }
        }
        current
    }

    /// Queues `text` for the target peers of `room`.
    pub fn deliver(&self, room: &str, target: Target<'_>, text: &Utf8Bytes) -> Delivery {
        let mut shard = lock(self.shard(room));
        let Some(r) = shard.get_mut(room) else {
            return Delivery::NoPeer;
        };
        match target {
            Target::Peer { peer, session } => {
                let Some(p) = r.peers.get(peer) else {
                    return Delivery::NoPeer;
                };
                if session.is_some_and(|s| s != p.session) {
                    return Delivery::StaleSession;
                }
                if p.mailbox.push(text.clone()) {
                    Delivery::Delivered
                } else {
                    p.mailbox.abort(close::SLOW, "too slow to read messages");
                    r.peers.remove(peer);
                    Delivery::Dropped
                }
            }
            Target::Room { except } => {
                let mut slow = Vec::new();
                for (id, p) in &r.peers {
                    if Some(id.as_str()) == except {
                        continue;
                    }
                    if !p.mailbox.push(text.clone()) {
                        slow.push(id.clone());
                    }
                }
                for id in slow {
                    if let Some(p) = r.peers.remove(&id) {
                        p.mailbox.abort(close::SLOW, "too slow to read messages");
                    }
                }
                Delivery::Delivered
            }
        }
    }

    /// Closes one peer's connection (if `session` matches, when given).
    pub fn close_peer(
        &self,
        room: &str,
        peer: &str,
        session: Option<&str>,
        code: u16,
        reason: &str,
    ) {
        let mut shard = lock(self.shard(room));
        if let Some(r) = shard.get_mut(room) {
            let matches = r
                .peers
                .get(peer)
                .is_some_and(|p| session.is_none_or(|s| s == p.session));
            if matches && let Some(p) = r.peers.remove(peer) {
                p.mailbox.close(code, reason);
            }
            if r.peers.is_empty() {
                shard.remove(room);
            }
        }
    }

    /// Closes the connection `session` of `peer`, replaced by a newer one
    /// (close 4001).
    pub fn close_replaced(&self, room: &str, peer: &str, session: Option<&str>) {
        self.close_peer(room, peer, session, close::REPLACED, REPLACED_REASON);
    }

    /// Sends `text` (if any) and closes every local peer of `room`.
    pub fn close_room(&self, room: &str, text: Option<&Utf8Bytes>, code: u16, reason: &str) {
        let removed = lock(self.shard(room)).remove(room);
        if let Some(r) = removed {
            for p in r.peers.into_values() {
                if let Some(t) = text {
                    p.mailbox.push(t.clone());
                }
                p.mailbox.close(code, reason);
            }
        }
    }

    /// Keys of local rooms that have expired at `now`.
    pub fn expired(&self, now: u64) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .iter()
                    .filter(|(_, r)| r.record.expires_at <= now)
                    .map(|(k, _)| k.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Closes, with `code`, every local connection whose room and signing
    /// key match `revoked`; returns how many.
    pub fn close_where(
        &self,
        revoked: impl Fn(&RoomRecord, Option<&str>) -> bool,
        code: u16,
        reason: &str,
    ) -> usize {
        let mut closed = 0;
        for shard in &self.shards {
            let mut shard = lock(shard);
            for room in shard.values_mut() {
                room.peers.retain(|_, p| {
                    if revoked(&room.record, p.key_id.as_deref()) {
                        p.mailbox.close(code, reason);
                        closed += 1;
                        false
                    } else {
                        true
                    }
                });
            }
            shard.retain(|_, r| !r.peers.is_empty());
        }
        closed
    }

    /// Tenants with a local connection.
    pub fn tenants(&self) -> std::collections::BTreeSet<String> {
        self.shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .values()
                    .map(|r| r.record.tenant.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every local room with its local members (as on `node`).
    pub fn snapshot(&self, node: &str) -> Vec<(Arc<RoomRecord>, Vec<Member>)> {
        self.shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .values()
                    .map(|r| {
                        let members = r
                            .peers
                            .iter()
                            .map(|(id, p)| Member {
                                peer_id: id.clone(),
                                session_id: p.session.clone(),
                                node: node.to_owned(),
                                secret: p.secret.to_string(),
                            })
                            .collect();
                        (r.record.clone(), members)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Whether `session` is `peer`'s connection in `room` on this node.
    pub fn has(&self, room: &str, peer: &str, session: &str) -> bool {
        lock(self.shard(room))
            .get(room)
            .and_then(|r| r.peers.get(peer))
            .is_some_and(|p| p.session == session)
    }

    /// Local rooms and local peers.
    /// Rooms with a local connection: one lock per shard, no walk over
    /// the rooms (this runs on every join and leave).
    pub fn room_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Rooms and local connections (walks every room).
    pub fn counts(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(rooms, peers), s| {
            let s = lock(s);
            (
                rooms + s.len(),
                peers + s.values().map(|r| r.peers.len()).sum::<usize>(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::tests::{member, record};

    const R: &str = "t/r";

    fn text(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_owned())
    }

    fn text_of(o: Option<Outbound>) -> Option<String> {
        match o {
            Some(Outbound::Text(t)) => Some(t.as_str().to_owned()),
            _ => None,
        }
    }

    #[test]
    fn delivers_by_peer_and_session_and_drops_slow_peers() {
        let hub = Hub::new();
        let room = record(4, false);
        let (a, b) = (Mailbox::new(), Mailbox::new());
        assert!(
            hub.register(room.clone(), &member("a", "s1"), None, a.clone())
                .1
                .is_none()
        );
        let (shared, old) = hub.register(room, &member("b", "s2"), None, b.clone());
        assert!(old.is_none());
        assert_eq!(
            std::sync::Arc::strong_count(&shared),
            2,
            "one record per room"
        );

        let to_a = |session| Target::Peer { peer: "a", session };
        assert_eq!(
            hub.deliver(R, to_a(Some("s1")), &text("1")),
            Delivery::Delivered
        );
        assert_eq!(text_of(a.try_next()).as_deref(), Some("1"));
        assert_eq!(
            hub.deliver(R, to_a(Some("old")), &text("x")),
            Delivery::StaleSession
        );
        assert_eq!(
            hub.deliver(
                R,
                Target::Peer {
                    peer: "zz",
                    session: None
                },
                &text("x")
            ),
            Delivery::NoPeer
        );
        assert_eq!(
            hub.deliver("nope", to_a(None), &text("x")),
            Delivery::NoPeer
        );

        // Room-wide, except the sender.
        hub.deliver(R, Target::Room { except: Some("a") }, &text("all"));
        assert_eq!(text_of(b.try_next()).as_deref(), Some("all"));
        assert!(a.try_next().is_none());

        // A fills up: the next message overflows, A is dropped and closed
        // at once (its backlog discarded).
        for i in 0..QUEUE {
            assert_eq!(
                hub.deliver(R, to_a(None), &text(&i.to_string())),
                Delivery::Delivered
            );
        }
        assert_eq!(
            hub.deliver(R, to_a(None), &text("overflow")),
            Delivery::Dropped
        );
        assert!(matches!(
            a.try_next(),
            Some(Outbound::Close {
                code: close::SLOW,
                ..
            })
        ));
        assert_eq!(hub.deliver(R, to_a(None), &text("gone")), Delivery::NoPeer);
        assert_eq!(hub.counts(), (1, 1));
        assert_eq!(hub.room_count(), 1);
    }

    #[test]
    fn replacement_unregister_and_room_close() {
        let hub = Hub::new();
        let room = record(4, false);
        let (m1, m2) = (Mailbox::new(), Mailbox::new());
        hub.register(room.clone(), &member("a", "s1"), None, m1);
        assert!(
            hub.register(room, &member("a", "s2"), None, m2.clone())
                .1
                .is_some(),
            "old mailbox returned"
        );
        assert!(
            !hub.unregister(R, "a", "s1"),
            "stale session cannot unregister"
        );
        hub.close_room(R, Some(&text("bye")), close::ROOM_CLOSED, "expired");
        assert_eq!(
            text_of(m2.try_next()).as_deref(),
            Some("bye"),
            "queued text before the close"
        );
        assert!(matches!(
            m2.try_next(),
            Some(Outbound::Close {
                code: close::ROOM_CLOSED,
                ..
            })
        ));
        assert_eq!(hub.counts(), (0, 0));
        assert_eq!(hub.expired(1_000), Vec::<String>::new());
    }

    #[tokio::test]
    async fn mailbox_wakes_its_reader() {
        let m = Mailbox::new();
        let reader = tokio::spawn({
            let m = m.clone();
            async move { m.next().await }
        });
        tokio::task::yield_now().await;
        assert!(m.push(text("hi")));
        match reader.await.expect("join") {
            Outbound::Text(t) => assert_eq!(t.as_str(), "hi"),
            other => panic!("unexpected {other:?}"),
        }
        m.close(1000, "bye");
        assert!(!m.push(text("late")), "nothing queues after close");
    }

    #[tokio::test]
    async fn a_byte_budget_bounds_the_queue_and_abort_wakes_a_stuck_writer() {
        let m = Mailbox::new();
        let half = text(&"x".repeat(QUEUE_BYTES / 2));
        assert!(m.push(half.clone()));
        assert!(m.push(half));
        assert!(!m.push(text("one byte too many")), "over the byte budget");
        assert!(matches!(m.try_next(), Some(Outbound::Text(_))));
        assert!(m.push(text("room again")), "sending frees budget");

        // A task blocked elsewhere (writing to its socket) waits on
        // `aborted`; an overflow's abort must wake it.
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.aborted().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        m.abort(close::SLOW, "too slow");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("join");
        m.aborted().await;
        assert!(matches!(
            m.try_next(),
            Some(Outbound::Close {
                code: close::SLOW,
                ..
            })
        ));
    }

    #[test]
    fn close_where_closes_only_the_revoked() {
        let hub = Hub::new();
        let (a, b) = (Mailbox::new(), Mailbox::new());
        hub.register(
            record(4, false),
            &member("a", "s1"),
            Some("k1".into()),
            a.clone(),
        );
        hub.register(
            record(4, false),
            &member("b", "s2"),
            Some("k2".into()),
            b.clone(),
        );
        let closed = hub.close_where(|_, key| key == Some("k1"), close::REVOKED, "revoked");
        assert_eq!(closed, 1);
        assert!(matches!(
            a.try_next(),
            Some(Outbound::Close {
                code: close::REVOKED,
                ..
            })
        ));
        assert!(b.try_next().is_none());
        assert_eq!(hub.counts(), (1, 1));
        assert_eq!(hub.tenants().into_iter().collect::<Vec<_>>(), ["t"]);
    }

    #[test]
    fn per_ip_limit() {
        let hub = Hub::new();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(hub.acquire_ip(ip, 2));
        assert!(hub.acquire_ip(ip, 2));
        assert!(!hub.acquire_ip(ip, 2));
        hub.release_ip(ip);
        assert!(hub.acquire_ip(ip, 2));
    }
}
