//! The Redis bus: rooms and membership as Redis keys that expire with the
//! room, one pub/sub channel per node for routing, and node heartbeats.
//!
//! - Per room key (`tenant/id`): `room:{key}` (record JSON),
//!   `members:{key}` (peer → member JSON), `pair:{key}` (a one-time room's
//!   two clients) and `ver:{key}` (bumped on every membership change) expire
//!   when the room does. `trooms:{tenant}` and `prooms:{tenant}` hold a
//!   tenant's live token and public rooms; `rid:{id}` maps a server-chosen
//!   id to its tenant.
//! - A join reads the room's state, decides with `room::admit`, and
//!   commits only if `ver` is unchanged (else it reads again), so the join
//!   rule is written once, in Rust.
//! - A message for a peer on another node is published on that node's
//!   channel `node:{id}`; zero receivers means the node is gone, and the
//!   sender is told. A node that cannot deliver bounces an error back.
//! - Every node beats `nodes` every `--node-beat-ms`. A node silent for
//!   `--node-dead-after-ms` is reaped by whichever live node takes its
//!   lock: its peers leave their rooms and the others are told.
//! - When Redis comes back (or forgot this node), the node re-registers its
//!   rooms and peers from its hub: the state rebuilds itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use floe_common::{Check, Shutdown};
use futures_util::StreamExt as _;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{
    Bus, BusError, Creation, JoinOutcome, MAX_LISTED_ROOMS, SendError, peer_info, peer_joined,
    peer_left, room_closed,
};
use crate::hub::{Hub, Target, close};
use crate::metrics::Metrics;
use crate::room::{Admission, Member, RoomRecord, RoomState};

/// Commits a join decided by `room::admit` if the room's membership has
/// not changed since it was read. KEYS room, version, members, pair, this
/// node's member index; ARGV version read, peer id, member JSON, new pair
/// JSON (empty: unchanged), expiry (ms), index entry, the replaced
/// member's node index key and entry (empty: none). Returns 'ok',
/// 'retry' (changed meanwhile: read and decide again) or 'noroom'.
const COMMIT_JOIN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'noroom' end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 'retry' end
redis.call('INCR', KEYS[2])
redis.call('PEXPIREAT', KEYS[2], ARGV[5])
if ARGV[7] ~= '' then redis.call('SREM', ARGV[7], ARGV[8]) end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('PEXPIREAT', KEYS[3], ARGV[5])
if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'PXAT', ARGV[5]) end
redis.call('SADD', KEYS[5], ARGV[6])
return 'ok'";

/// KEYS members, member index of the member's node, version; ARGV peer,
/// session, index entry. Removes the member if the session is current.
const LEAVE: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
if not cur then return 0 end
if cjson.decode(cur).session_id ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('INCR', KEYS[3]) end
return 1";

/// KEYS room, the tenant's set of rooms of this kind, global id index;
/// ARGV record JSON, expiry (ms), now (s), room id, expiry (s), limit (0:
/// none), tenant, "1" when the id is global.
const CREATE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if tonumber(ARGV[6]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return 0 end
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', ARGV[2]) then return -1 end
if ARGV[8] == '1' then redis.call('SET', KEYS[3], ARGV[7], 'PXAT', ARGV[2]) end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
if redis.call('PEXPIRETIME', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIREAT', KEYS[2], ARGV[2])
end
return 1";

/// How often a join reads, decides and tries to commit before giving up
/// (each retry means another join or leave of the same room won a race).
const JOIN_ATTEMPTS: usize = 32;

struct Scripts {
    commit_join: redis::Script,
    leave: redis::Script,
    create: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    commit_join: redis::Script::new(COMMIT_JOIN),
    leave: redis::Script::new(LEAVE),
    create: redis::Script::new(CREATE),
});

/// What a pub/sub envelope asks the receiving node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Deliver the body to the target peer, or to the room.
    Msg,
    /// Close the target peer's connection (replaced).
    Kick,
    /// Send the body to every local peer of the room and close them.
    Close,
    /// Deliver the body (an error) to the origin peer.
    Bounce,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Msg => "msg",
            Self::Kick => "kick",
            Self::Close => "close",
            Self::Bounce => "bounce",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "msg" => Self::Msg,
            "kick" => Self::Kick,
            "close" => Self::Close,
            "bounce" => Self::Bounce,
            _ => return None,
        })
    }
}

