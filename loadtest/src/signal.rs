//! Signal-only load: rooms of simulated peers that join over WebSocket
//! (spread over every signal URL given) and trade offer/answer-sized
//! messages through signaling. Reports join latency, the offer→answer
//! round trip, loss, and (with `--server-pid`) what the signal server
//! spent: memory per connection, CPU per connection set-up and per relayed
//! message (and, with `--control-pid`, the control plane's CPU per join).
//!
//! `--protocol peerjs` drives a PeerJS server with the same peers, rooms
//! and messages instead, as a baseline measured by the same client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Barrier, Mutex};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::procstat::{self, ProcSample};
use crate::stats::{Samples, Summary};

use crate::join::Ws;

/// Knobs of a signal-only run.
#[derive(Debug, Clone, clap::Args)]
pub struct SignalArgs {
    /// Signal node base URL; repeat to spread peers over nodes.
    #[arg(long = "signal-url", default_value = "http://127.0.0.1:8080")]
    pub signal_urls: Vec<String>,
    /// Tenant whose public rooms the peers use (without an API key).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// API key id: peers create and join rooms with join tokens minted
    /// locally with this key, instead of using public rooms.
    #[arg(long, env = "FLOE_KEY_ID")]
    pub key_id: Option<String>,
    /// API key secret (with --key-id).
    #[arg(long, env = "FLOE_KEY_SECRET", hide_env_values = true)]
    pub key_secret: Option<String>,
    /// Simulated peers (rounded down to whole rooms).
    #[arg(long, default_value_t = 1_000)]
    pub peers: usize,
    /// Peers per room; the first peer of a room talks to the others.
    #[arg(long, default_value_t = 2)]
    pub room_size: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    pub join_rate: f64,
    /// Offer/answer rounds per room.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Payload bytes of each offer and answer.
    #[arg(long, default_value_t = 1_600)]
    pub message_bytes: usize,
    /// Pause between a room's rounds, milliseconds (0: as fast as answers come).
    #[arg(long, default_value_t = 0)]
    pub round_pause_ms: u64,
    /// Seconds to hold every connection idle before messaging (memory sample).
    #[arg(long, default_value_t = 3)]
    pub hold_secs: u64,
    /// Pid of a signal server on this machine, to report its CPU and
    /// memory; repeat for several nodes (their costs add up).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Pid of the control plane, to report its CPU per join apart.
    #[arg(long = "control-pid")]
    pub control_pids: Vec<u32>,
    /// Which server the peers talk to.
    #[arg(long, value_enum, default_value_t = Protocol::Floe)]
    pub protocol: Protocol,
    /// Give up on any one answer after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

/// The signaling protocol of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// floe signal: rooms over HTTP, `welcome`, `signal` messages.
    Floe,
    /// A PeerJS server (`peer` on npm): no rooms, `OPEN`, `OFFER`/`ANSWER`
    /// messages addressed by peer id.
    Peerjs,
}

impl Protocol {
    /// The WebSocket URL a peer connects to.
    fn ws_url(self, args: &SignalArgs, base: &str, room: &str, client: &str) -> String {
        match self {
            Self::Floe => {
                let mut url = crate::join::ws_url(base, room, client);
                if let Some(t) = token(args, room, client) {
                    url.push_str("&token=");
                    url.push_str(&t);
                }
                url
            }
            Self::Peerjs => format!(
                "{}/peerjs?key=peerjs&id={client}&token={}",
                crate::join::ws_base(base),
                floe_common::secret::random_token(4)
            ),
        }
    }

    /// `(peer id, session)` from the server's first message, or the
    /// refusal's code.
    fn welcome(self, m: &Value, client: &str) -> Result<(String, String), String> {
        let text = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
        match self {
            Self::Floe if m["type"] == "welcome" => Ok((text("peer_id"), text("session_id"))),
            Self::Peerjs if m["type"] == "OPEN" => Ok((client.to_owned(), String::new())),
            Self::Floe => Err(m["code"].as_str().unwrap_or("no welcome").to_owned()),
            Self::Peerjs => Err(text("type")),
        }
    }

