//! The control plane's storage, behind one trait with two backends:
//! [`embedded`] (a redb file, for `floe dev` and single nodes) and
//! [`redis`] (for several replicas sharing one Redis).
//!
//! Every method is one atomic step. Usage batches in particular are applied
//! exactly once: the dedup check, the ledger increments and the record that
//! the batch was seen commit together or not at all.

pub mod embedded;
pub mod redis;

use std::collections::BTreeMap;

use async_trait::async_trait;
use floe_proto::api::{Changes, Tenant};
use floe_proto::usage::{Revocation, UsageBatch};
use serde::{Deserialize, Serialize};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("store backend: {0}")]
    Backend(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// A batch would take a ledger counter past [`LEDGER_MAX`]; nothing of
    /// it was applied.
    #[error("ledger overflow at {0}")]
    Overflow(String),
}

/// Largest value a ledger counter holds (Redis integers are signed 64-bit;
/// the embedded store keeps the same bound).
pub const LEDGER_MAX: u64 = i64::MAX as u64;

/// How many applied sequence numbers above a server id's watermark the
/// dedup state keeps. A server sends its batches in order, one at a time,
/// so a gap means a batch that will never come; past this many, the
/// watermark jumps over the oldest gap (logged) instead of growing.
pub const SEEN_WINDOW: usize = 4096;

/// How long the dedup state of a server id outlives its last batch. Every
/// TURN process has an id of its own, so ids of stopped processes would
/// otherwise pile up; a resend comes within minutes, never weeks.
pub const SEEN_RETENTION_SECS: u64 = 40 * 86_400;

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        Self::Corrupt(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// An API key with its secret, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub secret: String,
    pub created_at: u64,
    pub revoked: bool,
}

/// Relayed traffic totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Totals {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl Totals {
    pub fn bytes(&self) -> u64 {
        self.bytes_out.saturating_add(self.bytes_in)
    }

    /// `self + other`, or `None` past [`LEDGER_MAX`].
    pub fn checked_sum(&self, other: &Totals) -> Option<Totals> {
        let sum = |a: u64, b: u64| a.checked_add(b).filter(|v| *v <= LEDGER_MAX);
        Some(Totals {
            bytes_out: sum(self.bytes_out, other.bytes_out)?,
            bytes_in: sum(self.bytes_in, other.bytes_in)?,
            packets_out: sum(self.packets_out, other.packets_out)?,
            packets_in: sum(self.packets_in, other.packets_in)?,
        })
    }

    pub fn add(&mut self, other: &Totals) {
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.packets_out = self.packets_out.saturating_add(other.packets_out);
        self.packets_in = self.packets_in.saturating_add(other.packets_in);
    }
}

/// The ledger increments one batch makes, keyed as the backends store them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerDelta {
    /// By (tenant, day).
    pub days: BTreeMap<(String, String), Totals>,
    /// By (tenant, day, room).
    pub rooms: BTreeMap<(String, String, String), Totals>,
    /// Relayed bytes by (tenant, month).
    pub months: BTreeMap<(String, String), u64>,
}

impl LedgerDelta {
    /// Folds a batch into per-key increments (records for the same key add up).
    pub fn of(batch: &UsageBatch) -> Self {
        let date = floe_proto::time::Date::from_unix(batch.at);
        let (day, month) = (date.day_key(), date.month_key());
        let mut delta = Self::default();
        for r in &batch.records {
            let t = Totals {
                bytes_out: r.bytes_out,
                bytes_in: r.bytes_in,
                packets_out: r.packets_out,
                packets_in: r.packets_in,
            };
            delta
                .days
                .entry((r.tenant.clone(), day.clone()))
                .or_default()
                .add(&t);
            delta
                .rooms
                .entry((r.tenant.clone(), day.clone(), r.room.clone()))
                .or_default()
                .add(&t);
            let m = delta
                .months
                .entry((r.tenant.clone(), month.clone()))
                .or_default();
            *m = m.saturating_add(t.bytes());
        }
        delta
    }
}