/// A routed message between nodes: ten header lines, then the body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Envelope<'a> {
    kind: Kind,
    room: &'a str,
    /// Target peer (empty: the whole room).
    peer: &'a str,
    /// Required session of the target (empty: any).
    session: &'a str,
    /// Peer to skip on room delivery (empty: none).
    except: &'a str,
    origin_node: &'a str,
    origin_peer: &'a str,
    origin_session: &'a str,
    /// Microseconds since the epoch when the message entered the bus.
    sent_us: u64,
    body: &'a str,
}

impl<'a> Envelope<'a> {
    fn encode(&self) -> String {
        let mut s = String::with_capacity(self.body.len() + 128);
        for part in [
            "v1",
            self.kind.as_str(),
            self.room,
            self.peer,
            self.session,
            self.except,
            self.origin_node,
            self.origin_peer,
            self.origin_session,
        ] {
            s.push_str(part);
            s.push('\n');
        }
        s.push_str(&self.sent_us.to_string());
        s.push('\n');
        s.push_str(self.body);
        s
    }

    fn decode(s: &'a str) -> Option<Self> {
        let mut it = s.splitn(11, '\n');
        if it.next()? != "v1" {
            return None;
        }
        Some(Self {
            kind: Kind::parse(it.next()?)?,
            room: it.next()?,
            peer: it.next()?,
            session: it.next()?,
            except: it.next()?,
            origin_node: it.next()?,
            origin_peer: it.next()?,
            origin_session: it.next()?,
            sent_us: it.next()?.parse().ok()?,
            body: it.next()?,
        })
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    now_us() / 1_000
}

/// The Redis [`Bus`].
pub(crate) struct RedisBus {
    conn: ConnectionManager,
    client: redis::Client,
    prefix: String,
    node: String,
    /// Heartbeat and reaper period.
    beat: Duration,
    /// A node not heard from for this long is considered dead.
    dead_after: Duration,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Set when the state in Redis may lack this node's rooms and peers.
    needs_resync: AtomicBool,
}

impl RedisBus {
    /// Connects and starts the node's heartbeat, reaper and subscriber.
    pub async fn start(
        settings: &crate::config::Settings,
        url: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        health: &floe_common::Health,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, BusError> {
        let client = redis::Client::open(url).map_err(|e| BusError(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| BusError(format!("Redis at {url} did not answer")))?
        .map_err(|e| BusError(e.to_string()))?;
        let bus = Arc::new(Self {
            conn,
            client,
            prefix: settings.redis_prefix.clone(),
            node: settings.node_id.clone(),
            beat: settings.node_beat,
            dead_after: settings.node_dead_after,
            hub,
            metrics,
            needs_resync: AtomicBool::new(false),
        });
        let beat_ok = health.check("redis", false);
        let sub_ok = health.check("redis_pubsub", false);
        tokio::spawn(bus.clone().subscriber(sub_ok, shutdown.clone()));
        tokio::spawn(bus.clone().heartbeat(beat_ok, shutdown));
        Ok(bus)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    fn channel(&self, node: &str) -> String {
        self.key(&["node", node])
    }

    /// The set of the tenant's live rooms of `room`'s kind.
    fn rooms_set(&self, room: &RoomRecord) -> String {
        let kind = if room.public { "prooms" } else { "trooms" };
        self.key(&[kind, &room.tenant])
    }

    fn index_entry(room: &str, peer: &str, session: &str) -> String {
        format!("{room}\t{peer}\t{session}")
    }

    fn err(&self, e: redis::RedisError) -> BusError {
        self.metrics.redis_errors.inc();
        BusError(e.to_string())
    }

    async fn publish(&self, node: &str, env: &Envelope<'_>) -> Result<bool, BusError> {
        let receivers: i64 = self
            .conn
            .clone()
            .publish(self.channel(node), env.encode())
            .await
            .map_err(|e| self.err(e))?;
        Ok(receivers > 0)
    }

    fn envelope<'a>(&'a self, kind: Kind, room: &'a str, body: &'a str) -> Envelope<'a> {
        Envelope {
            kind,
            room,
            peer: "",
            session: "",
            except: "",
            origin_node: &self.node,
            origin_peer: "",
            origin_session: "",
            sent_us: now_us(),
            body,
        }
    }

    /// Sends `body` to every member of `room` but `except`, by node.
    async fn to_room(
        &self,
        room: &str,
        except: Option<&str>,
        body: &Utf8Bytes,
    ) -> Result<(), BusError> {
        let nodes: BTreeSet<String> = self
            .members(room)
            .await?
            .into_iter()
            .filter(|m| Some(m.peer_id.as_str()) != except)
            .map(|m| m.node)
            .collect();
        for node in nodes {
            if node == self.node {
                self.hub.deliver(room, Target::Room { except }, body);
            } else {
                let mut env = self.envelope(Kind::Msg, room, body.as_str());
                env.except = except.unwrap_or("");
                // A dead node's peers are reaped and announced separately.
                self.publish(&node, &env).await?;
            }
        }
        Ok(())
    }

    /// Removes `member` (indexed under `node`); `true` if it was current.
    async fn remove_member(&self, room: &str, member: &Member) -> Result<bool, BusError> {
        let removed: i32 = SCRIPTS
            .leave
            .key(self.key(&["members", room]))
            .key(self.key(&["nodemembers", &member.node]))
            .key(self.key(&["ver", room]))
            .arg(&member.peer_id)
            .arg(&member.session_id)
            .arg(Self::index_entry(room, &member.peer_id, &member.session_id))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        Ok(removed == 1)
    }

    /// Handles one envelope received on this node's channel.
    async fn on_envelope(&self, env: Envelope<'_>) {
        let body = Utf8Bytes::from(env.body.to_owned());
        match env.kind {
            Kind::Msg => {
                self.metrics
                    .relay_latency
                    .observe(now_us().saturating_sub(env.sent_us) as f64 / 1e6);
                if env.peer.is_empty() {
                    let except = (!env.except.is_empty()).then_some(env.except);
                    self.hub.deliver(env.room, Target::Room { except }, &body);
                    return;
                }
                let session = (!env.session.is_empty()).then_some(env.session);
                let outcome = self.hub.deliver(
                    env.room,
                    Target::Peer {
                        peer: env.peer,
                        session,
                    },
                    &body,
                );
                if let Err(err) = SendError::from_delivery(outcome)
                    && !env.origin_peer.is_empty()
                {
                    let text = undeliverable(&err, env.peer);
                    let bounce = Envelope {
                        kind: Kind::Bounce,
                        room: env.room,
                        peer: env.origin_peer,
                        session: env.origin_session,
                        except: "",
                        origin_node: &self.node,
                        origin_peer: "",
                        origin_session: "",
                        sent_us: now_us(),
                        body: &text,
                    };
                    if let Err(e) = self.publish(env.origin_node, &bounce).await {
                        tracing::warn!(error = %e, "cannot bounce an undeliverable message");
                    }
                }
            }
            Kind::Bounce => {
                let session = (!env.session.is_empty()).then_some(env.session);
                self.hub.deliver(
                    env.room,
                    Target::Peer {
                        peer: env.peer,
                        session,
                    },
                    &body,
                );
            }
            Kind::Kick => {
                let session = (!env.session.is_empty()).then_some(env.session);
                self.hub.close_replaced(env.room, env.peer, session);
            }
            Kind::Close => {
                self.hub
                    .close_room(env.room, Some(&body), close::ROOM_CLOSED, "room closed");
            }
        }
    }

    /// Receives this node's envelopes, reconnecting as needed.
    async fn subscriber(self: Arc<Self>, ok: Check, shutdown: Shutdown) {
        let channel = self.channel(&self.node);
        let mut delay = Duration::from_millis(100);
        loop {
            let pubsub = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(3), pubsub) => r,
            };
            match pubsub {
                Ok(Ok(ps)) => {
                    ok.set(true);
                    delay = Duration::from_millis(100);
                    // Messages published while unsubscribed found no
                    // receiver and were refused to their senders; state
                    // may have changed meanwhile, so re-register.
                    self.needs_resync.store(true, Ordering::Relaxed);
                    tracing::info!(node = %self.node, "subscribed to the room bus");
                    let mut stream = ps.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = stream.next() => m,
                        };
                        let Some(msg) = msg else { break };
                        match std::str::from_utf8(msg.get_payload_bytes())
                            .ok()
                            .and_then(Envelope::decode)
                        {
                            Some(env) => self.on_envelope(env).await,
                            None => tracing::warn!("malformed room bus envelope dropped"),
                        }
                    }
                    ok.set(false);
                    self.metrics.redis_errors.inc();
                    tracing::warn!(node = %self.node, "room bus subscription lost; reconnecting");
                }
                Ok(Err(e)) => {
                    ok.set(false);
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "cannot subscribe to the room bus");
                }
                Err(_) => {
                    ok.set(false);
                    self.metrics.redis_errors.inc();
                    tracing::warn!("room bus subscription timed out");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Beats, resyncs after an outage, and reaps dead nodes.
    async fn heartbeat(self: Arc<Self>, ok: Check, shutdown: Shutdown) {
        let nodes = self.key(&["nodes"]);
        loop {
            let beat: Result<i64, _> = self.conn.clone().hset(&nodes, &self.node, now_ms()).await;
            match beat {
                Ok(new) => {
                    // A new field: Redis forgot us (restart) or we were reaped.
                    if new == 1 || !ok.get() {
                        self.needs_resync.store(true, Ordering::Relaxed);
                    }
                    ok.set(true);
                    if self.needs_resync.swap(false, Ordering::Relaxed)
                        && let Err(e) = self.resync().await
                    {
                        self.needs_resync.store(true, Ordering::Relaxed);
                        tracing::warn!(error = %e, "resync failed; will retry");
                    }
                    if let Err(e) = self.reap().await {
                        tracing::warn!(error = %e, "reaping dead nodes failed");
                    }
                }
                Err(e) => {
                    if ok.get() {
                        tracing::warn!(error = %e, "Redis unreachable");
                    }
                    self.metrics.redis_errors.inc();
                    ok.set(false);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.beat) => {}
            }
        }
        // Leaving cleanly: forget this node; its peers left already.
        let _: Result<i64, _> = self.conn.clone().hdel(&nodes, &self.node).await;
    }

    /// Re-registers every local room and peer.
    async fn resync(&self) -> Result<(), BusError> {
        let now = floe_proto::time::unix_now();
        let mut restored = 0;
        for (record, members) in self.hub.snapshot(&self.node) {
            if record.expires_at <= now {
                continue;
            }
            let key = record.key();
            let expiry_ms = record.expires_at * 1_000;
            let json = serde_json::to_string(&record).map_err(|e| BusError(e.to_string()))?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(self.key(&["room", &key]))
                .arg(json)
                .arg("NX")
                .arg("PXAT")
                .arg(expiry_ms)
                .ignore();
            if !record.named {
                pipe.cmd("SET")
                    .arg(self.key(&["rid", &record.id]))
                    .arg(&record.tenant)
                    .arg("NX")
                    .arg("PXAT")
                    .arg(expiry_ms)
                    .ignore();
            }
            pipe.cmd("ZADD")
                .arg(self.rooms_set(&record))
                .arg(record.expires_at)
                .arg(&record.id)
                .ignore();
            for m in &members {
                let json = serde_json::to_string(m).map_err(|e| BusError(e.to_string()))?;
                pipe.cmd("HSET")
                    .arg(self.key(&["members", &key]))
                    .arg(&m.peer_id)
                    .arg(json)
                    .ignore();
                pipe.cmd("SADD")
                    .arg(self.key(&["nodemembers", &self.node]))
                    .arg(Self::index_entry(&key, &m.peer_id, &m.session_id))
                    .ignore();
                restored += 1;
            }
            pipe.cmd("INCR").arg(self.key(&["ver", &key])).ignore();
            for k in ["members", "ver"] {
                pipe.cmd("PEXPIREAT")
                    .arg(self.key(&[k, &key]))
                    .arg(expiry_ms)
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
        }
        tracing::info!(node = %self.node, peers = restored, "room state re-registered in Redis");
        Ok(())
    }

    /// Removes the peers of nodes silent for longer than `dead_after`.
    async fn reap(&self) -> Result<(), BusError> {
        let nodes_key = self.key(&["nodes"]);
        let beats: HashMap<String, u64> = self
            .conn
            .clone()
            .hgetall(&nodes_key)
            .await
            .map_err(|e| self.err(e))?;
        let cutoff = now_ms().saturating_sub(self.dead_after.as_millis() as u64);
        for (node, last) in beats {
            if node == self.node || last >= cutoff {
                continue;
            }
            let lock: Option<String> = redis::cmd("SET")
                .arg(self.key(&["reaping", &node]))
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(10_000)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            if lock.is_none() {
                continue;
            }
            let entries: Vec<String> = self
                .conn
                .clone()
                .smembers(self.key(&["nodemembers", &node]))
                .await
                .map_err(|e| self.err(e))?;
            tracing::warn!(dead = %node, peers = entries.len(), "reaping a dead signal node");
            for entry in &entries {
                let mut parts = entry.splitn(3, '\t');
                let (Some(room), Some(peer), Some(session)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let member = Member {
                    peer_id: peer.to_owned(),
                    session_id: session.to_owned(),
                    node: node.clone(),
                    secret: String::new(),
                };
                if self.remove_member(room, &member).await? {
                    self.to_room(room, Some(peer), &peer_left(&member, "node_lost"))
                        .await?;
                }
            }
            let _: () = redis::pipe()
                .hdel(&nodes_key, &node)
                .ignore()
                .del(self.key(&["nodemembers", &node]))
                .ignore()
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

/// The `error` message for a peer that could not be reached.
pub(crate) fn undeliverable(err: &SendError, to: &str) -> String {
    floe_proto::signal::ServerMessage::error(
        err.code(),
        format!("message to {to} not delivered: {err}"),
    )
    .to_json()
}

#[async_trait]
impl Bus for RedisBus {
    async fn create_room(
        &self,
        room: &RoomRecord,
        limit: Option<u32>,
        now: u64,
    ) -> Result<Creation, BusError> {
        let json = serde_json::to_string(room).map_err(|e| BusError(e.to_string()))?;
        let created: i32 = SCRIPTS
            .create
            .key(self.key(&["room", &room.key()]))
            .key(self.rooms_set(room))
            .key(self.key(&["rid", &room.id]))
            .arg(json)
            .arg(room.expires_at * 1_000)
            .arg(now)
            .arg(&room.id)
            .arg(room.expires_at)
            .arg(limit.unwrap_or(0))
            .arg(&room.tenant)
            .arg(if room.named { "0" } else { "1" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        match created {
            1 => Ok(Creation::Done),
            0 => Ok(Creation::TenantFull),
            _ => Ok(Creation::Exists),
        }
    }

    async fn resolve(&self, id: &str) -> Result<Option<String>, BusError> {
        self.conn
            .clone()
            .get(self.key(&["rid", id]))
            .await
            .map_err(|e| self.err(e))
    }

    async fn room(&self, key: &str) -> Result<Option<RoomRecord>, BusError> {
        let json: Option<String> = self
            .conn
            .clone()
            .get(self.key(&["room", key]))
            .await
            .map_err(|e| self.err(e))?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| BusError(format!("corrupt room record: {e}")))
        })
        .transpose()
    }

    async fn rooms(&self, tenant: &str, now: u64) -> Result<Vec<RoomRecord>, BusError> {
        let mut ids = Vec::new();
        for kind in ["trooms", "prooms"] {
            let some: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.key(&[kind, tenant]))
                .arg(format!("({now}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(MAX_LISTED_ROOMS)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            ids.extend(some);
        }
        ids.sort();
        ids.dedup();
        ids.truncate(MAX_LISTED_ROOMS);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| self.key(&["room", &crate::room::room_key(tenant, id)]))
            .collect();
        let records: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        Ok(records
            .into_iter()
            .flatten()
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect())
    }

    async fn delete_room(&self, room: &RoomRecord, reason: &str) -> Result<bool, BusError> {
        let key = room.key();
        let members = self.members(&key).await?;
        let mut pipe = redis::pipe();
        pipe.del(self.key(&["room", &key]));
        for k in ["members", "pair", "ver"] {
            pipe.del(self.key(&[k, &key])).ignore();
        }
        if !room.named {
            pipe.del(self.key(&["rid", &room.id])).ignore();
        }
        pipe.zrem(self.rooms_set(room), &room.id).ignore();
        let (deleted,): (i64,) = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        let body = room_closed(reason);
        let nodes: BTreeSet<&str> = members.iter().map(|m| m.node.as_str()).collect();
        for node in nodes {
            if node == self.node {
                self.hub
                    .close_room(&key, Some(&body), close::ROOM_CLOSED, reason);
            } else {
                self.publish(node, &self.envelope(Kind::Close, &key, body.as_str()))
                    .await?;
            }
        }
        Ok(deleted > 0)
    }

    async fn members(&self, key: &str) -> Result<Vec<Member>, BusError> {
        let all: Vec<String> = self
            .conn
            .clone()
            .hvals(self.key(&["members", key]))
            .await
            .map_err(|e| self.err(e))?;
        Ok(all
            .iter()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect())
    }

    async fn join(
        &self,
        room: &RoomRecord,
        member: &Member,
        by_token: bool,
        now: u64,
    ) -> Result<JoinOutcome, BusError> {
        let key = room.key();
        let json = serde_json::to_string(member).map_err(|e| BusError(e.to_string()))?;
        let index_entry = Self::index_entry(&key, &member.peer_id, &member.session_id);
        for _ in 0..JOIN_ATTEMPTS {
            // The version first (atomically with the rest): a change after
            // this read makes the commit below retry.
            let (version, members, pair): (Option<String>, Vec<String>, Option<String>) =
                redis::pipe()
                    .atomic()
                    .get(self.key(&["ver", &key]))
                    .hvals(self.key(&["members", &key]))
                    .get(self.key(&["pair", &key]))
                    .query_async(&mut self.conn.clone())
                    .await
                    .map_err(|e| self.err(e))?;
            let state = RoomState {
                members: members
                    .iter()
                    .filter_map(|j| serde_json::from_str(j).ok())
                    .collect(),
                pair: pair
                    .and_then(|j| serde_json::from_str(&j).ok())
                    .unwrap_or_default(),
            };
            let decision = match crate::room::admit(room, &state, member, by_token, now) {
                Ok(d) => d,
                Err(refusal) => return Ok(JoinOutcome::Refused(refusal)),
            };
            let previous = match &decision.admission {
                Admission::Replaced { previous } => Some(previous),
                Admission::Joined => None,
            };
            let pair_json = match &decision.pair {
                Some(p) => serde_json::to_string(p).map_err(|e| BusError(e.to_string()))?,
                None => String::new(),
            };
            let answer: String = SCRIPTS
                .commit_join
                .key(self.key(&["room", &key]))
                .key(self.key(&["ver", &key]))
                .key(self.key(&["members", &key]))
                .key(self.key(&["pair", &key]))
                .key(self.key(&["nodemembers", &self.node]))
                .arg(version.as_deref().unwrap_or("0"))
                .arg(&member.peer_id)
                .arg(&json)
                .arg(pair_json)
                .arg(room.expires_at * 1_000)
                .arg(&index_entry)
                .arg(previous.map_or(String::new(), |p| self.key(&["nodemembers", &p.node])))
                .arg(previous.map_or(String::new(), |p| {
                    Self::index_entry(&key, &p.peer_id, &p.session_id)
                }))
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            match answer.as_str() {
                "ok" => {}
                "retry" => continue,
                "noroom" => return Ok(JoinOutcome::NoRoom),
                other => return Err(BusError(format!("unexpected join answer {other:?}"))),
            }
            let peers = state
                .members
                .iter()
                .filter(|m| m.peer_id != member.peer_id)
                .map(peer_info)
                .collect();
            return Ok(JoinOutcome::Admitted {
                admission: decision.admission,
                peers,
            });
        }
        Err(BusError(format!(
            "room {key} changed under {JOIN_ATTEMPTS} join attempts in a row"
        )))
    }

    async fn announce(
        &self,
        room: &RoomRecord,
        member: &Member,
        admission: &Admission,
    ) -> Result<(), BusError> {
        let key = room.key();
        if let Admission::Replaced { previous } = admission {
            if previous.node == self.node {
                self.hub
                    .close_replaced(&key, &previous.peer_id, Some(&previous.session_id));
            } else {
                let mut env = self.envelope(Kind::Kick, &key, "");
                env.peer = &previous.peer_id;
                env.session = &previous.session_id;
                self.publish(&previous.node, &env).await?;
            }
        }
        self.to_room(&key, Some(&member.peer_id), &peer_joined(member))
            .await
    }

    async fn leave(&self, room: &str, member: &Member, reason: &str) -> Result<(), BusError> {
        if self.remove_member(room, member).await? {
            self.to_room(room, Some(&member.peer_id), &peer_left(member, reason))
                .await?;
        }
        Ok(())
    }

    async fn send_to_peer(
        &self,
        room: &str,
        from: &Member,
        to: &str,
        sid: Option<&str>,
        text: Utf8Bytes,
    ) -> Result<(), SendError> {
        let json: Option<String> = self
            .conn
            .clone()
            .hget(self.key(&["members", room]), to)
            .await
            .map_err(|e| self.err(e))?;
        let target: Member = json
            .and_then(|j| serde_json::from_str(&j).ok())
            .ok_or(SendError::NoPeer)?;
        if sid.is_some_and(|s| s != target.session_id) {
            return Err(SendError::StaleSession);
        }
        if target.node == self.node {
            return SendError::from_delivery(self.hub.deliver(
                room,
                Target::Peer {
                    peer: to,
                    session: sid,
                },
                &text,
            ));
        }
        let env = Envelope {
            kind: Kind::Msg,
            room,
            peer: to,
            session: &target.session_id,
            except: "",
            origin_node: &self.node,
            origin_peer: &from.peer_id,
            origin_session: &from.session_id,
            sent_us: now_us(),
            body: text.as_str(),
        };
        if self.publish(&target.node, &env).await? {
            Ok(())
        } else {
            Err(SendError::Unreachable)
        }
    }

    async fn broadcast(&self, room: &str, from: &str, text: Utf8Bytes) -> Result<(), BusError> {
        self.to_room(room, Some(from), &text).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::suite;

    /// A bus on the test Redis under a fresh prefix, as node "n1" (the
    /// node of the suite's members), and its hub.
    async fn test_bus() -> (Arc<RedisBus>, Arc<Hub>, Shutdown) {
        let url = std::env::var("FLOE_TEST_REDIS_URL").expect(
            "FLOE_TEST_REDIS_URL is not set: run the suite through scripts/test.sh, \
             which starts a private Redis",
        );
        let mut settings =
            crate::config::Settings::new("127.0.0.1:0".parse().expect("addr"), "http://x", "t");
        settings.redis_prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
        settings.node_id = "n1".into();
        let hub = Arc::new(Hub::new());
        let stop = Shutdown::new();
        let bus = RedisBus::start(
            &settings,
            &url,
            hub.clone(),
            Arc::new(Metrics::new()),
            &floe_common::Health::new("signal"),
            stop.clone(),
        )
        .await
        .expect("connect to the test Redis");
        (bus, hub, stop)
    }

    #[tokio::test]
    async fn suite_rooms() {
        let (bus, _hub, stop) = test_bus().await;
        suite::rooms(bus.as_ref(), "t").await;
        stop.cancel();
    }

    #[tokio::test]
    async fn suite_joins() {
        let (bus, hub, stop) = test_bus().await;
        suite::joins(bus.as_ref(), &hub, "t").await;
        stop.cancel();
    }

    #[tokio::test]
    async fn suite_concurrent_joins() {
        let (bus, _hub, stop) = test_bus().await;
        suite::concurrent_joins(bus, "t").await;
        stop.cancel();
    }

    #[test]
    fn envelopes_round_trip_with_newlines_in_the_body() {
        let env = Envelope {
            kind: Kind::Msg,
            room: "r1",
            peer: "p2",
            session: "s2",
            except: "",
            origin_node: "n1",
            origin_peer: "p1",
            origin_session: "s1",
            sent_us: 123,
            body: "{\"sdp\":\"v=0\\r\\n\"}\nline two",
        };
        let wire = env.encode();
        assert_eq!(Envelope::decode(&wire), Some(env));
        assert_eq!(Envelope::decode("v2\nmsg"), None);
        assert_eq!(Envelope::decode("v1\nnope\n\n\n\n\n\n\n\n1\n"), None);
        assert_eq!(Envelope::decode("v1\nmsg\nr"), None);
    }
}