    /// An offer (`answer: false`) or answer to `(to, session)`.
    fn message(self, to: &Value, sid: &Value, answer: bool, round: &Value, sdp: &str) -> Value {
        let kind = if answer { "answer" } else { "offer" };
        match self {
            Self::Floe => json!({"type": "signal", "to": to, "sid": sid,
                "payload": {"type": kind, "round": round, "sdp": sdp}}),
            Self::Peerjs => json!({"type": kind.to_uppercase(), "dst": to,
                "payload": {"type": kind, "round": round, "sdp": sdp}}),
        }
    }

    /// `(sender, sender's session)` of a relayed offer or answer.
    fn relayed(self, m: &Value, answer: bool) -> Option<(&Value, &Value)> {
        match self {
            Self::Floe if m["type"] == "signal" => Some((&m["from"], &m["from_sid"])),
            Self::Peerjs if m["type"] == if answer { "ANSWER" } else { "OFFER" } => {
                Some((&m["src"], &Value::Null))
            }
            _ => None,
        }
    }
}

/// Everything a signal-only run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SignalReport {
    pub peers: usize,
    pub rooms: usize,
    pub connected: usize,
    pub join_failures: u64,
    /// Connect to `welcome`, milliseconds.
    pub join_ms: Option<Summary>,
    /// Offer sent to every answer received, milliseconds.
    pub offer_answer_ms: Option<Summary>,
    /// Offer sent to each answer received, by the signal nodes of the
    /// caller and the answerer ("n0→n1"), when several URLs were given.
    pub offer_answer_by_route_ms: std::collections::BTreeMap<String, Summary>,
    pub messages_relayed: u64,
    pub messages_lost: u64,
    pub rooms_seconds: f64,
    pub join_seconds: f64,
    pub messaging_seconds: f64,
    pub messages_per_sec: f64,
    pub errors: Vec<(String, u64)>,
    pub server: Option<ServerCost>,
    /// The load tester's own CPU over the run, seconds.
    pub client_cpu_seconds: f64,
    pub client_rss_bytes: u64,
}

/// What the signal server spent, from `/proc/<server-pid>`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerCost {
    pub rss_before_bytes: u64,
    pub rss_connected_bytes: u64,
    pub memory_per_connection_bytes: f64,
    /// Creating a room (`POST /v1/rooms`), before any peer joins.
    pub cpu_per_room_us: f64,
    /// A peer's WebSocket join into an existing room, up to `welcome`.
    pub cpu_per_connection_us: f64,
    pub cpu_per_message_us: f64,
    /// The control plane's CPU over the joins, per connection (with
    /// `--control-pid`).
    pub control_cpu_per_connection_us: Option<f64>,
}

#[derive(Default)]
struct Tally {
    /// Rooms where at least two peers got in (they do the messaging).
    active_rooms: AtomicU64,
    join: Mutex<Samples>,
    rtt: Mutex<Samples>,
    /// Offer→answer by (caller's node, answerer's node), several nodes only.
    rtt_by_route: Mutex<std::collections::BTreeMap<String, Samples>>,
    relayed: AtomicU64,
    lost: AtomicU64,
    join_failures: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    async fn error(&self, kind: impl Into<String>) {
        *self.errors.lock().await.entry(kind.into()).or_default() += 1;
    }
}

/// The next JSON message on `ws` within `timeout`.
async fn next_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    crate::join::next_json(ws, tokio::time::Instant::now() + timeout).await
}

/// One connected peer.
struct Peer {
    ws: Ws,
    id: String,
    session: String,
    /// Index of the signal URL it joined through.
    node: usize,
}

