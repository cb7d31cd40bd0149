//! The Redis backend, for several control-plane replicas sharing one Redis.
//!
//! Multi-key steps run as Lua scripts, which Redis executes atomically: a
//! usage batch's dedup check, its ledger increments and the record that it
//! was applied happen together, so two replicas receiving the same batch at
//! the same moment apply it once.

use async_trait::async_trait;
use floe_common::redis_link::{Endpoint, Link};
use floe_proto::api::{Change, Changes, Tenant};
use floe_proto::usage::{Revocation, UsageBatch};
use redis::AsyncCommands;
use redis::aio::ConnectionManagerConfig;

use super::{KeyRecord, LedgerDelta, OutboxEvent, Result, Store, StoreError, Totals, UsageReport};

use std::sync::LazyLock;

/// Scripts are hashed once; Redis caches them by SHA after the first call.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create_tenant: redis::Script::new(CREATE_TENANT),
    record_change: redis::Script::new(RECORD_CHANGE),
    create_key: redis::Script::new(CREATE_KEY),
    delete_tenant: redis::Script::new(DELETE_TENANT),
    apply_batch: redis::Script::new(APPLY_BATCH),
});

struct Scripts {
    create_tenant: redis::Script,
    record_change: redis::Script,
    create_key: redis::Script,
    delete_tenant: redis::Script,
    apply_batch: redis::Script,
}

/// Longest range of days a usage query reads.
const MAX_REPORT_DAYS: usize = 400;

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// How long a write waits for replicas to take it (WAIT).
const REPLICA_WAIT_MS: u64 = 1_000;

/// A Redis-backed [`Store`]. Every key starts with `prefix`, so several
/// deployments (or tests) can share one Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: Link,
    prefix: String,
    /// Replicas that must hold a write before it is acknowledged.
    replicas: u32,
}

const CREATE_TENANT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[2])
  return 1
end
return 0";

/// KEYS sequence counter, feed (sorted set by sequence); ARGV entry JSON,
/// entries kept. Returns the new sequence number.
const RECORD_CHANGE: &str = r"
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, seq .. ' ' .. ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[2]))
return seq";

const CREATE_KEY: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[2])
  return 1
end
return 0";

/// KEYS: tenant, tenant set, tenant's key set; ARGV: tenant id, key prefix.
const DELETE_TENANT: &str = r"
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
for _, kid in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  redis.call('DEL', ARGV[2] .. kid)
end
redis.call('DEL', KEYS[3])
return 1";

/// KEYS[1] watermark, KEYS[2] set of applied seqs above it, then `ARGV[2]`
/// hash keys taking four HINCRBY field/amount pairs each from ARGV (from
/// ARGV[5]), then counter keys taking one INCRBY amount each. ARGV[3] is
/// the dedup window, ARGV[4] the dedup state's lifetime in seconds.
/// Returns 1 (applied), 0 (seen before), -1 (a counter would pass
/// 2^63 - 1; nothing written) or, applied but the window was full, 1 plus
/// the number of never-received sequences the watermark jumped over.
/// Redis does not roll back a script that fails halfway, so every bound is
/// checked before the first write, and the batch is marked seen only after
/// its totals are added. Lua numbers are doubles: the bound keeps a margin
/// of 4096 below 2^63 - 1 that rounding cannot cross.
const APPLY_BATCH: &str = r"
local seq = tonumber(ARGV[1])
local w = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq <= w or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local limit = 9223372036854771712
local hashes = tonumber(ARGV[2])
local a = 5
for i = 3, 2 + hashes do
  for _ = 1, 4 do
    local cur = tonumber(redis.call('HGET', KEYS[i], ARGV[a]) or '0')
    if cur + tonumber(ARGV[a + 1]) >= limit then return -1 end
    a = a + 2
  end
end
for i = 3 + hashes, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') + tonumber(ARGV[a]) >= limit then return -1 end
  a = a + 1
end
a = 5
for i = 3, 2 + hashes do
  for _ = 1, 4 do
    redis.call('HINCRBY', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
end
for i = 3 + hashes, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[a])
  a = a + 1
