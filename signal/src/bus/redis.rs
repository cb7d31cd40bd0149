//! The Redis bus: rooms and membership as Redis keys that expire with the
//! room, one pub/sub channel per node for routing, and node heartbeats.
//!
//! - `room:{id}` (record JSON), `sealed:{id}` and `members:{id}` (peer →
//!   member JSON) expire when the room does; `trooms:{tenant}` counts a
//!   tenant's live rooms.
//! - A message for a peer on another node is published on that node's
//!   channel `node:{id}`; zero receivers means the node is gone, and the
//!   sender is told. A node that cannot deliver bounces an error back.
//! - Every node beats `nodes` once a second. A node silent for
//!   [`DEAD_AFTER`] is reaped by whichever live node takes its lock: its
//!   peers leave their rooms and the others are told.
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
    Bus, BusError, Creation, JoinOutcome, REPLACED_REASON, SendError, peer_info, peer_joined,
    peer_left, room_closed,
};
use crate::hub::{Hub, Target, close};
use crate::metrics::Metrics;
use crate::room::{Admission, Member, Refusal, RoomRecord};

/// A node not heard from for this long is considered dead.
pub(crate) const DEAD_AFTER: Duration = Duration::from_secs(5);
/// Heartbeat and reaper period.
const BEAT: Duration = Duration::from_secs(1);

/// Mirrors `room::admit`: KEYS room, sealed, members, this node's member
/// index; ARGV member JSON, peer id, max peers, one-time ("1"), expiry
/// (ms), index entry, key prefix. Returns {status, previous member JSON,
/// other members' JSON…}.
const JOIN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'noroom', ''} end
local prev = redis.call('HGET', KEYS[3], ARGV[2])
if not prev then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'sealed', ''} end
  if redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[3]) then return {'full', ''} end
end
local out = {'ok', prev or ''}
for _, m in ipairs(redis.call('HVALS', KEYS[3])) do
  if m ~= prev then table.insert(out, m) end
end
if prev then
  local p = cjson.decode(prev)
  redis.call('SREM', ARGV[7] .. 'nodemembers:' .. p.node, ARGV[8] .. '\t' .. p.peer_id .. '\t' .. p.session_id)
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[3], ARGV[5])
redis.call('SADD', KEYS[4], ARGV[6])
if (not prev) and ARGV[4] == '1' and redis.call('HLEN', KEYS[3]) >= 2 then
  redis.call('SET', KEYS[2], '1', 'PXAT', ARGV[5])
end
return out";

/// KEYS members, member index of the member's node; ARGV peer, session,
/// index entry. Removes the member if the session is current.
const LEAVE: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
if not cur then return 0 end
if cjson.decode(cur).session_id ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1";