/// A tenant's usage over a range of days.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageReport {
    /// Totals by day (`YYYY-MM-DD`).
    pub days: BTreeMap<String, Totals>,
    /// Totals by room over the whole range.
    pub rooms: BTreeMap<String, Totals>,
    /// Sum over the range.
    pub total: Totals,
}

/// Everything the control plane keeps.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the backend answers now (for `/readyz`).
    async fn ping(&self) -> Result<()>;

    /// Times the backend moved to a new server (a Redis Sentinel
    /// failover); 0 for a backend that cannot move.
    fn switches(&self) -> u64 {
        0
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<()>;
    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;
    /// Replaces an existing tenant.
    async fn put_tenant(&self, tenant: &Tenant) -> Result<()>;
    /// Deletes a tenant and its keys; `false` if it did not exist.
    async fn delete_tenant(&self, id: &str) -> Result<bool>;

    async fn create_key(&self, key: &KeyRecord) -> Result<()>;
    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>>;
    async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyRecord>>;
    /// Marks a key revoked; `false` if it does not exist.
    async fn revoke_key(&self, id: &str) -> Result<bool>;

    /// Applies a usage batch exactly once. `Ok(false)`: seen before, nothing
    /// changed. The record of what was seen is bounded: [`SEEN_WINDOW`]
    /// sequences above a watermark per server id, forgotten
    /// [`SEEN_RETENTION_SECS`] after the id's last batch.
    async fn apply_batch(&self, batch: &UsageBatch) -> Result<bool>;
    /// Relayed bytes of a tenant in a month (`YYYY-MM`).
    async fn month_bytes(&self, tenant: &str, month: &str) -> Result<u64>;
    /// [`Store::month_bytes`] of many tenants at once, in their order.
    async fn month_bytes_many(&self, tenants: &[String], month: &str) -> Result<Vec<u64>>;
    /// A tenant's usage for the days `from..=to` (`YYYY-MM-DD`).
    async fn usage(&self, tenant: &str, from: &str, to: &str) -> Result<UsageReport>;

    /// Adds a revocation.
    async fn add_revocation(&self, revocation: &Revocation) -> Result<()>;
    /// Revocations still in force at `now`; older ones may be pruned.
    async fn revocations(&self, now: u64) -> Result<Vec<Revocation>>;

    /// Whether the alert `(tenant, month, level)` has been raised.
    async fn alert_raised(&self, tenant: &str, month: &str, level: &str) -> Result<bool>;
    /// Records that the alert `(tenant, month, level)` was raised; `false`
    /// if it had been raised before.
    async fn mark_alert(&self, tenant: &str, month: &str, level: &str) -> Result<bool>;

    /// Appends to the change feed that a tenant (`key: None`) or one of its
    /// API keys changed in a way that may take access away; returns the
    /// change's sequence number. The feed keeps the newest
    /// [`CHANGES_KEPT`] entries.
    async fn record_change(&self, tenant: &str, key: Option<&str>) -> Result<u64>;
    /// Up to `limit` changes after `after`, oldest first, with the newest
    /// sequence number; `reset` when changes after `after` were pruned or
    /// the feed is behind `after` (it was wiped).
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Changes>;

    /// Queues a webhook event for delivery; an event with the same id
    /// replaces the queued one (so re-queuing is idempotent).
    async fn push_outbox(&self, event: &OutboxEvent) -> Result<()>;
    /// Every queued webhook event.
    async fn outbox(&self) -> Result<Vec<OutboxEvent>>;
    /// Removes a delivered (or abandoned) event.
    async fn remove_outbox(&self, id: &str) -> Result<()>;
}

/// How many change-feed entries a store keeps.
pub const CHANGES_KEPT: usize = 10_000;

