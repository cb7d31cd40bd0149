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
//! - Every node beats `nodes` every `--node-beat-ms`, stamped with Redis's
//!   clock (node clocks may disagree). A node silent for
//!   `--node-dead-after-ms` is reaped by whichever live node takes its
//!   lock: its peers leave their rooms and the others are told. Each step
//!   of a reap is fenced: a node that beats again is not reaped further.
//! - Every node reconciles its connections with the shared state, every
//!   other beat (at least 1 s) and at once after an outage: a connection
//!   whose member record was replaced by a newer connection elsewhere is
//!   closed as replaced (a lost kick); one whose record was reaped while
//!   this node was cut off is closed to rejoin (1013), so its peers see a
//!   fresh session; an index entry with no connection, seen on two passes
//!   in a row, is removed and announced (a failed leave, or the peers of
//!   a previous process under the same node id). When Redis lost its data
//!   (the `epoch` key changed), rooms and members are restored from the
//!   nodes' connections instead, through the join rule.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use floe_common::redis_link::{Endpoint, Link};
use floe_common::{Check, Shutdown};
use futures_util::StreamExt as _;
use redis::AsyncCommands;
use redis::aio::ConnectionManagerConfig;
use tokio::sync::mpsc;

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

/// KEYS members, member index of the member's node, version and, to
/// fence a reaper, the node table; ARGV peer, session, index entry and,
/// fenced, the member's node and the silence (ms) that makes it dead.
/// Removes the member if the session is current and, fenced, only while
/// its node is still silent by Redis's clock. Returns 1 (removed), 0 (not
/// current) or -1 (the node beat again: stop reaping it).
const LEAVE: &str = r"
if KEYS[4] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local beat = redis.call('HGET', KEYS[4], ARGV[4])
  if beat and tonumber(beat) >= now - tonumber(ARGV[5]) then return -1 end
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
if not cur then return 0 end
if cjson.decode(cur).session_id ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('INCR', KEYS[3]) end
return 1";

/// KEYS node table; ARGV node. Records a beat at Redis's clock. Returns 1
/// when the field is new: Redis forgot this node, or it was reaped.
const BEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now))";

/// KEYS node table; ARGV silence (ms). The nodes silent for longer, by
/// Redis's clock.
const SILENT_NODES: &str = r"
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < cutoff then table.insert(out, all[i]) end
end
return out";

/// KEYS node table, the node's member index; ARGV node, silence (ms).
/// Forgets a reaped node unless it beat again. Returns 1 or 0.
const FORGET_NODE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local beat = redis.call('HGET', KEYS[1], ARGV[1])
if beat and tonumber(beat) >= now - tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
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
    beat: redis::Script,
    silent_nodes: redis::Script,
    forget_node: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    commit_join: redis::Script::new(COMMIT_JOIN),
    leave: redis::Script::new(LEAVE),
    create: redis::Script::new(CREATE),
    beat: redis::Script::new(BEAT),
    silent_nodes: redis::Script::new(SILENT_NODES),
    forget_node: redis::Script::new(FORGET_NODE),
});

/// Bounces waiting to be published, at most; past it they are dropped
/// (and counted), so the subscriber never waits.
const BOUNCE_QUEUE: usize = 1_024;

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

/// The Redis [`Bus`].
pub(crate) struct RedisBus {
    conn: Link,
    prefix: String,
    node: String,
    /// Heartbeat and reaper period.
    beat: Duration,
    /// A node not heard from for this long is considered dead.
    dead_after: Duration,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Set when the state in Redis may differ from this node's
    /// connections: reconcile at the next beat.
    needs_resync: AtomicBool,
    /// The `epoch` key's value as last seen: when it changes, Redis lost
    /// its data and rooms are restored from connections.
    epoch: Mutex<Option<String>>,
    /// Set from a data loss until a reconcile has restored everything.
    restoring: AtomicBool,
}