end
redis.call('SADD', KEYS[2], ARGV[1])
local skipped = 0
if redis.call('SCARD', KEYS[2]) > tonumber(ARGV[3]) then
  local lowest = seq
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    lowest = math.min(lowest, tonumber(m))
  end
  skipped = lowest - 1 - w
  w = lowest - 1
end
while redis.call('SREM', KEYS[2], tostring(w + 1)) == 1 do w = w + 1 end
redis.call('SET', KEYS[1], tostring(w), 'EX', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1 + skipped";

impl RedisStore {
    /// Connects to `redis`; keys start with `prefix`. Every write waits
    /// until `replicas` replicas hold it (Redis's WAIT) before it is
    /// acknowledged, so an acknowledged write (a usage batch TURN will not
    /// send again) survives the loss of the master.
    pub async fn connect(redis: &Endpoint, prefix: &str, replicas: u32) -> Result<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
            .set_response_timeout(Some(std::time::Duration::from_secs(3)));
        let conn = Link::connect(redis, config).await.map_err(backend)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            replicas,
        })
    }

    /// Waits until the configured number of replicas holds every write
    /// made so far on this connection; an error when they do not within
    /// [`REPLICA_WAIT_MS`] (the write stands on the master, unacknowledged:
    /// callers retry, and every write here is idempotent or refused as a
    /// duplicate).
    async fn replicated(&self) -> Result<()> {
        if self.replicas == 0 {
            return Ok(());
        }
        let acked: i64 = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(REPLICA_WAIT_MS)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        if acked < i64::from(self.replicas) {
            return Err(StoreError::Backend(format!(
                "{acked} of the {} Redis replicas required took the write within {REPLICA_WAIT_MS} ms",
                self.replicas
            )));
        }
        Ok(())
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let v: Option<String> = self.conn.clone().get(key).await.map_err(backend)?;
        v.map(|s| serde_json::from_str(&s).map_err(StoreError::from))
            .transpose()
    }

    async fn hash_totals(&self, key: &str, room_fields: bool) -> Result<Vec<(String, Totals)>> {
        let fields: Vec<(String, u64)> = self.conn.clone().hgetall(key).await.map_err(backend)?;
        let mut out: std::collections::BTreeMap<String, Totals> = Default::default();
        for (field, value) in fields {
            // Day hashes have fields `bo`…; room hashes `<room>/bo`….
            let (name, what) = if room_fields {
                match field.rsplit_once('/') {
                    Some((room, what)) => (room.to_owned(), what.to_owned()),
                    None => continue,
                }
            } else {
                (String::new(), field)
            };
            let t = out.entry(name).or_default();
            match what.as_str() {
                "bo" => t.bytes_out = value,
                "bi" => t.bytes_in = value,
                "po" => t.packets_out = value,
                "pi" => t.packets_in = value,
                _ => {}
            }
        }
        Ok(out.into_iter().collect())
    }
}

fn push_totals(argv: &mut Vec<String>, prefix: &str, t: &Totals) {
    for (field, v) in [
        ("bo", t.bytes_out),
        ("bi", t.bytes_in),
        ("po", t.packets_out),
        ("pi", t.packets_in),
    ] {
        argv.push(format!("{prefix}{field}"));
        argv.push(v.to_string());
    }
}

#[async_trait]
impl Store for RedisStore {
    fn switches(&self) -> u64 {
        self.conn.switches()
    }

    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map(|_| ())
            .map_err(backend)
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<()> {
        let created: i32 = SCRIPTS
            .create_tenant
            .key(self.key(&["tenant", &tenant.id]))
            .key(self.key(&["tenants"]))
            .arg(serde_json::to_string(tenant)?)
            .arg(&tenant.id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        if created == 0 {
            return Err(StoreError::Conflict(format!("tenant {}", tenant.id)));
        }
        self.replicated().await
    }

    async fn get_tenant(&self, id: &str) -> Result<Option<Tenant>> {
        self.get_json(&self.key(&["tenant", id])).await
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let mut ids: Vec<String> = self
            .conn
            .clone()
            .smembers(self.key(&["tenants"]))
            .await
            .map_err(backend)?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(t) = self.get_tenant(&id).await? {
                out.push(t);
            }
        }
        Ok(out)
    }