async fn connect(
    protocol: Protocol,
    url: &str,
    client: &str,
    node: usize,
    timeout: Duration,
    tally: &Tally,
) -> Option<Peer> {
    let started = Instant::now();
    let (mut ws, _) =
        match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tally.error(format!("connect: {e}")).await;
                return None;
            }
            Err(_) => {
                tally.error("connect: timeout").await;
                return None;
            }
        };
    let welcome = next_json(&mut ws, timeout).await?;
    let (id, session) = match protocol.welcome(&welcome, client) {
        Ok(v) => v,
        Err(code) => {
            tally.error(format!("join: {code}")).await;
            return None;
        }
    };
    tally.join.lock().await.record_ms(started.elapsed());
    Some(Peer {
        ws,
        id,
        session,
        node,
    })
}

/// A join token for `peer` in `room`, when the run uses an API key.
fn token(args: &SignalArgs, room: &str, peer: &str) -> Option<String> {
    let (kid, secret) = (args.key_id.as_ref()?, args.key_secret.as_ref()?);
    crate::join::join_token(kid, secret, room, peer).ok()
}

/// Creates a room: named `name` with a join token, or a public room.
async fn create_room(
    http: &reqwest::Client,
    base: &str,
    args: &SignalArgs,
    name: &str,
) -> Result<String, String> {
    let url = format!("{}/v1/rooms", base.trim_end_matches('/'));
    let req = match token(args, name, "creator") {
        Some(t) => http
            .post(url)
            .bearer_auth(t)
            .json(&json!({"ttl_secs": 3600})),
        None => http
            .post(url)
            .json(&json!({"tenant": args.tenant, "ttl_secs": 3600})),
    };
    let r = req.send().await.map_err(|e| format!("create room: {e}"))?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| format!("create room: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "create room: {}",
            v["code"].as_str().unwrap_or("error")
        ));
    }
    v["room_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "create room: no id".to_owned())
}

/// The first peer of a room: sends offers, waits for every answer.
async fn caller(
    mut me: Peer,
    others: Vec<(String, String, usize)>,
    args: Arc<SignalArgs>,
    tally: Arc<Tally>,
) -> Ws {
    let timeout = Duration::from_secs(args.timeout_secs);
    let sdp = "a".repeat(args.message_bytes);
    for round in 0..args.rounds {
        let started = Instant::now();
        for (to, sid, _) in &others {
            let offer = args
                .protocol
                .message(&json!(to), &json!(sid), false, &json!(round), &sdp);
            if me.ws.send(Message::text(offer.to_string())).await.is_err() {
                tally.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut answers = 0;
        while answers < others.len() {
            match next_json(&mut me.ws, timeout).await {
                Some(m)
                    if args.protocol.relayed(&m, true).is_some()
                        && m["payload"]["round"] == round =>
                {
                    answers += 1;
                    tally.relayed.fetch_add(2, Ordering::Relaxed);
                    let from = args.protocol.relayed(&m, true).map(|(f, _)| f);
                    if args.signal_urls.len() > 1
                        && let Some((_, _, node)) =
                            others.iter().find(|o| from.is_some_and(|f| *f == o.0))
                    {
                        tally
                            .rtt_by_route
                            .lock()
                            .await
                            .entry(format!("n{}→n{node}", me.node))
                            .or_default()
                            .record_ms(started.elapsed());
                    }
                }
                Some(m) if m["type"] == "error" => {
                    tally
                        .error(format!("relay: {}", m["code"].as_str().unwrap_or("?")))
                        .await;
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                    answers += 1;
                }
                Some(_) => {}
                None => {
                    let missing = (others.len() - answers) as u64;
                    tally.lost.fetch_add(missing, Ordering::Relaxed);
                    tally.error("relay: no answer").await;
                    break;
                }
            }
        }
        tally.rtt.lock().await.record_ms(started.elapsed());
        if args.round_pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.round_pause_ms)).await;
        }
    }
    me.ws
}