/// KEYS room, tenant room set; ARGV record JSON, expiry (ms), now (s),
/// room id, expiry (s), max rooms (0: none).
const CREATE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if tonumber(ARGV[6]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return 0 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PXAT', ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('PEXPIREAT', KEYS[2], ARGV[2])
return 1";

struct Scripts {
    join: redis::Script,
    leave: redis::Script,
    create: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    join: redis::Script::new(JOIN),
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
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Set when the state in Redis may lack this node's rooms and peers.
    needs_resync: AtomicBool,
}

impl RedisBus {
    /// Connects and starts the node's heartbeat, reaper and subscriber.
    pub async fn start(
        url: &str,
        prefix: &str,
        node: &str,
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
            prefix: prefix.to_owned(),
            node: node.to_owned(),
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
                self.hub.close_peer(
                    env.room,
                    env.peer,
                    session,
                    close::REPLACED,
                    REPLACED_REASON,
                );
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
                _ = tokio::time::sleep(BEAT) => {}
            }
        }
        // Leaving cleanly: forget this node; its peers left already.
        let _: Result<i64, _> = self.conn.clone().hdel(&nodes, &self.node).await;
    }

    /// Re-registers every local room and peer.
    async fn resync(&self) -> Result<(), BusError> {
        let now = floe_proto::time::unix_now();
        let mut restored = 0;
        for (record, peers) in self.hub.snapshot() {
            if record.expires_at <= now {
                continue;
            }
            let expiry_ms = record.expires_at * 1_000;
            let json = serde_json::to_string(&record).map_err(|e| BusError(e.to_string()))?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(self.key(&["room", &record.id]))
                .arg(json)
                .arg("NX")
                .arg("PXAT")
                .arg(expiry_ms)
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.key(&["trooms", &record.tenant]))
                .arg(record.expires_at)
                .arg(&record.id)
                .ignore();
            for (peer, session) in &peers {
                let m = Member {
                    peer_id: peer.clone(),
                    session_id: session.clone(),
                    node: self.node.clone(),
                };
                let json = serde_json::to_string(&m).map_err(|e| BusError(e.to_string()))?;
                pipe.cmd("HSET")
                    .arg(self.key(&["members", &record.id]))
                    .arg(peer)
                    .arg(json)
                    .ignore();
                pipe.cmd("SADD")
                    .arg(self.key(&["nodemembers", &self.node]))
                    .arg(Self::index_entry(&record.id, peer, session))
                    .ignore();
                restored += 1;
            }
            pipe.cmd("PEXPIREAT")
                .arg(self.key(&["members", &record.id]))
                .arg(expiry_ms)
                .ignore();
            pipe.query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
        }
        tracing::info!(node = %self.node, peers = restored, "room state re-registered in Redis");
        Ok(())
    }

    /// Removes the peers of nodes silent for longer than [`DEAD_AFTER`].
    async fn reap(&self) -> Result<(), BusError> {
        let nodes_key = self.key(&["nodes"]);
        let beats: HashMap<String, u64> = self
            .conn
            .clone()
            .hgetall(&nodes_key)
            .await
            .map_err(|e| self.err(e))?;
        let cutoff = now_ms().saturating_sub(DEAD_AFTER.as_millis() as u64);
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
        max_rooms: Option<u32>,
        now: u64,
    ) -> Result<Creation, BusError> {
        let json = serde_json::to_string(room).map_err(|e| BusError(e.to_string()))?;
        let created: i32 = SCRIPTS
            .create
            .key(self.key(&["room", &room.id]))
            .key(self.key(&["trooms", &room.tenant]))
            .arg(json)
            .arg(room.expires_at * 1_000)
            .arg(now)
            .arg(&room.id)
            .arg(room.expires_at)
            .arg(max_rooms.unwrap_or(0))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        match created {
            1 => Ok(Creation::Done),
            0 => Ok(Creation::TenantFull),
            _ => Ok(Creation::Exists),
        }
    }

    async fn room(&self, id: &str) -> Result<Option<RoomRecord>, BusError> {
        let json: Option<String> = self
            .conn
            .clone()
            .get(self.key(&["room", id]))
            .await
            .map_err(|e| self.err(e))?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| BusError(format!("corrupt room record: {e}")))
        })
        .transpose()
    }

    async fn delete_room(&self, id: &str, reason: &str) -> Result<bool, BusError> {
        let Some(record) = self.room(id).await? else {
            return Ok(false);
        };
        let members = self.members(id).await?;
        let _: () = redis::pipe()
            .del(self.key(&["room", id]))
            .ignore()
            .del(self.key(&["members", id]))
            .ignore()
            .del(self.key(&["sealed", id]))
            .ignore()
            .zrem(self.key(&["trooms", &record.tenant]), id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        let body = room_closed(reason);
        let nodes: BTreeSet<&str> = members.iter().map(|m| m.node.as_str()).collect();
        for node in nodes {
            if node == self.node {
                self.hub
                    .close_room(id, Some(&body), close::ROOM_CLOSED, reason);
            } else {
                self.publish(node, &self.envelope(Kind::Close, id, body.as_str()))
                    .await?;
            }
        }
        Ok(true)
    }

    async fn members(&self, id: &str) -> Result<Vec<Member>, BusError> {
        let all: Vec<String> = self
            .conn
            .clone()
            .hvals(self.key(&["members", id]))
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
        _now: u64,
    ) -> Result<JoinOutcome, BusError> {
        let json = serde_json::to_string(member).map_err(|e| BusError(e.to_string()))?;
        let out: Vec<String> = SCRIPTS
            .join
            .key(self.key(&["room", &room.id]))
            .key(self.key(&["sealed", &room.id]))
            .key(self.key(&["members", &room.id]))
            .key(self.key(&["nodemembers", &self.node]))
            .arg(json)
            .arg(&member.peer_id)
            .arg(room.max_peers)
            .arg(if room.one_time { "1" } else { "0" })
            .arg(room.expires_at * 1_000)
            .arg(Self::index_entry(
                &room.id,
                &member.peer_id,
                &member.session_id,
            ))
            .arg(&self.prefix)
            .arg(&room.id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        let status = out.first().map(String::as_str).unwrap_or("");
        let refused = |r| Ok(JoinOutcome::Refused(r));
        match status {
            "ok" => {}
            "noroom" => return Ok(JoinOutcome::NoRoom),
            "sealed" => return refused(Refusal::Sealed),
            "full" => return refused(Refusal::Full),
            other => return Err(BusError(format!("unexpected join answer {other:?}"))),
        }
        let others: Vec<Member> = out
            .iter()
            .skip(2)
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        let admission = match out.get(1).filter(|p| !p.is_empty()) {
            Some(prev) => {
                let previous: Member =
                    serde_json::from_str(prev).map_err(|e| BusError(e.to_string()))?;
                if previous.node == self.node {
                    self.hub.close_peer(
                        &room.id,
                        &previous.peer_id,
                        Some(&previous.session_id),
                        close::REPLACED,
                        REPLACED_REASON,
                    );
                } else {
                    let mut env = self.envelope(Kind::Kick, &room.id, "");
                    env.peer = &previous.peer_id;
                    env.session = &previous.session_id;
                    self.publish(&previous.node, &env).await?;
                }
                Admission::Replaced { previous }
            }
            None => Admission::Joined,
        };
        self.to_room(&room.id, Some(&member.peer_id), &peer_joined(member))
            .await?;
        Ok(JoinOutcome::Admitted {
            admission,
            peers: others.iter().map(peer_info).collect(),
        })
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
