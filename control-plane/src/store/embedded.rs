//! The embedded backend: one redb file, for `floe dev` and single-node
//! deployments. Each store call is one redb transaction run on the blocking
//! pool, so a usage batch's dedup record and ledger increments commit
//! atomically and survive a crash.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use floe_proto::api::{Change, Changes, Tenant};
use floe_proto::time::unix_now;
use floe_proto::usage::{Revocation, UsageBatch};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{KeyRecord, LedgerDelta, OutboxEvent, Result, Store, StoreError, Totals, UsageReport};

const TENANTS: TableDefinition<&str, &str> = TableDefinition::new("tenants");
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("keys");
/// Seen batch sequence numbers by server id.
const SEEN: TableDefinition<&str, &str> = TableDefinition::new("seen_batches");
/// Totals by `tenant/day`.
const DAYS: TableDefinition<&str, &str> = TableDefinition::new("usage_days");
/// Totals by `tenant/day/room`.
const ROOMS: TableDefinition<&str, &str> = TableDefinition::new("usage_rooms");
/// Relayed bytes by `tenant/month`.
const MONTHS: TableDefinition<&str, u64> = TableDefinition::new("usage_months");
/// Revocation (as JSON) to the time it stops mattering.
const REVOCATIONS: TableDefinition<&str, u64> = TableDefinition::new("revocations");
/// Alerts raised, by `tenant/month/level`.
const ALERTS: TableDefinition<&str, u64> = TableDefinition::new("alerts");
/// The change feed: sequence number to `[tenant, key]` JSON.
const CHANGES: TableDefinition<u64, &str> = TableDefinition::new("changes");
/// Webhook events waiting for delivery, by id.
const OUTBOX: TableDefinition<&str, &str> = TableDefinition::new("webhook_outbox");

/// Which sequence numbers of one server have been applied: all up to
/// `watermark`, plus those in `above`. Kept small by advancing the
/// watermark over every contiguous run, and over the oldest gap once
/// `above` holds [`super::SEEN_WINDOW`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct Seen {
    watermark: u64,
    above: BTreeSet<u64>,
    /// When the last batch was applied (unix seconds).
    #[serde(default)]
    at: u64,
}

impl Seen {
    fn contains(&self, seq: u64) -> bool {
        seq <= self.watermark || self.above.contains(&seq)
    }

    /// Records `seq`; returns how many missing sequences the watermark
    /// jumped over to stay within the window.
    fn insert(&mut self, seq: u64, now: u64) -> u64 {
        self.at = now;
        self.above.insert(seq);
        let mut skipped = 0;
        if self.above.len() > super::SEEN_WINDOW {
            let lowest = *self.above.first().expect("over the window");
            skipped = lowest - 1 - self.watermark;
            self.watermark = lowest - 1;
        }
        while self.above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
        skipped
    }
}

/// How often an apply also forgets idle servers' dedup state.
const PRUNE_EVERY_SECS: u64 = 3600;

/// Forgets the dedup state of servers idle for [`super::SEEN_RETENTION_SECS`].
/// State written before idle times were kept is stamped `now`, so it ages
/// out from here.
fn prune_seen(t: &mut redb::Table<&str, &str>, now: u64) -> Result<()> {
    let cutoff = now.saturating_sub(super::SEEN_RETENTION_SECS);
    let mut stale = Vec::new();
    let mut unstamped = Vec::new();
    for entry in t.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        let seen: Seen = serde_json::from_str(v.value())?;
        if seen.at == 0 {
            unstamped.push((k.value().to_owned(), Seen { at: now, ..seen }));
        } else if seen.at < cutoff {
            stale.push(k.value().to_owned());
        }
    }
    for k in &stale {
        t.remove(k.as_str()).map_err(backend)?;
    }
    for (k, seen) in unstamped {
        t.insert(k.as_str(), serde_json::to_string(&seen)?.as_str())
            .map_err(backend)?;
    }
    if !stale.is_empty() {
        tracing::info!(
            servers = stale.len(),
            "forgot the usage dedup state of idle servers"
        );
    }
    Ok(())
}