/// Whether a reader at `after` missed changes, given the feed's oldest
/// kept and newest sequence numbers.
pub(crate) fn feed_reset(after: u64, oldest: Option<u64>, newest: u64) -> bool {
    after > newest || oldest.is_some_and(|o| o > after + 1)
}

/// A webhook event waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// Stable id, also in the body, so receivers can drop duplicates.
    pub id: String,
    pub tenant: String,
    pub url: String,
    /// HMAC-SHA256 key for the signature header.
    pub secret: String,
    /// The JSON body, exactly as signed and sent.
    pub body: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// The shared behaviour every backend must show; run against each backend
/// by its tests.
#[cfg(test)]
pub(crate) mod suite {
    use super::*;
    use floe_proto::api::Plan;
    use floe_proto::usage::UsageRecord;

    fn tenant(id: &str) -> Tenant {
        Tenant {
            id: id.into(),
            name: format!("Tenant {id}"),
            plan: Plan {
                turn: true,
                ..Plan::default()
            },
            disabled: false,
            webhook_url: None,
            webhook_secret: None,
            created_at: 1,
        }
    }

    fn batch(server: &str, seq: u64, at: u64, tenant: &str, room: &str, bytes: u64) -> UsageBatch {
        UsageBatch {
            server_id: server.into(),
            seq,
            at,
            records: vec![UsageRecord {
                tenant: tenant.into(),
                room: room.into(),
                bytes_out: bytes,
                bytes_in: 2 * bytes,
                packets_out: 1,
                packets_in: 2,
            }],
        }
    }