/// Any other peer: answers each offer.
async fn callee(mut me: Peer, args: Arc<SignalArgs>, stop: CancellationToken) -> Ws {
    let sdp = "b".repeat(args.message_bytes);
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = me.ws.next() => m,
        };
        let Some(Ok(Message::Text(t))) = msg else {
            if matches!(msg, Some(Ok(_))) {
                continue;
            }
            break;
        };
        let Ok(m) = serde_json::from_str::<Value>(&t) else {
            continue;
        };
        if let Some((from, sid)) = args.protocol.relayed(&m, false) {
            let answer = args
                .protocol
                .message(from, sid, true, &m["payload"]["round"], &sdp);
            if me.ws.send(Message::text(answer.to_string())).await.is_err() {
                break;
            }
        }
    }
    me.ws
}

/// Runs the scenario.
pub async fn run(args: SignalArgs) -> SignalReport {
    let args = Arc::new(args);
    let room_size = args.room_size.max(2);
    let rooms = args.peers / room_size;
    let peers = rooms * room_size;
    let timeout = Duration::from_secs(args.timeout_secs);
    let tally = Arc::new(Tally::default());
    let http = reqwest::Client::new();
    let client_before = procstat::sample(None);
    let server_before = procstat::sample_all(&args.server_pids);
    let control_before = procstat::sample_all(&args.control_pids);

    // Phase 1: the rooms, created at --join-rate / --room-size per second,
    // so the cost of a room and the cost of a join are measured apart.
    let urls = &args.signal_urls;
    let interval = Duration::from_secs_f64(room_size as f64 / args.join_rate.max(1.0));
    let rooms_started = Instant::now();
    let room_ids = {
        let pb = crate::progress_bar(rooms as u64, "rooms", "{per_sec} eta {eta}");
        let mut next_at = tokio::time::Instant::now();
        let mut creating = Vec::with_capacity(rooms);
        for r in 0..rooms {
            tokio::time::sleep_until(next_at).await;
            next_at += interval;
            let (args, tally, http, pb) = (args.clone(), tally.clone(), http.clone(), pb.clone());
            let base = urls[(r * room_size) % urls.len()].clone();
            creating.push(tokio::spawn(async move {
                let name = format!("lt-{}-{r}", std::process::id());
                let created = match args.protocol {
                    Protocol::Floe => create_room(&http, &base, &args, &name).await,
                    Protocol::Peerjs => Ok(name),
                };
                pb.inc(1);
                match created {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tally.error(e).await;
                        None
                    }
                }
            }));
        }
        let mut ids = Vec::with_capacity(rooms);
        for c in creating {
            ids.push(c.await.ok().flatten());
        }
        pb.finish_and_clear();
        ids
    };
    let rooms_seconds = rooms_started.elapsed().as_secs_f64();
    let server_rooms = procstat::sample_all(&args.server_pids);

    // Phase 2: the connections, paced at --join-rate.
    let join_started = Instant::now();
    let pb = crate::progress_bar(peers as u64, "joining", "{per_sec} eta {eta}");
    let barrier = Arc::new(Barrier::new(rooms + 1));
    let stop = CancellationToken::new();
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::with_capacity(rooms);
    let mut next_at = tokio::time::Instant::now();
    for (r, room) in room_ids.into_iter().enumerate() {
        tokio::time::sleep_until(next_at).await;
        next_at += interval;
        let (args, tally, barrier, stop, go, pb) = (
            args.clone(),
            tally.clone(),
            barrier.clone(),
            stop.clone(),
            go.clone(),
            pb.clone(),
        );
        let room_urls: Vec<(usize, String)> = (0..room_size)
            .map(|i| {
                let node = (r * room_size + i) % urls.len();
                (node, urls[node].clone())
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let Some(room) = room else {
                tally
                    .join_failures
                    .fetch_add(room_size as u64, Ordering::Relaxed);
                pb.inc(room_size as u64);
                barrier.wait().await;
                return 0;
            };
            let mut members = Vec::with_capacity(room_size);
            for (i, (node, base)) in room_urls.iter().enumerate() {
                let client = format!("lt{r}-{i}");
                let url = args.protocol.ws_url(&args, base, &room, &client);
                match connect(args.protocol, &url, &client, *node, timeout, &tally).await {
                    Some(p) => members.push(p),
                    None => {
                        tally.join_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                pb.inc(1);
            }
            let connected = members.len();
            if connected >= 2 {
                tally.active_rooms.fetch_add(1, Ordering::Relaxed);
            }
            barrier.wait().await;
            // Wait for the messaging phase.
            let _permit = go.acquire().await;
            if members.len() < 2 {
                return connected;
            }
            let first = members.remove(0);
            let others: Vec<(String, String, usize)> = members
                .iter()
                .map(|p| (p.id.clone(), p.session.clone(), p.node))
                .collect();
            let callees: Vec<_> = members
                .into_iter()
                .map(|p| tokio::spawn(callee(p, args.clone(), stop.clone())))
                .collect();
            let mut ws = caller(first, others, args.clone(), tally.clone()).await;
            let _ = ws.close(None).await;
            for c in callees {
                if let Ok(mut ws) = c.await {
                    let _ = ws.close(None).await;
                }
            }
            connected
        }));
    }
    barrier.wait().await;
    pb.finish_and_clear();
    let join_seconds = join_started.elapsed().as_secs_f64();
    let server_joined = procstat::sample_all(&args.server_pids);
    let control_joined = procstat::sample_all(&args.control_pids);
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let server_held = procstat::sample_all(&args.server_pids);

    // Phase 2: offer/answer rounds in every room at once.
    let msg_started = Instant::now();
    let server_msg_before = procstat::sample_all(&args.server_pids);
    let pb = crate::progress_bar(
        tally.active_rooms.load(Ordering::Relaxed) * args.rounds as u64,
        "signaling",
        "{per_sec} eta {eta}",
    );
    let progress = {
        let (tally, pb) = (tally.clone(), pb.clone());
        let per_round = (2 * (room_size - 1)) as u64;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                pb.set_position(tally.relayed.load(Ordering::Relaxed) / per_round.max(1));
            }
        })
    };
    go.add_permits(rooms);
    // Callers finish by themselves; callees once every round is done.
    let mut connected = 0;
    let waiter = tokio::spawn(async move {
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap_or(0);
        }
        n
    });
    let active = tally.active_rooms.load(Ordering::Relaxed) as usize;
    let relayed_target = (active * args.rounds * 2 * (room_size - 1)) as u64;
    let deadline = Instant::now() + timeout * (args.rounds as u32 + 2);
    while tally.relayed.load(Ordering::Relaxed) + tally.lost.load(Ordering::Relaxed) * 2
        < relayed_target
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let messaging_seconds = msg_started.elapsed().as_secs_f64();
    let server_msg_after = procstat::sample_all(&args.server_pids);
    stop.cancel();
    if let Ok(n) = tokio::time::timeout(Duration::from_secs(10), waiter).await {
        connected = n.unwrap_or(0);
    }
    progress.abort();
    pb.finish_and_clear();

    let relayed = tally.relayed.load(Ordering::Relaxed);
    let server = match (
        server_before,
        server_rooms,
        server_joined,
        server_held,
        server_msg_before,
        server_msg_after,
    ) {
        (Some(before), Some(rooms_made), Some(joined), Some(held), Some(mb), Some(ma)) => {
            let mut cost = server_cost(
                [before, rooms_made, joined, held, mb, ma],
                rooms,
                peers,
                relayed,
            );
            cost.control_cpu_per_connection_us = control_before
                .zip(control_joined)
                .map(|(b, j)| per(j.cpu.saturating_sub(b.cpu), peers));
            Some(cost)
        }
        _ => None,
    };

    let client_after = procstat::sample(None);
    SignalReport {
        peers,
        rooms,
        connected,
        join_failures: tally.join_failures.load(Ordering::Relaxed),
        join_ms: tally.join.lock().await.summary(),
        offer_answer_ms: tally.rtt.lock().await.summary(),
        offer_answer_by_route_ms: Samples::summaries(&*tally.rtt_by_route.lock().await),
        messages_relayed: relayed,
        messages_lost: tally.lost.load(Ordering::Relaxed),
        rooms_seconds,
        join_seconds,
        messaging_seconds,
        messages_per_sec: relayed as f64 / messaging_seconds.max(1e-9),
        errors: tally.errors.lock().await.clone().into_iter().collect(),
        server,
        client_cpu_seconds: match (client_before, client_after) {
            (Some(b), Some(a)) => (a.cpu - b.cpu).as_secs_f64(),
            _ => 0.0,
        },
        client_rss_bytes: client_after.map_or(0, |s| s.rss),
    }
}