/// A redb-backed [`Store`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// When dedup state was last pruned (unix seconds).
    pruned_at: Arc<AtomicU64>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the database file at `path`, creating its folder.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        // It holds API key secrets: readable by its owner only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| StoreError::Backend(format!("cannot restrict {}: {e}", path.display())),
            )?;
        }
        // Create every table up front so readers never see a missing one.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(TENANTS).map_err(backend)?;
        txn.open_table(KEYS).map_err(backend)?;
        txn.open_table(SEEN).map_err(backend)?;
        txn.open_table(DAYS).map_err(backend)?;
        txn.open_table(ROOMS).map_err(backend)?;
        txn.open_table(MONTHS).map_err(backend)?;
        txn.open_table(REVOCATIONS).map_err(backend)?;
        txn.open_table(ALERTS).map_err(backend)?;
        txn.open_table(OUTBOX).map_err(backend)?;
        txn.open_table(CHANGES).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            db: Arc::new(db),
            pruned_at: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Runs `f` on the blocking pool with the database.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?
    }

    /// Runs `f` in one write transaction, committed when `f` succeeds.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let out = f(&txn)?;
            txn.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }

    /// Inserts `json` under `id` unless the id is taken (`Conflict`).
    async fn insert_new(
        &self,
        table: TableDefinition<'static, &'static str, &'static str>,
        what: &'static str,
        id: &str,
        json: String,
    ) -> Result<()> {
        let id = id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(table).map_err(backend)?;
            if t.get(id.as_str()).map_err(backend)?.is_some() {
                return Err(StoreError::Conflict(format!("{what} {id}")));
            }
            t.insert(id.as_str(), json.as_str()).map_err(backend)?;
            Ok(())
        })
        .await
    }

    /// Every value of a JSON table.
    async fn all_json<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static str>,
    ) -> Result<Vec<T>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(table).map_err(backend)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(backend)? {
                let (_, v) = entry.map_err(backend)?;
                out.push(serde_json::from_str(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn get_json<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static str>,
        key: &str,
    ) -> Result<Option<T>> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(table).map_err(backend)?;
            match t.get(key.as_str()).map_err(backend)? {
                Some(v) => Ok(Some(serde_json::from_str(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }
}

fn add_totals(table: &mut redb::Table<&str, &str>, key: &str, delta: &Totals) -> Result<()> {
    let mut totals: Totals = match table.get(key).map_err(backend)? {
        Some(v) => serde_json::from_str(v.value())?,
        None => Totals::default(),
    };
    totals = totals
        .checked_sum(delta)
        .ok_or_else(|| StoreError::Overflow(key.to_owned()))?;
    table
        .insert(key, serde_json::to_string(&totals)?.as_str())
        .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> Result<()> {
        self.blocking(|db| db.begin_read().map(|_| ()).map_err(backend))
            .await
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        self.insert_new(
            TENANTS,
            "tenant",
            &tenant.id,
            serde_json::to_string(tenant)?,
        )
        .await
    }

    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>> {
        self.get_json(TENANTS, id).await
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.all_json(TENANTS).await
    }

    async fn put_tenant(&self, tenant: &Tenant) -> Result<()> {
        let (id, json) = (tenant.id.clone(), serde_json::to_string(tenant)?);
        self.write(move |txn| {
            let mut t = txn.open_table(TENANTS).map_err(backend)?;
            if t.get(id.as_str()).map_err(backend)?.is_none() {
                return Err(StoreError::NotFound(format!("tenant {id}")));
            }
            t.insert(id.as_str(), json.as_str()).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(TENANTS).map_err(backend)?;
            if t.remove(id.as_str()).map_err(backend)?.is_none() {
                return Ok(false);
            }
            let mut keys = txn.open_table(KEYS).map_err(backend)?;
            let mut owned = Vec::new();
            for entry in keys.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let rec: KeyRecord = serde_json::from_str(v.value())?;
                if rec.tenant == id {
                    owned.push(k.value().to_owned());
                }
            }
            for k in owned {
                keys.remove(k.as_str()).map_err(backend)?;
            }
            Ok(true)
        })
        .await
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<()> {
        self.insert_new(KEYS, "key", &key.id, serde_json::to_string(key)?)
            .await
    }

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        self.get_json(KEYS, id).await
    }

    async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyRecord>> {
        let tenant = tenant.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(KEYS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(backend)? {
                let (_, v) = entry.map_err(backend)?;
                let rec: KeyRecord = serde_json::from_str(v.value())?;
                if rec.tenant == tenant {
                    out.push(rec);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn revoke_key(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(KEYS).map_err(backend)?;
            let mut rec: KeyRecord = match t.get(id.as_str()).map_err(backend)? {
                Some(v) => serde_json::from_str(v.value())?,
                None => return Ok(false),
            };
            rec.revoked = true;
            t.insert(id.as_str(), serde_json::to_string(&rec)?.as_str())
                .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn apply_batch(&self, batch: &UsageBatch) -> Result<bool> {
        let (server, seq) = (batch.server_id.clone(), batch.seq);
        let delta = LedgerDelta::of(batch);
        let now = unix_now();
        let prune = now.saturating_sub(self.pruned_at.load(Ordering::Relaxed)) >= PRUNE_EVERY_SECS;
        let applied = self
            .write(move |txn| {
                let mut seen_t = txn.open_table(SEEN).map_err(backend)?;
                let mut seen: Seen = match seen_t.get(server.as_str()).map_err(backend)? {
                    Some(v) => serde_json::from_str(v.value())?,
                    None => Seen::default(),
                };
                if seen.contains(seq) {
                    return Ok(false);
                }
                let skipped = seen.insert(seq, now);
                if skipped > 0 {
                    tracing::warn!(server = %server, seq, skipped, "usage sequences never received; no longer awaited");
                }
                seen_t
                    .insert(server.as_str(), serde_json::to_string(&seen)?.as_str())
                    .map_err(backend)?;
                if prune {
                    prune_seen(&mut seen_t, now)?;
                }
            let mut days = txn.open_table(DAYS).map_err(backend)?;
            for ((tenant, day), t) in &delta.days {
                add_totals(&mut days, &format!("{tenant}/{day}"), t)?;
            }
            let mut rooms = txn.open_table(ROOMS).map_err(backend)?;
            for ((tenant, day, room), t) in &delta.rooms {
                add_totals(&mut rooms, &format!("{tenant}/{day}/{room}"), t)?;
            }
            let mut months = txn.open_table(MONTHS).map_err(backend)?;
            for ((tenant, month), bytes) in &delta.months {
                let key = format!("{tenant}/{month}");
                let old = months
                    .get(key.as_str())
                    .map_err(backend)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                let new = old
                    .checked_add(*bytes)
                    .filter(|v| *v <= super::LEDGER_MAX)
                    .ok_or_else(|| StoreError::Overflow(key.clone()))?;
                months.insert(key.as_str(), new).map_err(backend)?;
            }
            Ok(true)
        })
        .await;
        if prune && applied.is_ok() {
            self.pruned_at.store(now, Ordering::Relaxed);
        }
        applied
    }

    async fn month_bytes(&self, tenant: &str, month: &str) -> Result<u64> {
        let key = format!("{tenant}/{month}");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MONTHS).map_err(backend)?;
            Ok(t.get(key.as_str())
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0))
        })
        .await
    }

    async fn month_bytes_many(&self, tenants: &[String], month: &str) -> Result<Vec<u64>> {
        let keys: Vec<String> = tenants.iter().map(|t| format!("{t}/{month}")).collect();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(MONTHS).map_err(backend)?;
            keys.iter()
                .map(|k| Ok(t.get(k.as_str()).map_err(backend)?.map_or(0, |v| v.value())))
                .collect()
        })
        .await
    }

    async fn usage(&self, tenant: &str, from: &str, to: &str) -> Result<UsageReport> {
        let (tenant, from, to) = (tenant.to_owned(), from.to_owned(), to.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let mut report = UsageReport::default();
            let days = txn.open_table(DAYS).map_err(backend)?;
            let (lo, hi) = (format!("{tenant}/{from}"), format!("{tenant}/{to}"));
            for entry in days.range(lo.as_str()..=hi.as_str()).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let totals: Totals = serde_json::from_str(v.value())?;
                let day = k.value().rsplit('/').next().unwrap_or_default().to_owned();
                report.total.add(&totals);
                report.days.insert(day, totals);
            }
            let rooms = txn.open_table(ROOMS).map_err(backend)?;
            // Room keys are `tenant/day/room`; '~' sorts after every id character.
            let hi = format!("{tenant}/{to}/~");
            for entry in rooms.range(lo.as_str()..=hi.as_str()).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let totals: Totals = serde_json::from_str(v.value())?;
                let room = k.value().rsplit('/').next().unwrap_or_default().to_owned();
                report.rooms.entry(room).or_default().add(&totals);
            }
            Ok(report)
        })
        .await
    }

    async fn add_revocation(&self, revocation: &Revocation) -> Result<()> {
        let until = revocation.until;
        let json = serde_json::to_string(revocation)?;
        let now = floe_proto::time::unix_now();
        self.write(move |txn| {
            let mut t = txn.open_table(REVOCATIONS).map_err(backend)?;
            // Prune here, so that reads stay read-only.
            let mut stale = Vec::new();
            for entry in t.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if v.value() < now {
                    stale.push(k.value().to_owned());
                }
            }
            for k in stale {
                t.remove(k.as_str()).map_err(backend)?;
            }
            t.insert(json.as_str(), until).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn revocations(&self, now: u64) -> Result<Vec<Revocation>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(REVOCATIONS).map_err(backend)?;
            let mut live = Vec::new();
            for entry in t.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if v.value() >= now {
                    live.push(serde_json::from_str(k.value())?);
                }
            }
            Ok(live)
        })
        .await
    }

    async fn alert_raised(&self, tenant: &str, month: &str, level: &str) -> Result<bool> {
        let key = format!("{tenant}/{month}/{level}");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(ALERTS).map_err(backend)?;
            Ok(t.get(key.as_str()).map_err(backend)?.is_some())
        })
        .await
    }

    async fn record_change(&self, tenant: &str, key: Option<&str>) -> Result<u64> {
        let entry = serde_json::to_string(&(tenant, key))?;
        self.write(move |txn| {
            let mut t = txn.open_table(CHANGES).map_err(backend)?;
            let seq = match t.last().map_err(backend)? {
                Some((k, _)) => k.value() + 1,
                None => 1,
            };
            t.insert(seq, entry.as_str()).map_err(backend)?;
            // Sequence numbers are contiguous: dropping the one that fell
            // out of the window keeps exactly the newest CHANGES_KEPT.
            if let Some(old) = seq.checked_sub(super::CHANGES_KEPT as u64) {
                t.remove(old).map_err(backend)?;
            }
            Ok(seq)
        })
        .await
    }

    async fn changes_after(&self, after: u64, limit: usize) -> Result<Changes> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(CHANGES).map_err(backend)?;
            let oldest = t.first().map_err(backend)?.map(|(k, _)| k.value());
            let newest = t.last().map_err(backend)?.map_or(0, |(k, _)| k.value());
            let mut changes = Vec::new();
            for entry in t
                .range(after.saturating_add(1)..)
                .map_err(backend)?
                .take(limit)
            {
                let (k, v) = entry.map_err(backend)?;
                let (tenant, key): (String, Option<String>) = serde_json::from_str(v.value())?;
                changes.push(Change {
                    seq: k.value(),
                    tenant,
                    key,
                });
            }
            Ok(Changes {
                seq: newest,
                reset: super::feed_reset(after, oldest, newest),
                changes,
            })
        })
        .await
    }

    async fn push_outbox(&self, event: &OutboxEvent) -> Result<()> {
        let (id, json) = (event.id.clone(), serde_json::to_string(event)?);
        self.write(move |txn| {
            let mut t = txn.open_table(OUTBOX).map_err(backend)?;
            t.insert(id.as_str(), json.as_str()).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn outbox(&self) -> Result<Vec<OutboxEvent>> {
        self.all_json(OUTBOX).await
    }

    async fn remove_outbox(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.write(move |txn| {
            let mut t = txn.open_table(OUTBOX).map_err(backend)?;
            t.remove(id.as_str()).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn mark_alert(&self, tenant: &str, month: &str, level: &str) -> Result<bool> {
        let key = format!("{tenant}/{month}/{level}");
        self.write(move |txn| {
            let mut t = txn.open_table(ALERTS).map_err(backend)?;
            Ok(t.insert(key.as_str(), 1).map_err(backend)?.is_none())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite;
    use super::*;

    fn open() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("sub/control.redb")).expect("open");
        (dir, store)
    }

    #[test]
    fn seen_advances_watermark_over_contiguous_runs() {
        let mut seen = Seen::default();
        for seq in [3, 1, 5] {
            assert_eq!(seen.insert(seq, 1), 0);
        }
        assert_eq!(seen.watermark, 1);
        seen.insert(2, 1);
        assert_eq!(seen.watermark, 3);
        assert_eq!(seen.above.iter().copied().collect::<Vec<_>>(), [5]);
        assert!(seen.contains(2) && seen.contains(5) && !seen.contains(4));
    }

    /// A sequence that never comes (4) leaves at most a window of later
    /// ones remembered; then the watermark jumps over it.
    #[test]
    fn seen_stays_within_its_window_past_a_gap() {
        let mut seen = Seen::default();
        let top = 4 + super::super::SEEN_WINDOW as u64;
        let mut skipped = 0;
        for seq in (1..=top).filter(|s| *s != 4) {
            skipped += seen.insert(seq, 1);
        }
        assert_eq!(
            (skipped, seen.watermark, seen.above.len()),
            (0, 3, super::super::SEEN_WINDOW)
        );
        assert_eq!(seen.insert(top + 1, 1), 1);
        assert_eq!((seen.watermark, seen.above.len()), (top + 1, 0));
        assert!(seen.contains(4), "the skipped sequence counts as seen");
    }

    /// Idle servers' dedup state is dropped once the retention passes;
    /// state from before idle times were kept is stamped, not dropped.
    #[test]
    fn idle_servers_are_forgotten() {
        let (_d, s) = open();
        let now = 1_800_000_000;
        let txn = s.db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(SEEN).expect("table");
            let put = |t: &mut redb::Table<&str, &str>, id: &str, at: u64| {
                let seen = Seen {
                    watermark: 7,
                    at,
                    ..Seen::default()
                };
                t.insert(id, serde_json::to_string(&seen).expect("json").as_str())
                    .expect("insert");
            };
            put(&mut t, "idle", now - super::super::SEEN_RETENTION_SECS - 1);
            put(&mut t, "busy", now - 60);
            put(&mut t, "legacy", 0);
            prune_seen(&mut t, now).expect("prune");
            let left: Vec<(String, u64)> = t
                .iter()
                .expect("iter")
                .map(|e| {
                    let (k, v) = e.expect("entry");
                    (
                        k.value().to_owned(),
                        serde_json::from_str::<Seen>(v.value()).expect("seen").at,
                    )
                })
                .collect();
            assert_eq!(
                left,
                [("busy".to_owned(), now - 60), ("legacy".to_owned(), now)]
            );
        }
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn suite_tenants_and_keys() {
        let (_d, s) = open();
        suite::tenants_and_keys(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_exactly_once() {
        let (_d, s) = open();
        suite::ledger_exactly_once(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_refuses_overflow_whole() {
        let (_d, s) = open();
        suite::ledger_refuses_overflow_whole(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_concurrent_duplicates() {
        let (_d, s) = open();
        suite::ledger_concurrent_duplicates(Arc::new(s), "").await;
    }

    #[tokio::test]
    async fn suite_change_feed() {
        let (_d, s) = open();
        suite::change_feed(&s, "").await;
    }

    #[tokio::test]
    async fn suite_revocations_and_alerts() {
        let (_d, s) = open();
        suite::revocations_and_alerts(&s, "").await;
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.redb");
        EmbeddedStore::open(&path).expect("open");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "API key secrets live in this file");
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.redb");
        {
            let s = EmbeddedStore::open(&path).expect("open");
            suite::ledger_exactly_once(&s, "").await;
        }
        let s = EmbeddedStore::open(&path).expect("reopen");
        assert_eq!(s.month_bytes("t", "2026-11").await.expect("month"), 3 * 161);
    }
}