    pub async fn tenants_and_keys(store: &dyn Store, prefix: &str) {
        let a = tenant(&format!("{prefix}a"));
        store.create_tenant(&a).await.expect("create");
        assert!(matches!(
            store.create_tenant(&a).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(store.get_tenant(&a.id).await.expect("get"), Some(a.clone()));
        let mut changed = a.clone();
        changed.disabled = true;
        store.put_tenant(&changed).await.expect("put");
        assert_eq!(
            store.get_tenant(&a.id).await.expect("get"),
            Some(changed.clone())
        );
        assert!(
            store
                .list_tenants()
                .await
                .expect("list")
                .iter()
                .any(|t| t.id == a.id)
        );

        let key = KeyRecord {
            id: format!("{prefix}k1"),
            tenant: a.id.clone(),
            secret: "s3cret-s3cret-s3cret".into(),
            created_at: 2,
            revoked: false,
        };
        store.create_key(&key).await.expect("key");
        assert!(matches!(
            store.create_key(&key).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.list_keys(&a.id).await.expect("keys"),
            vec![key.clone()]
        );
        assert!(store.revoke_key(&key.id).await.expect("revoke"));
        assert!(
            store
                .get_key(&key.id)
                .await
                .expect("get")
                .expect("some")
                .revoked
        );
        assert!(!store.revoke_key("nope").await.expect("revoke"));

        assert!(store.delete_tenant(&a.id).await.expect("delete"));
        assert!(!store.delete_tenant(&a.id).await.expect("delete"));
        assert_eq!(store.get_tenant(&a.id).await.expect("get"), None);
        assert_eq!(store.get_key(&key.id).await.expect("get"), None);
        assert!(matches!(
            store.put_tenant(&a).await,
            Err(StoreError::NotFound(_))
        ));
    }

    pub async fn ledger_exactly_once(store: &dyn Store, prefix: &str) {
        let t = format!("{prefix}t");
        let s = format!("{prefix}srv");
        // 2026-11-23 and 2026-11-24, both in 2026-11.
        let day1 = 1_795_435_200;
        let day2 = day1 + 86_400;
        let batches = [
            batch(&s, 1, day1, &t, "r1", 10),
            batch(&s, 2, day1, &t, "r2", 20),
            batch(&s, 3, day2, &t, "r1", 30),
        ];
        // Out of order, with duplicates.
        for i in [2usize, 0, 0, 2, 1, 1, 0] {
            store.apply_batch(&batches[i]).await.expect("apply");
        }
        assert!(!store.apply_batch(&batches[1]).await.expect("dup"));
        let fresh = batch(&s, 9, day2, &t, "r2", 1);
        assert!(store.apply_batch(&fresh).await.expect("new"));
        assert!(!store.apply_batch(&fresh).await.expect("dup"));
        // Another server's seq 1 is a different batch.
        assert!(
            store
                .apply_batch(&batch(&format!("{prefix}other"), 1, day1, &t, "r1", 100))
                .await
                .expect("other server")
        );

        // Bytes: out + in = 3 × bytes per batch.
        let expect_total = 3 * (10 + 20 + 30 + 1 + 100);
        assert_eq!(
            store.month_bytes(&t, "2026-11").await.expect("month"),
            expect_total
        );
        assert_eq!(store.month_bytes(&t, "2026-12").await.expect("month"), 0);
        let many = [t.clone(), format!("{prefix}nobody"), t.clone()];
        assert_eq!(
            store
                .month_bytes_many(&many, "2026-11")
                .await
                .expect("many"),
            [expect_total, 0, expect_total]
        );
        let report = store
            .usage(&t, "2026-11-01", "2026-11-30")
            .await
            .expect("usage");
        assert_eq!(report.total.bytes(), expect_total);
        assert_eq!(report.days["2026-11-23"].bytes(), 3 * (10 + 20 + 100));
        assert_eq!(report.days["2026-11-24"].bytes(), 3 * (30 + 1));
        assert_eq!(report.rooms["r1"].bytes(), 3 * (10 + 30 + 100));
        assert_eq!(report.rooms["r2"].packets_in, 4);
        let one_day = store
            .usage(&t, "2026-11-24", "2026-11-24")
            .await
            .expect("usage");
        assert_eq!(one_day.total.bytes(), 3 * 31);
    }

    /// A batch that would overflow a counter is refused whole, every time
    /// it is sent: it is neither half-applied nor later taken for a
    /// duplicate.
    pub async fn ledger_refuses_overflow_whole(store: &dyn Store, prefix: &str) {
        let t = format!("{prefix}big");
        let s = format!("{prefix}srv-big");
        let day = 1_795_435_200;
        let half = 1u64 << 61;
        assert!(
            store
                .apply_batch(&batch(&s, 1, day, &t, "r", half))
                .await
                .expect("fits")
        );
        let month = store.month_bytes(&t, "2026-11").await.expect("month");
        assert_eq!(month, 3 * half);
        let over = batch(&s, 2, day, &t, "r", half);
        for _ in 0..2 {
            assert!(matches!(
                store.apply_batch(&over).await,
                Err(StoreError::Overflow(_))
            ));
        }
        assert_eq!(
            store.month_bytes(&t, "2026-11").await.expect("month"),
            month
        );
        let report = store
            .usage(&t, "2026-11-23", "2026-11-23")
            .await
            .expect("usage");
        assert_eq!(report.total.bytes_out, half, "nothing of the refused batch");
        // Later batches still apply.
        assert!(
            store
                .apply_batch(&batch(&s, 3, day, &t, "r", 1))
                .await
                .expect("small")
        );
    }

    pub async fn ledger_concurrent_duplicates(store: std::sync::Arc<dyn Store>, prefix: &str) {
        let t = format!("{prefix}ct");
        let s = format!("{prefix}csrv");
        let mut tasks = Vec::new();
        for _copy in 0..4 {
            for seq in 1..=25u64 {
                let store = store.clone();
                let b = batch(&s, seq, 1_795_435_200, &t, "r", seq);
                tasks.push(tokio::spawn(async move {
                    store.apply_batch(&b).await.expect("apply")
                }));
            }
        }
        let mut applied = 0;
        for task in tasks {
            if task.await.expect("join") {
                applied += 1;
            }
        }
        assert_eq!(applied, 25, "each distinct batch applied exactly once");
        let sum: u64 = (1..=25u64).map(|s| 3 * s).sum();
        assert_eq!(store.month_bytes(&t, "2026-11").await.expect("month"), sum);
    }

    pub async fn change_feed(store: &dyn Store, prefix: &str) {
        let t = format!("{prefix}ct");
        let start = store.changes_after(0, 10).await.expect("feed").seq;
        let first = store.record_change(&t, None).await.expect("record");
        let second = store.record_change(&t, Some("k9")).await.expect("record");
        assert!(first > start && second == first + 1);
        let feed = store.changes_after(start, 10).await.expect("feed");
        assert!(!feed.reset);
        assert_eq!(feed.seq, second);
        assert_eq!(
            feed.changes
                .iter()
                .map(|c| (c.seq, c.tenant.as_str(), c.key.as_deref()))
                .collect::<Vec<_>>(),
            [(first, t.as_str(), None), (second, t.as_str(), Some("k9"))]
        );
        let limited = store.changes_after(start, 1).await.expect("feed");
        assert_eq!(limited.changes.len(), 1);
        let after = store.changes_after(second, 10).await.expect("feed");
        assert!(after.changes.is_empty() && !after.reset);
        // A reader ahead of the feed (which was wiped) must start over.
        assert!(
            store
                .changes_after(second + 1_000, 10)
                .await
                .expect("feed")
                .reset
        );
    }

    pub async fn revocations_and_alerts(store: &dyn Store, prefix: &str) {
        let t = format!("{prefix}rt");
        let r1 = Revocation {
            tenant: t.clone(),
            room: Some("r".into()),
            peer: None,
            until: 100,
        };
        let r2 = Revocation {
            tenant: t.clone(),
            room: None,
            peer: None,
            until: 200,
        };
        store.add_revocation(&r1).await.expect("add");
        store.add_revocation(&r2).await.expect("add");
        let live: Vec<_> = store
            .revocations(150)
            .await
            .expect("list")
            .into_iter()
            .filter(|r| r.tenant == t)
            .collect();
        assert_eq!(live, vec![r2]);

        assert!(
            !store
                .alert_raised(&t, "2026-11", "80")
                .await
                .expect("raised")
        );
        assert!(store.mark_alert(&t, "2026-11", "80").await.expect("mark"));
        assert!(
            store
                .alert_raised(&t, "2026-11", "80")
                .await
                .expect("raised")
        );
        assert!(!store.mark_alert(&t, "2026-11", "80").await.expect("mark"));
        assert!(store.mark_alert(&t, "2026-11", "100").await.expect("mark"));
        assert!(store.mark_alert(&t, "2026-12", "80").await.expect("mark"));

        let event = |id: &str, body: &str| OutboxEvent {
            id: format!("{prefix}{id}"),
            tenant: t.clone(),
            url: "http://127.0.0.1:1/hook".into(),
            secret: "s".into(),
            body: body.into(),
            created_at: 5,
        };
        store.push_outbox(&event("e1", "{}")).await.expect("push");
        store.push_outbox(&event("e2", "{}")).await.expect("push");
        store
            .push_outbox(&event("e1", "{\"v\":2}"))
            .await
            .expect("re-push");
        let mut queued = store.outbox().await.expect("outbox");
        queued.retain(|e| e.tenant == t);
        queued.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(queued, vec![event("e1", "{\"v\":2}"), event("e2", "{}")]);
        store
            .remove_outbox(&format!("{prefix}e1"))
            .await
            .expect("remove");
        let left: Vec<_> = store
            .outbox()
            .await
            .expect("outbox")
            .into_iter()
            .filter(|e| e.tenant == t)
            .map(|e| e.id)
            .collect();
        assert_eq!(left, vec![format!("{prefix}e2")]);
    }
}