impl RedisBus {
    /// Connects and starts the node's heartbeat, reaper and subscriber.
    pub async fn start(
        settings: &crate::config::Settings,
        redis: &Endpoint,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        health: &floe_common::Health,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, BusError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(Duration::from_secs(5), Link::connect(redis, config))
            .await
            .map_err(|_| BusError(format!("Redis at {redis} did not answer")))?
            .map_err(|e| BusError(format!("Redis at {redis}: {e}")))?;
        let bus = Arc::new(Self {
            conn,
            prefix: settings.redis_prefix.clone(),
            node: settings.node_id.clone(),
            beat: settings.node_beat,
            dead_after: settings.node_dead_after,
            hub,
            metrics,
            needs_resync: AtomicBool::new(false),
            epoch: Mutex::new(None),
            restoring: AtomicBool::new(false),
        });
        bus.check_epoch().await?;
        // A previous process under this node id left its peers indexed:
        // the first reconcile, before any peer of this process can be,
        // evicts them all.
        let previous = bus.node_index(&bus.node).await?;
        let beat_ok = health.check("redis", false);
        let sub_ok = health.check("redis_pubsub", false);
        let (bounces, bounce_rx) = mpsc::channel(BOUNCE_QUEUE);
        tokio::spawn(bus.clone().publish_bounces(bounce_rx));
        tokio::spawn(bus.clone().subscriber(sub_ok, bounces, shutdown.clone()));
        tokio::spawn(bus.clone().heartbeat(beat_ok, shutdown.clone()));
        tokio::spawn(bus.clone().maintain(previous, shutdown));
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

    /// The room and member an index entry of `node` names.
    fn indexed_member<'e>(entry: &'e str, node: &str) -> Option<(&'e str, Member)> {
        let mut parts = entry.splitn(3, '\t');
        let (room, peer, session) = (parts.next()?, parts.next()?, parts.next()?);
        Some((
            room,
            Member {
                peer_id: peer.to_owned(),
                session_id: session.to_owned(),
                node: node.to_owned(),
                secret: String::new(),
            },
        ))
    }