    async fn put_tenant(&self, tenant: &Tenant) -> Result<()> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(&["tenant", &tenant.id]))
            .arg(serde_json::to_string(tenant)?)
            .arg("XX")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        match set {
            Some(_) => self.replicated().await,
            None => Err(StoreError::NotFound(format!("tenant {}", tenant.id))),
        }
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool> {
        let deleted: i32 = SCRIPTS
            .delete_tenant
            .key(self.key(&["tenant", id]))
            .key(self.key(&["tenants"]))
            .key(self.key(&["tenantkeys", id]))
            .arg(id)
            .arg(self.key(&["key", ""]))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        self.replicated().await?;
        Ok(deleted == 1)
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<()> {
        let created: i32 = SCRIPTS
            .create_key
            .key(self.key(&["key", &key.id]))
            .key(self.key(&["tenantkeys", &key.tenant]))
            .arg(serde_json::to_string(key)?)
            .arg(&key.id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        if created == 0 {
            return Err(StoreError::Conflict(format!("key {}", key.id)));
        }
        self.replicated().await
    }

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        self.get_json(&self.key(&["key", id])).await
    }

    async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyRecord>> {
        let mut ids: Vec<String> = self
            .conn
            .clone()
            .smembers(self.key(&["tenantkeys", tenant]))
            .await
            .map_err(backend)?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(k) = self.get_key(&id).await? {
                out.push(k);
            }
        }
        Ok(out)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool> {
        // A key record only ever changes from live to revoked, so a plain
        // read-modify-write cannot lose an update that matters.
        let Some(mut rec) = self.get_key(id).await? else {
            return Ok(false);
        };
        rec.revoked = true;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(&["key", id]))
            .arg(serde_json::to_string(&rec)?)
            .arg("XX")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        self.replicated().await?;
        Ok(set.is_some())
    }

    async fn apply_batch(&self, batch: &UsageBatch) -> Result<bool> {
        let delta = LedgerDelta::of(batch);
        let mut script = SCRIPTS.apply_batch.prepare_invoke();
        script
            .key(self.key(&["seen", &batch.server_id]))
            .key(self.key(&["seenabove", &batch.server_id]));
        let mut argv = vec![
            batch.seq.to_string(),
            (delta.days.len() + delta.rooms.len()).to_string(),
            super::SEEN_WINDOW.to_string(),
            super::SEEN_RETENTION_SECS.to_string(),
        ];
        for ((tenant, day), t) in &delta.days {
            script.key(self.key(&["day", tenant, day]));
            push_totals(&mut argv, "", t);
        }
        for ((tenant, day, room), t) in &delta.rooms {
            script.key(self.key(&["roomday", tenant, day]));
            push_totals(&mut argv, &format!("{room}/"), t);
        }
        for ((tenant, month), bytes) in &delta.months {
            script.key(self.key(&["month", tenant, month]));
            argv.push(bytes.to_string());
        }
        for a in argv {
            script.arg(a);
        }
        let applied: i64 = script
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        if applied >= 0 {
            // A duplicate too: the first copy's write may not have
            // reached the replicas when its acknowledgement failed.
            self.replicated().await?;
        }
        match applied {
            -1 => Err(StoreError::Overflow(format!(
                "batch {} of {}",
                batch.seq, batch.server_id
            ))),
            0 => Ok(false),
            n => {
                if n > 1 {
                    tracing::warn!(server = %batch.server_id, seq = batch.seq, skipped = n - 1, "usage sequences never received; no longer awaited");
                }
                Ok(true)
            }
        }
    }

    async fn month_bytes(&self, tenant: &str, month: &str) -> Result<u64> {
        let v: Option<u64> = self
            .conn
            .clone()
            .get(self.key(&["month", tenant, month]))
            .await
            .map_err(backend)?;
        Ok(v.unwrap_or(0))
    }

    async fn month_bytes_many(&self, tenants: &[String], month: &str) -> Result<Vec<u64>> {
        // MGET in slices, so one command never carries the whole table.
        let mut out = Vec::with_capacity(tenants.len());
        for chunk in tenants.chunks(1_000) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|t| self.key(&["month", t, month]))
                .collect();
            let values: Vec<Option<u64>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(backend)?;
            out.extend(values.into_iter().map(|v| v.unwrap_or(0)));
        }
        Ok(out)
    }

    async fn usage(&self, tenant: &str, from: &str, to: &str) -> Result<UsageReport> {
        use floe_proto::time::Date;
        let bad = || StoreError::NotFound(format!("day range {from}..{to}"));
        let first = Date::parse_day(from).ok_or_else(bad)?;
        let last = Date::parse_day(to).ok_or_else(bad)?;
        let mut report = UsageReport::default();
        for day in first.days_through(&last, MAX_REPORT_DAYS) {
            if let Some((_, totals)) = self
                .hash_totals(&self.key(&["day", tenant, &day]), false)
                .await?
                .into_iter()
                .next()
            {
                report.total.add(&totals);
                report.days.insert(day.clone(), totals);
            }
            for (room, totals) in self
                .hash_totals(&self.key(&["roomday", tenant, &day]), true)
                .await?
            {
                report.rooms.entry(room).or_default().add(&totals);
            }
        }
        Ok(report)
    }

    async fn add_revocation(&self, revocation: &Revocation) -> Result<()> {
        let _: i64 = self
            .conn
            .clone()
            .zadd(
                self.key(&["revocations"]),
                serde_json::to_string(revocation)?,
                revocation.until,
            )
            .await
            .map_err(backend)?;
        self.replicated().await
    }

    async fn revocations(&self, now: u64) -> Result<Vec<Revocation>> {
        let key = self.key(&["revocations"]);
        let mut conn = self.conn.clone();
        let _: i64 = conn
            .zrembyscore(&key, "-inf", format!("({now}"))
            .await
            .map_err(backend)?;
        let live: Vec<String> = conn.zrange(&key, 0, -1).await.map_err(backend)?;
        live.iter()
            .map(|s| serde_json::from_str(s).map_err(StoreError::from))
            .collect()
    }

    async fn alert_raised(&self, tenant: &str, month: &str, level: &str) -> Result<bool> {
        self.conn
            .clone()
            .exists(self.key(&["alert", tenant, month, level]))
            .await
            .map_err(backend)
    }

    async fn push_outbox(&self, event: &OutboxEvent) -> Result<()> {
        let _: i64 = self
            .conn
            .clone()
            .hset(
                self.key(&["outbox"]),
                &event.id,
                serde_json::to_string(event)?,
            )
            .await
            .map_err(backend)?;
        self.replicated().await
    }

    async fn outbox(&self) -> Result<Vec<OutboxEvent>> {
        let all: Vec<String> = self
            .conn
            .clone()
            .hvals(self.key(&["outbox"]))
            .await
            .map_err(backend)?;
        all.iter()
            .map(|s| serde_json::from_str(s).map_err(StoreError::from))
            .collect()
    }

    async fn remove_outbox(&self, id: &str) -> Result<()> {
        let _: i64 = self
            .conn
            .clone()
            .hdel(self.key(&["outbox"]), id)
            .await
            .map_err(backend)?;
        self.replicated().await
    }

    async fn record_change(&self, tenant: &str, key: Option<&str>) -> Result<u64> {
        let seq = SCRIPTS
            .record_change
            .key(self.key(&["changes", "seq"]))
            .key(self.key(&["changes"]))
            .arg(serde_json::to_string(&(tenant, key))?)
            .arg(super::CHANGES_KEPT)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        self.replicated().await?;
        Ok(seq)
    }

    async fn changes_after(&self, after: u64, limit: usize) -> Result<Changes> {
        let feed = self.key(&["changes"]);
        let (newest, oldest, entries): (Option<u64>, Vec<(String, u64)>, Vec<String>) =
            redis::pipe()
                .get(self.key(&["changes", "seq"]))
                .zrange_withscores(&feed, 0, 0)
                .cmd("ZRANGEBYSCORE")
                .arg(&feed)
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(backend)?;
        let newest = newest.unwrap_or(0);
        let mut changes = Vec::with_capacity(entries.len());
        for entry in entries {
            let (seq, json) = entry
                .split_once(' ')
                .ok_or_else(|| StoreError::Corrupt(format!("change feed entry {entry:?}")))?;
            let (tenant, key): (String, Option<String>) = serde_json::from_str(json)?;
            changes.push(Change {
                seq: seq
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("change feed entry {entry:?}")))?,
                tenant,
                key,
            });
        }
        Ok(Changes {
            seq: newest,
            reset: super::feed_reset(after, oldest.first().map(|(_, s)| *s), newest),
            changes,
        })
    }

    async fn mark_alert(&self, tenant: &str, month: &str, level: &str) -> Result<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(&["alert", tenant, month, level]))
            .arg(1)
            .arg("NX")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        self.replicated().await?;
        Ok(set.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite;
    use super::*;
    use std::sync::Arc;

    /// A store on the test Redis with a fresh key prefix; panics with a
    /// clear message when no test Redis is configured.
    pub(crate) async fn test_store() -> (RedisStore, String) {
        test_store_on("FLOE_TEST_REDIS_URL").await
    }

    /// A store on the test Redis named by the environment variable `var`.
    async fn test_store_on(var: &str) -> (RedisStore, String) {
        let redis = floe_common::redis_link::testing::endpoint(var);
        let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
        let replicas = u32::from(redis.is_sentinel());
        let store = RedisStore::connect(&redis, &prefix, replicas)
            .await
            .unwrap_or_else(|e| panic!("connect to {redis}: {e}"));
        (store, prefix)
    }

    /// Behind Sentinel a write is acknowledged once the replica holds
    /// it; asking for more replicas than exist refuses the write (it
    /// stands on the master, unacknowledged) instead of acknowledging it.
    #[tokio::test]
    async fn writes_wait_for_the_replicas_they_need() {
        let redis = floe_common::redis_link::testing::endpoint("FLOE_TEST_REDIS_SENTINEL_URL");
        let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
        let batch = |seq| UsageBatch {
            server_id: "turn-w".into(),
            seq,
            at: 1_795_435_200,
            records: vec![floe_proto::usage::UsageRecord {
                tenant: "t".into(),
                room: "r".into(),
                bytes_out: 100,
                bytes_in: 0,
                packets_out: 1,
                packets_in: 0,
            }],
        };
        let one = RedisStore::connect(&redis, &prefix, 1)
            .await
            .expect("connect");
        assert!(one.apply_batch(&batch(1)).await.expect("replicated"));
        let two = RedisStore::connect(&redis, &prefix, 2)
            .await
            .expect("connect");
        let started = std::time::Instant::now();
        let refused = two
            .apply_batch(&batch(2))
            .await
            .expect_err("only one replica exists");
        assert!(
            refused.to_string().contains("1 of the 2 Redis replicas"),
            "{refused}"
        );
        assert!(started.elapsed() >= std::time::Duration::from_millis(REPLICA_WAIT_MS));
        // The retry TURN would send is a duplicate, acknowledged once the
        // replicas it needs hold it: counted once.
        assert!(
            !one.apply_batch(&batch(2))
                .await
                .expect("duplicate, replicated")
        );
        let month = one.month_bytes("t", "2026-11").await.expect("month");
        assert_eq!(month, 200);
    }

    #[tokio::test]
    async fn suite_tenants_and_keys_over_tls() {
        let (s, _) = test_store_on("FLOE_TEST_REDIS_TLS_URL").await;
        suite::tenants_and_keys(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_exactly_once_through_sentinel() {
        let (s, _) = test_store_on("FLOE_TEST_REDIS_SENTINEL_URL").await;
        suite::ledger_exactly_once(&s, "").await;
    }

    #[tokio::test]
    async fn suite_tenants_and_keys() {
        let (s, _) = test_store().await;
        suite::tenants_and_keys(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_exactly_once() {
        let (s, _) = test_store().await;
        suite::ledger_exactly_once(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_refuses_overflow_whole() {
        let (s, _) = test_store().await;
        suite::ledger_refuses_overflow_whole(&s, "").await;
    }

    #[tokio::test]
    async fn suite_ledger_concurrent_duplicates() {
        let (s, _) = test_store().await;
        suite::ledger_concurrent_duplicates(Arc::new(s), "").await;
    }

    #[tokio::test]
    async fn suite_change_feed() {
        let (s, _) = test_store().await;
        suite::change_feed(&s, "").await;
    }

    #[tokio::test]
    async fn suite_revocations_and_alerts() {
        let (s, _) = test_store().await;
        suite::revocations_and_alerts(&s, "").await;
    }

    #[tokio::test]
    async fn two_replicas_apply_concurrent_duplicates_once() {
        let (a, prefix) = test_store().await;
        let redis = floe_common::redis_link::testing::endpoint("FLOE_TEST_REDIS_URL");
        let b = RedisStore::connect(&redis, &prefix, 0)
            .await
            .expect("second replica");
        let stores: [Arc<dyn Store>; 2] = [Arc::new(a), Arc::new(b)];
        let mut tasks = Vec::new();
        for seq in 1..=40u64 {
            for store in &stores {
                let store = store.clone();
                let batch = UsageBatch {
                    server_id: "turn-1".into(),
                    seq,
                    at: 1_795_435_200,
                    records: vec![floe_proto::usage::UsageRecord {
                        tenant: "t".into(),
                        room: "r".into(),
                        bytes_out: seq,
                        bytes_in: 0,
                        packets_out: 1,
                        packets_in: 0,
                    }],
                };
                tasks.push(tokio::spawn(async move { store.apply_batch(&batch).await }));
            }
        }
        let mut applied = 0;
        for t in tasks {
            if t.await.expect("join").expect("apply") {
                applied += 1;
            }
        }
        assert_eq!(applied, 40);
        assert_eq!(
            stores[0].month_bytes("t", "2026-11").await.expect("month"),
            (1..=40).sum::<u64>()
        );
    }

    /// A sequence that never comes leaves at most a window of later ones
    /// remembered, and the dedup keys of a server expire after its last
    /// batch.
    #[tokio::test]
    async fn dedup_state_is_bounded() {
        let (s, prefix) = test_store().await;
        let batch = |seq| UsageBatch {
            server_id: "turn-gap".into(),
            seq,
            at: 1_795_435_200,
            records: vec![floe_proto::usage::UsageRecord {
                tenant: "t".into(),
                room: "r".into(),
                bytes_out: 1,
                bytes_in: 0,
                packets_out: 1,
                packets_in: 0,
            }],
        };
        let top = 4 + super::super::SEEN_WINDOW as u64;
        for seq in (1..=top + 1).filter(|s| *s != 4) {
            assert!(
                s.apply_batch(&batch(seq)).await.expect("apply"),
                "seq {seq}"
            );
        }
        let mut conn = s.conn.clone();
        let above: usize = conn
            .scard(format!("{prefix}seenabove:turn-gap"))
            .await
            .expect("scard");
        let watermark: u64 = conn
            .get(format!("{prefix}seen:turn-gap"))
            .await
            .expect("get");
        assert_eq!((watermark, above), (top + 1, 0));
        assert!(
            !s.apply_batch(&batch(4)).await.expect("apply"),
            "skipped counts as seen"
        );
        let ttl: i64 = conn
            .ttl(format!("{prefix}seen:turn-gap"))
            .await
            .expect("ttl");
        assert!(
            ttl > 0 && ttl as u64 <= super::super::SEEN_RETENTION_SECS,
            "ttl {ttl}"
        );
        assert_eq!(s.month_bytes("t", "2026-11").await.expect("month"), top);
    }
}