/// `cpu` per item, microseconds.
fn per(cpu: Duration, items: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / items.max(1) as f64
}

/// The server's costs from its samples: before the run, after the rooms,
/// after the joins, after the hold, before and after the messages.
fn server_cost(samples: [ProcSample; 6], rooms: usize, peers: usize, relayed: u64) -> ServerCost {
    let [before, rooms_made, joined, held, msg_before, msg_after] = samples;
    ServerCost {
        rss_before_bytes: before.rss,
        rss_connected_bytes: held.rss,
        memory_per_connection_bytes: held.rss.saturating_sub(before.rss) as f64
            / peers.max(1) as f64,
        cpu_per_room_us: per(rooms_made.cpu.saturating_sub(before.cpu), rooms),
        cpu_per_connection_us: per(joined.cpu.saturating_sub(rooms_made.cpu), peers),
        cpu_per_message_us: per(
            msg_after.cpu.saturating_sub(msg_before.cpu),
            relayed as usize,
        ),
        control_cpu_per_connection_us: None,
    }
}

/// The human summary of a report.
pub fn render(r: &SignalReport) -> String {
    let ms = |s: &Option<Summary>| Summary::line_of(*s, 2);
    let mut out = format!(
        "signal load: {} peers in {} rooms, {} connected, {} join failures\n\
         \x20 join (connect→welcome)      {}\n\
         \x20 offer→answer round trip     {}\n\
         \x20 messages relayed {} lost {}  ({:.0} msg/s over {:.2} s; rooms took {:.2} s, joins {:.2} s)\n\
         \x20 load tester: {:.2} s CPU, {:.1} MiB RSS\n",
        r.peers,
        r.rooms,
        r.connected,
        r.join_failures,
        ms(&r.join_ms),
        ms(&r.offer_answer_ms),
        r.messages_relayed,
        r.messages_lost,
        r.messages_per_sec,
        r.messaging_seconds,
        r.rooms_seconds,
        r.join_seconds,
        r.client_cpu_seconds,
        r.client_rss_bytes as f64 / 1_048_576.0,
    );
    out.push_str(&Summary::by_key(&r.offer_answer_by_route_ms, 2));
    if let Some(s) = &r.server {
        out.push_str(&format!(
            "  server: {:.2} KiB/connection ({:.1} → {:.1} MiB RSS), {:.1} µs CPU/room created, {:.1} µs CPU/join, {:.1} µs CPU/relayed message\n",
            s.memory_per_connection_bytes / 1024.0,
            s.rss_before_bytes as f64 / 1_048_576.0,
            s.rss_connected_bytes as f64 / 1_048_576.0,
            s.cpu_per_room_us,
            s.cpu_per_connection_us,
            s.cpu_per_message_us,
        ));
        if let Some(c) = s.control_cpu_per_connection_us {
            out.push_str(&format!(
                "  control plane: {c:.1} µs CPU/peer (rooms and joins)\n"
            ));
        }
    }
    for (kind, n) in &r.errors {
        out.push_str(&format!("  error {kind}: {n}\n"));
    }
    out
}