    /// The member index of `node`: an entry per member it holds.
    async fn node_index(&self, node: &str) -> Result<HashSet<String>, BusError> {
        self.conn
            .clone()
            .smembers(self.key(&["nodemembers", node]))
            .await
            .map_err(|e| self.err(e))
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
                // No receiver: a dead node (its peers are reaped and
                // announced separately), or one resubscribing.
                if !self.publish(&node, &env).await? {
                    self.metrics
                        .bus_undelivered
                        .with_label_values(&["room"])
                        .inc();
                }
            }
        }
        Ok(())
    }

    /// Reads the room's state, decides with `room::admit` and commits if
    /// nothing changed meanwhile (else reads again). With `rejoin` (a
    /// reconcile restoring this node's own connection), a member already
    /// present under the peer's id is returned instead of replaced.
    async fn try_join(
        &self,
        room: &RoomRecord,
        member: &Member,
        by_token: bool,
        now: u64,
        rejoin: bool,
    ) -> Result<Result<JoinOutcome, Member>, BusError> {
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
            if rejoin
                && let Some(present) = state.members.iter().find(|m| m.peer_id == member.peer_id)
            {
                return Ok(Err(present.clone()));
            }
            let decision = match crate::room::admit(room, &state, member, by_token, now) {
                Ok(d) => d,
                Err(refusal) => return Ok(Ok(JoinOutcome::Refused(refusal))),
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
                "noroom" => return Ok(Ok(JoinOutcome::NoRoom)),
                other => return Err(BusError(format!("unexpected join answer {other:?}"))),
            }
            let peers = state
                .members
                .iter()
                .filter(|m| m.peer_id != member.peer_id)
                .map(peer_info)
                .collect();
            return Ok(Ok(JoinOutcome::Admitted {
                admission: decision.admission,
                peers,
            }));
        }
        Err(BusError(format!(
            "room {key} changed under {JOIN_ATTEMPTS} join attempts in a row"
        )))
    }

    /// Removes `member` (indexed under its node); `true` if it was current.
    async fn remove_member(&self, room: &str, member: &Member) -> Result<bool, BusError> {
        Ok(self.leave_script(room, member, false).await? == 1)
    }

    /// Runs [`LEAVE`], fenced on the member's node being silent when
    /// `fenced` (a reap).
    async fn leave_script(
        &self,
        room: &str,
        member: &Member,
        fenced: bool,
    ) -> Result<i32, BusError> {
        let mut script = SCRIPTS.leave.prepare_invoke();
        script
            .key(self.key(&["members", room]))
            .key(self.key(&["nodemembers", &member.node]))
            .key(self.key(&["ver", room]))
            .arg(&member.peer_id)
            .arg(&member.session_id)
            .arg(Self::index_entry(room, &member.peer_id, &member.session_id));
        if fenced {
            script
                .key(self.key(&["nodes"]))
                .arg(&member.node)
                .arg(self.dead_after.as_millis() as u64);
        }
        script
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))
    }

    /// Handles one envelope received on this node's channel, without
    /// waiting; returns a bounce to publish (node, envelope), if any.
    fn on_envelope(&self, env: Envelope<'_>) -> Option<(String, String)> {
        let body = Utf8Bytes::from(env.body.to_owned());
        match env.kind {
            Kind::Msg => {
                self.metrics
                    .relay_latency
                    .observe(now_us().saturating_sub(env.sent_us) as f64 / 1e6);
                if env.peer.is_empty() {
                    let except = (!env.except.is_empty()).then_some(env.except);
                    self.hub.deliver(env.room, Target::Room { except }, &body);
                    return None;
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
                let err = SendError::from_delivery(outcome).err()?;
                if env.origin_peer.is_empty() {
                    return None;
                }
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
                Some((env.origin_node.to_owned(), bounce.encode()))
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
                None
            }
            Kind::Kick => {
                let session = (!env.session.is_empty()).then_some(env.session);
                self.hub.close_replaced(env.room, env.peer, session);
                None
            }
            Kind::Close => {
                self.hub
                    .close_room(env.room, Some(&body), close::ROOM_CLOSED, "room closed");
                None
            }
        }
    }

    /// Publishes the bounces the subscriber queued.
    async fn publish_bounces(self: Arc<Self>, mut rx: mpsc::Receiver<(String, String)>) {
        while let Some((node, payload)) = rx.recv().await {
            let sent: Result<i64, _> = self
                .conn
                .clone()
                .publish(self.channel(&node), payload)
                .await;
            if let Err(e) = sent {
                self.err(e);
                self.metrics
                    .bus_undelivered
                    .with_label_values(&["bounce"])
                    .inc();
            }
        }
    }

    /// Receives this node's envelopes, reconnecting as needed. Handling
    /// never waits (deliveries go to mailboxes, bounces to a queue), so
    /// the subscription keeps up with Redis instead of filling its
    /// output buffer until Redis drops it.
    async fn subscriber(
        self: Arc<Self>,
        ok: Check,
        bounces: mpsc::Sender<(String, String)>,
        shutdown: Shutdown,
    ) {
        let channel = self.channel(&self.node);
        let mut delay = Duration::from_millis(100);
        loop {
            let pubsub = async {
                let mut ps = self.conn.pubsub().await?;
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
                    // receiver (senders were told, or it was counted);
                    // kicks and closes among them are repaired by a
                    // reconcile.
                    self.needs_resync.store(true, Ordering::Relaxed);
                    tracing::info!(node = %self.node, "subscribed to the room bus");
                    let mut stream = ps.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = stream.next() => m,
                        };
                        let Some(msg) = msg else { break };
                        let env = std::str::from_utf8(msg.get_payload_bytes())
                            .ok()
                            .and_then(Envelope::decode);
                        let Some(env) = env else {
                            tracing::warn!("malformed room bus envelope dropped");
                            self.metrics
                                .bus_undelivered
                                .with_label_values(&["malformed"])
                                .inc();
                            continue;
                        };
                        if let Some(bounce) = self.on_envelope(env)
                            && bounces.try_send(bounce).is_err()
                        {
                            self.metrics
                                .bus_undelivered
                                .with_label_values(&["bounce"])
                                .inc();
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

    /// Beats every `--node-beat-ms`; asks for a reconcile when Redis
    /// comes back or forgot this node. Nothing else runs here, so a long
    /// reap or reconcile never delays the beat.
    async fn heartbeat(self: Arc<Self>, ok: Check, shutdown: Shutdown) {
        let nodes = self.key(&["nodes"]);
        loop {
            let beat: Result<i64, _> = SCRIPTS
                .beat
                .key(&nodes)
                .arg(&self.node)
                .invoke_async(&mut self.conn.clone())
                .await;
            // A new master (Sentinel failover) may have missed the last
            // writes the old one took: reconcile at once.
            let switches = self.conn.switches();
            let counted = self.metrics.redis_master_switches.get();
            let moved = switches > counted;
            if moved {
                self.metrics
                    .redis_master_switches
                    .inc_by(switches - counted);
            }
            match beat {
                Ok(new) => {
                    if new == 1 || !ok.get() || moved {
                        self.needs_resync.store(true, Ordering::Relaxed);
                    }
                    if !ok.get() {
                        tracing::info!("Redis reachable again");
                    }
                    ok.set(true);
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

    /// Reaps silent nodes every beat and reconciles this node's
    /// connections every other beat (at least 1 s apart), or at the next
    /// beat when asked. `absent` starts as the index a previous process
    /// under this node id left.
    async fn maintain(self: Arc<Self>, mut absent: HashSet<String>, shutdown: Shutdown) {
        let every = (self.beat * 2).max(Duration::from_secs(1));
        let mut last = tokio::time::Instant::now();
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.beat) => {}
                }
            }
            if let Err(e) = self.reap().await {
                tracing::warn!(error = %e, "reaping silent nodes failed");
            }
            let asked = self.needs_resync.swap(false, Ordering::Relaxed);
            if first || asked || last.elapsed() >= every {
                match self.reconcile(&mut absent).await {
                    Ok(()) => last = tokio::time::Instant::now(),
                    Err(e) => {
                        self.needs_resync.store(true, Ordering::Relaxed);
                        tracing::warn!(error = %e, "reconciling with Redis failed; will retry");
                    }
                }
            }
            first = false;
        }
    }

    /// Whether Redis lost its data since this node last looked: the
    /// `epoch` key, set once by whichever node sees it missing, changed.
    async fn check_epoch(&self) -> Result<bool, BusError> {
        let key = self.key(&["epoch"]);
        let (current,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(floe_common::secret::random_token(8))
            .arg("NX")
            .ignore()
            .get(&key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        let mut seen = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        let lost = seen.as_ref().is_some_and(|s| *s != current);
        *seen = Some(current);
        Ok(lost)
    }

    /// Compares this node's connections with the shared state and repairs
    /// the differences (see the module docs). `absent` carries the index
    /// entries without a connection from the previous pass: only those
    /// absent twice are removed, as a join is indexed just before its
    /// connection registers.
    async fn reconcile(&self, absent: &mut HashSet<String>) -> Result<(), BusError> {
        if self.check_epoch().await? {
            tracing::warn!(node = %self.node, "Redis lost its data; restoring rooms and members from this node's connections");
            self.restoring.store(true, Ordering::Relaxed);
        }
        // Until a pass completes: one cut short by an error resumes it.
        let restore = self.restoring.load(Ordering::Relaxed);
        // Connections first: one that registers after this read was
        // indexed before it, so it is not mistaken for a missing entry.
        let local = self.hub.snapshot(&self.node);
        let index = self.node_index(&self.node).await?;
        let now = floe_proto::time::unix_now();
        let mut connected = HashSet::new();
        for (record, members) in &local {
            let key = record.key();
            let mut room_restored = false;
            for m in members {
                let entry = Self::index_entry(&key, &m.peer_id, &m.session_id);
                let indexed = index.contains(&entry);
                connected.insert(entry);
                // Expired rooms are closed by the expiry task.
                if indexed
                    || record.expires_at <= now
                    || !self.hub.has(&key, &m.peer_id, &m.session_id)
                {
                    continue;
                }
                if restore && !room_restored {
                    // Re-created as it was made, once, before its members
                    // are re-admitted (a room another node restored first
                    // is left as it is).
                    self.create_room(record, None, now).await?;
                    room_restored = true;
                }
                self.repair(record, m, restore, now).await?;
            }
        }
        let now_absent: HashSet<String> = index.difference(&connected).cloned().collect();
        for entry in now_absent.intersection(absent) {
            let Some((room, member)) = Self::indexed_member(entry, &self.node) else {
                continue;
            };
            let (peer, session) = (member.peer_id.as_str(), member.session_id.as_str());
            if self.hub.has(room, peer, session) {
                continue;
            }
            if self.remove_member(room, &member).await? {
                self.metrics
                    .presence_repairs
                    .with_label_values(&["evicted"])
                    .inc();
                tracing::info!(room, peer, session, "removed a member with no connection");
                self.to_room(room, Some(peer), &peer_left(&member, "gone"))
                    .await?;
            }
        }
        *absent = now_absent;
        self.restoring.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Repairs a connection of this node that the member index lacks.
    async fn repair(
        &self,
        record: &RoomRecord,
        m: &Member,
        restore: bool,
        now: u64,
    ) -> Result<(), BusError> {
        let key = record.key();
        let repair = if restore {
            // The room was re-created by the caller; the join rule
            // re-admits the member.
            match self.try_join(record, m, true, now, true).await? {
                Ok(JoinOutcome::Admitted { .. }) => Repair::Restored,
                Ok(JoinOutcome::Refused(r)) => Repair::Refused(r),
                Ok(JoinOutcome::NoRoom) => Repair::RoomClosed,
                Err(present) if present.session_id == m.session_id => Repair::Indexed,
                Err(_) => Repair::Replaced,
            }
        } else {
            let (exists, current): (bool, Option<String>) = redis::pipe()
                .exists(self.key(&["room", &key]))
                .hget(self.key(&["members", &key]), &m.peer_id)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            match current.and_then(|j| serde_json::from_str::<Member>(&j).ok()) {
                Some(c) if c.session_id == m.session_id => Repair::Indexed,
                // A newer connection elsewhere, whose kick did not arrive.
                Some(_) => Repair::Replaced,
                // Deleted while the close did not arrive.
                None if !exists => Repair::RoomClosed,
                // Reaped while this node was cut off: its peers were told
                // it left, so it rejoins as a new session rather than
                // coming back silently under the old one.
                None => Repair::Rejoin,
            }
        };
        let session = Some(m.session_id.as_str());
        match repair {
            Repair::Restored => {}
            Repair::Indexed => {
                let _: () = self
                    .conn
                    .clone()
                    .sadd(
                        self.key(&["nodemembers", &self.node]),
                        Self::index_entry(&key, &m.peer_id, &m.session_id),
                    )
                    .await
                    .map_err(|e| self.err(e))?;
            }
            Repair::Replaced => self.hub.close_replaced(&key, &m.peer_id, session),
            Repair::RoomClosed => self.hub.close_room(
                &key,
                Some(&room_closed("closed")),
                close::ROOM_CLOSED,
                "room closed",
            ),
            Repair::Rejoin => self.hub.close_peer(
                &key,
                &m.peer_id,
                session,
                close::TRY_AGAIN,
                "removed from the room while its server was cut off; rejoin",
            ),
            Repair::Refused(r) => {
                let e = crate::error::SignalError::from(r);
                let text =
                    floe_proto::signal::ServerMessage::error(e.code(), e.to_string()).to_json();
                let target = Target::Peer {
                    peer: &m.peer_id,
                    session,
                };
                self.hub.deliver(&key, target, &text.into());
                self.hub.close_peer(
                    &key,
                    &m.peer_id,
                    session,
                    close::REFUSED,
                    "no place left in the room",
                );
            }
        }
        let action = repair.action();
        self.metrics
            .presence_repairs
            .with_label_values(&[action])
            .inc();
        tracing::info!(room = %key, peer = %m.peer_id, session = %m.session_id, action, "connection reconciled");
        Ok(())
    }

    /// Removes the peers of nodes silent for longer than `dead_after`
    /// (by Redis's clock). Every removal is fenced: a node that beats
    /// again keeps the peers not yet removed.
    async fn reap(&self) -> Result<(), BusError> {
        let nodes_key = self.key(&["nodes"]);
        let silent: Vec<String> = SCRIPTS
            .silent_nodes
            .key(&nodes_key)
            .arg(self.dead_after.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        for node in silent {
            if node == self.node {
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
            let entries = self.node_index(&node).await?;
            tracing::warn!(dead = %node, peers = entries.len(), "reaping a silent signal node");
            let mut alive = false;
            for entry in &entries {
                let Some((room, member)) = Self::indexed_member(entry, &node) else {
                    continue;
                };
                match self.leave_script(room, &member, true).await? {
                    1 => {
                        let left = peer_left(&member, "node_lost");
                        self.to_room(room, Some(&member.peer_id), &left).await?
                    }
                    -1 => {
                        alive = true;
                        break;
                    }
                    _ => {}
                }
            }
            let forgotten: i32 = if alive {
                0
            } else {
                SCRIPTS
                    .forget_node
                    .key(&nodes_key)
                    .key(self.key(&["nodemembers", &node]))
                    .arg(&node)
                    .arg(self.dead_after.as_millis() as u64)
                    .invoke_async(&mut self.conn.clone())
                    .await
                    .map_err(|e| self.err(e))?
            };
            if forgotten == 0 {
                tracing::info!(node = %node, "a node being reaped beat again; reap stopped");
            }
        }
        Ok(())
    }
}

/// What a connection that the member index lacks needs (see
/// [`RedisBus::repair`]).
enum Repair {
    /// Re-registered after Redis lost its data.
    Restored,
    /// Its member record is current; only the index entry was missing.
    Indexed,
    /// A newer connection of the peer holds the record: closed 4001.
    Replaced,
    /// The room is gone: closed as `room-closed`.
    RoomClosed,
    /// Its record was reaped: closed 1013 to rejoin as a new session.
    Rejoin,
    /// The join rule no longer admits it (say, the room filled up).
    Refused(crate::room::Refusal),
}

impl Repair {
    /// The `action` label of the repair metric.
    fn action(&self) -> &'static str {
        match self {
            Self::Restored => "restored",
            Self::Indexed => "indexed",
            Self::Replaced => "replaced",
            Self::RoomClosed => "room_closed",
            Self::Rejoin => "rejoin",
            Self::Refused(_) => "refused",
        }
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
        match self.try_join(room, member, by_token, now, false).await? {
            Ok(outcome) => Ok(outcome),
            Err(present) => Err(BusError(format!(
                "peer {} unexpectedly present",
                present.peer_id
            ))),
        }
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
                // Unheard, the replaced connection is closed by its node's
                // next reconcile.
                if !self.publish(&previous.node, &env).await? {
                    self.metrics
                        .bus_undelivered
                        .with_label_values(&["kick"])
                        .inc();
                }
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
        test_bus_on("FLOE_TEST_REDIS_URL").await
    }

    /// [`test_bus`] on the test Redis named by the environment variable `var`.
    async fn test_bus_on(var: &str) -> (Arc<RedisBus>, Arc<Hub>, Shutdown) {
        let redis = floe_common::redis_link::testing::endpoint(var);
        let mut settings =
            crate::config::Settings::new("127.0.0.1:0".parse().expect("addr"), "http://x", "t");
        settings.redis_prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
        settings.node_id = "n1".into();
        let hub = Arc::new(Hub::new());
        let stop = Shutdown::new();
        let bus = RedisBus::start(
            &settings,
            &redis,
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
    async fn suite_joins_over_tls() {
        let (bus, hub, stop) = test_bus_on("FLOE_TEST_REDIS_TLS_URL").await;
        suite::joins(bus.as_ref(), &hub, "t").await;
        stop.cancel();
    }

    #[tokio::test]
    async fn suite_joins_through_sentinel() {
        let (bus, hub, stop) = test_bus_on("FLOE_TEST_REDIS_SENTINEL_URL").await;
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
