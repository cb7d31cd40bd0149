//! The full scenario: pairs of peers meet through signaling (join tokens
//! minted with a tenant API key), take the TURN credentials from their
//! `welcome`, allocate over UDP or TCP, swap relayed addresses over
//! signaling, and move files each way through the relay (see [`crate::chunks`]),
//! once or round after round for a set duration. A chosen fraction of
//! pairs churns: one peer drops its WebSocket mid-transfer, reconnects with
//! the same client id and re-signals while the relay keeps flowing.
//! Afterwards the tenant's ledger is read back from the control plane and
//! compared with the bytes the peers put through TURN.
//!
//! With `--turn-secret` the run is TURN-only: peers mint TURN REST
//! credentials themselves and meet without signaling.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use webrtc_util::Conn;

use crate::chunks::{Counters, FileShape, Round};
use crate::stats::{Samples, Summary};
use crate::stream_conn::StreamConn;

use crate::join::Ws;

/// How long any one signaling step may take.
const SIGNAL_WAIT: Duration = Duration::from_secs(10);
/// WebSocket close code signaling uses for a connection replaced by a
/// reconnect of the same peer.
const CLOSE_REPLACED: u16 = 4001;

/// Transport between a peer and the TURN server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnTransport {
    Udp,
    Tcp,
}

/// Knobs of a transfer run.
#[derive(Debug, Clone, clap::Args)]
pub struct TransferArgs {
    /// Signal node base URL; repeat to spread peers over nodes.
    #[arg(long = "signal-url", default_value = "http://127.0.0.1:8080")]
    pub signal_urls: Vec<String>,
    /// Control plane base URL (for the reconciliation).
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    pub control_url: String,
    /// API key id of the tenant the peers belong to.
    #[arg(long, env = "FLOE_KEY_ID")]
    pub key_id: String,
    /// API key secret.
    #[arg(long, env = "FLOE_KEY_SECRET", hide_env_values = true)]
    pub key_secret: String,
    /// The key's tenant (whose ledger is reconciled).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Pairs of peers (each pair is one room).
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Bytes each peer sends to its partner per round.
    #[arg(long, default_value_t = 65_536)]
    pub bytes: usize,
    /// Payload bytes per chunk.
    #[arg(long, default_value_t = 1_000)]
    pub chunk: usize,
    /// Chunks in flight per direction, at most.
    #[arg(long, default_value_t = 32)]
    pub window: u32,
    /// Send rate per peer, kbit/s of payload (0: as fast as the window allows).
    #[arg(long, default_value_t = 0)]
    pub rate_kbps: u64,
    /// New pairs per second (the ramp).
    #[arg(long, default_value_t = 100.0)]
    pub join_rate: f64,
    /// Keep every pair sending file after file until this many seconds
    /// after the run started (0: one file each way).
    #[arg(long, default_value_t = 0)]
    pub duration_secs: u64,
    /// Fraction of pairs (0–1) whose second peer drops its WebSocket
    /// mid-transfer, reconnects with the same client id and re-signals.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Transport to TURN.
    #[arg(long, value_enum, default_value_t = TurnTransport::Udp)]
    pub turn_transport: TurnTransport,
    /// TURN-only: mint TURN REST credentials with this secret instead of
    /// signaling (peers meet in-process).
    #[arg(long, env = "FLOE_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,
    /// Key id of --turn-secret.
    #[arg(long, default_value = "k1")]
    pub turn_kid: String,
    /// TURN server of a TURN-only run.
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub turn_server: SocketAddr,
    /// Give up on a pair after this many seconds (beyond --duration-secs).
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Lifetime of the rooms the pairs create, seconds.
    #[arg(long, default_value_t = 3_600)]
    pub room_ttl_secs: u64,
    /// After the pairs are done, wait at most this many seconds for the
    /// ledger to take in what they relayed.
    #[arg(long, default_value_t = 30)]
    pub settle_secs: u64,
}

impl TransferArgs {
    fn shape(&self) -> FileShape {
        FileShape {
            bytes: self.bytes,
            chunk: self.chunk.max(1),
            window: self.window.max(1),
            rate_bps: self.rate_kbps.saturating_mul(1_000),
        }
    }

    /// Whether pair `i` churns: `churn` of the pairs, spread evenly.
    fn churns(&self, i: usize) -> bool {
        let c = self.churn.clamp(0.0, 1.0);
        ((i + 1) as f64 * c).floor() > (i as f64 * c).floor()
    }
}

/// Everything a transfer run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferReport {
    pub pairs: usize,
    pub turn_transport: Option<TurnTransport>,
    pub turn_only: bool,
    /// Files received complete and verified (two per pair and round).
    pub transfers_verified: u64,
    /// Peers whose pair did not finish.
    pub transfers_failed: u64,
    pub rounds_completed: u64,
    pub join_ms: Option<Summary>,
    pub offer_answer_ms: Option<Summary>,
    /// Offer→answer by the signal nodes the two peers used ("n0→n1"),
    /// when several signal URLs were given.
    pub offer_answer_by_route_ms: BTreeMap<String, Summary>,
    pub allocation_ms: Option<Summary>,
    pub ice_to_first_byte_ms: Option<Summary>,
    /// One round, both directions.
    pub transfer_ms: Option<Summary>,
    /// Payload received in order and verified.
    pub payload_bytes_verified: u64,
    /// Verified payload over the time any transfer was running, Mbit/s.
    pub goodput_mbps: f64,
    pub retransmissions: u64,
    pub corrupt_chunks: u64,
    /// Peers that dropped their WebSocket mid-transfer, reconnected and
    /// re-signalled while their relay kept flowing.
    pub churned_peers: u64,
    /// Reconnect start to the re-sent offer's answer.
    pub reconnect_ms: Option<Summary>,
    /// Most peers transferring at one time.
    pub peak_transferring_peers: u64,
    /// Bytes the peers handed to TURN (chunks, retransmissions and acks).
    pub relayed_bytes_sent: u64,
    /// Bytes the peers received from TURN. Less than sent when TURN drops
    /// data for a peer that has not yet permitted the sender (the first
    /// chunks of a transfer, before the partner's first send).
    pub relayed_bytes_received: u64,
    /// Relayed bytes the ledger holds for the tenant, client to peer.
    pub ledger_bytes_out: u64,
    /// Relayed bytes the ledger holds for the tenant, peer to client.
    pub ledger_bytes_in: u64,
    /// Both directions equal: the ledger holds exactly what the peers
    /// sent to TURN and received from it.
    pub reconciled: bool,
    /// Bytes the peers sent that TURN did not relay (lost on the way in or
    /// dropped by it), so not billed; the peers retransmitted them.
    pub unrelayed_bytes: u64,
    /// Bytes TURN delivered that the peers did not read (dropped at the
    /// client socket or its buffer), billed because they were relayed.
    pub undelivered_bytes: u64,
    /// The invariant that holds even under loss: the ledger never bills
    /// more than the peers sent, nor less than they received.
    pub consistent: bool,
    pub errors: Vec<(String, u64)>,
    pub seconds: f64,
    /// The load tester's own CPU over the run, seconds, and as a share of
    /// one core.
    pub client_cpu_seconds: f64,
    pub client_cpu_percent: f64,
    pub client_rss_bytes: u64,
}

#[derive(Default)]
struct Tally {
    join: Mutex<Samples>,
    rtt: Mutex<Samples>,
    rtt_by_route: Mutex<BTreeMap<String, Samples>>,
    alloc: Mutex<Samples>,
    first_byte: Mutex<Samples>,
    transfer: Mutex<Samples>,
    reconnect: Mutex<Samples>,
    counters: Counters,
    verified: AtomicU64,
    failed: AtomicU64,
    rounds: AtomicU64,
    churned: AtomicU64,
    transferring: AtomicU64,
    peak: AtomicU64,
    /// First transfer start and last transfer end.
    window: std::sync::Mutex<Option<(Instant, Instant)>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    async fn error(&self, e: impl Into<String>) {
        *self.errors.lock().await.entry(e.into()).or_default() += 1;
    }

    fn widen_window(&self, from: Instant, to: Instant) {
        if let Ok(mut w) = self.window.lock() {
            *w = Some(w.map_or((from, to), |(a, b)| (a.min(from), b.max(to))));
        }
    }
}

/// Counts a pair's two peers as transferring while it lives.
struct Transferring<'a>(&'a Tally);

impl<'a> Transferring<'a> {
    fn start(tally: &'a Tally) -> Self {
        let now = tally.transferring.fetch_add(2, Ordering::Relaxed) + 2;
        tally.peak.fetch_max(now, Ordering::Relaxed);
        Self(tally)
    }
}

impl Drop for Transferring<'_> {
    fn drop(&mut self) {
        self.0.transferring.fetch_sub(2, Ordering::Relaxed);
    }
}

fn token(args: &TransferArgs, room: &str, peer: &str) -> Result<String, String> {
    crate::join::join_token(&args.key_id, &args.key_secret, room, peer).map_err(|e| e.to_string())
}

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + SIGNAL_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("signaling timeout".into()),
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                return Err("signaling closed".into());
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(&t).map_err(|e| e.to_string());
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// The next message of `kind`.
async fn expect(ws: &mut Ws, kind: &str) -> Result<Value, String> {
    loop {
        let m = next_json(ws).await?;
        if m["type"] == kind {
            return Ok(m);
        }
        if m["type"] == "error" {
            return Err(format!("signal error {}", m["code"]));
        }
    }
}

/// Reads `ws` until it closes; its close code.
async fn close_code(ws: &mut Ws) -> Result<u16, String> {
    let deadline = tokio::time::Instant::now() + SIGNAL_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("replaced connection not closed".into()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Ok(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Ok(None) | Ok(Some(Err(_))) => return Err("replaced connection dropped".into()),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Where and how a peer reaches TURN.
#[derive(Debug, Clone)]
struct TurnCreds {
    server: SocketAddr,
    username: String,
    password: String,
}

/// TURN server address and credentials from a welcome's ICE servers, for
/// `transport`; the server must be a permitted target.
fn turn_of(
    welcome: &Value,
    transport: TurnTransport,
    allowed: &[IpAddr],
    pick: usize,
) -> Result<TurnCreds, String> {
    let wanted = match transport {
        TurnTransport::Udp => "transport=udp",
        TurnTransport::Tcp => "transport=tcp",
    };
    let servers = welcome["ice_servers"]["iceServers"]
        .as_array()
        .ok_or("welcome without ICE servers")?;
    let mut offered = Vec::new();
    for s in servers {
        let (Some(user), Some(pass)) = (s["username"].as_str(), s["credential"].as_str()) else {
            continue;
        };
        for url in s["urls"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if let Some(rest) = url.strip_prefix("turn:")
                && url.contains(wanted)
            {
                let host = rest.split('?').next().unwrap_or_default();
                let server: SocketAddr = host
                    .parse()
                    .map_err(|_| format!("TURN URL {url} is not ip:port"))?;
                crate::target::check(server.ip(), allowed).map_err(|e| e.to_string())?;
                offered.push(TurnCreds {
                    server,
                    username: user.to_owned(),
                    password: pass.to_owned(),
                });
            }
        }
    }
    if !offered.is_empty() {
        let n = offered.len();
        return Ok(offered.swap_remove(pick % n));
    }
    Err(format!(
        "no TURN with {wanted} offered ({})",
        welcome["ice_servers"]["turn_refused"]
            .as_str()
            .unwrap_or("?")
    ))
}

/// TURN REST credentials minted locally (TURN-only runs).
fn minted(args: &TransferArgs, secret: &str, room: &str, peer: &str) -> TurnCreds {
    let username = format!(
        "{}:{}:{}:{room}:{peer}",
        floe_proto::time::unix_now() + 3_600,
        args.turn_kid,
        args.tenant
    );
    TurnCreds {
        server: args.turn_server,
        password: floe_proto::credential::turn_password(secret.as_bytes(), &username),
        username,
    }
}

/// One peer on the relay: its allocation.
struct Relay {
    client: turn::client::Client,
    conn: Arc<dyn Conn + Send + Sync>,
}

impl Relay {
    async fn allocate(creds: TurnCreds, transport: TurnTransport) -> Result<Self, String> {
        let conn: Arc<dyn Conn + Send + Sync> = match transport {
            TurnTransport::Udp => Arc::new(
                UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            TurnTransport::Tcp => Arc::new(
                StreamConn::connect(creds.server)
                    .await
                    .map_err(|e| format!("TURN over TCP: {e}"))?,
            ),
        };
        let client = turn::client::Client::new(turn::client::ClientConfig {
            stun_serv_addr: creds.server.to_string(),
            turn_serv_addr: creds.server.to_string(),
            username: creds.username,
            password: creds.password,
            realm: String::new(),
            software: "floe-loadtest".into(),
            rto_in_ms: 0,
            conn,
            vnet: None,
        })
        .await
        .map_err(|e| format!("TURN client: {e}"))?;
        client
            .listen()
            .await
            .map_err(|e| format!("TURN listen: {e}"))?;
        let conn = client
            .allocate()
            .await
            .map_err(|e| format!("allocate: {e}"))?;
        Ok(Self {
            client,
            conn: Arc::new(conn),
        })
    }

    fn addr(&self) -> Result<SocketAddr, String> {
        self.conn.local_addr().map_err(|e| e.to_string())
    }

    async fn close(&self) {
        let _ = self.conn.close().await;
        let _ = self.client.close().await;
    }
}

async fn connect(url: &str) -> Result<(Ws, Value, Duration), String> {
    let started = Instant::now();
    let (mut ws, _) = tokio::time::timeout(SIGNAL_WAIT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| "connect: timeout".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let welcome = next_json(&mut ws).await?;
    if welcome["type"] != "welcome" {
        return Err(format!("join: {}", welcome["code"]));
    }
    Ok((ws, welcome, started.elapsed()))
}

async fn send_json(ws: &mut Ws, v: Value) -> Result<(), String> {
    ws.send(Message::text(v.to_string()))
        .await
        .map_err(|e| format!("signaling send: {e}"))
}

/// A pair's two signaling connections.
struct Signaled {
    a: Ws,
    b: Ws,
    /// B's WebSocket URL (with its join token), for reconnects.
    url_b: String,
    sid_b: Value,
    /// "n0→n1" when peers are spread over several nodes.
    route: Option<String>,
}

impl Signaled {
    /// A creates the room, both join; returns their TURN credentials.
    async fn join(
        i: usize,
        args: &TransferArgs,
        allowed: &[IpAddr],
        tally: &Tally,
    ) -> Result<(Self, TurnCreds, TurnCreds), String> {
        let urls = &args.signal_urls;
        let (na, nb) = ((2 * i) % urls.len(), (2 * i + 1) % urls.len());
        let (url_a, url_b) = (&urls[na], &urls[nb]);
        let room = format!("xfer-{}-{i}", std::process::id());
        let r = reqwest::Client::new()
            .post(format!("{}/v1/rooms", url_a.trim_end_matches('/')))
            .bearer_auth(token(args, &room, "a")?)
            .json(&json!({"ttl_secs": args.room_ttl_secs}))
            .send()
            .await
            .map_err(|e| format!("create room: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("create room: {}", r.status()));
        }
        let ws_url = |base: &str, peer: &str| -> Result<String, String> {
            Ok(format!(
                "{}&token={}",
                crate::join::ws_url(base, &room, peer),
                token(args, &room, peer)?
            ))
        };
        let url_b = ws_url(url_b, "b")?;
        let (mut a, welcome_a, ja) = connect(&ws_url(url_a, "a")?).await?;
        let (b, welcome_b, jb) = connect(&url_b).await?;
        tally.join.lock().await.record_ms(ja);
        tally.join.lock().await.record_ms(jb);
        expect(&mut a, "peer-joined").await?;
        // Pairs spread over the TURN servers offered, both peers of a
        // pair on the same one.
        let creds_a = turn_of(&welcome_a, args.turn_transport, allowed, i)?;
        let creds_b = turn_of(&welcome_b, args.turn_transport, allowed, i)?;
        let signaled = Self {
            a,
            b,
            url_b,
            sid_b: welcome_b["session_id"].clone(),
            route: (urls.len() > 1).then(|| format!("n{na}→n{nb}")),
        };
        Ok((signaled, creds_a, creds_b))
    }

    /// A offers its relayed address, B answers with its own; returns the
    /// partners' addresses as (a's partner, b's partner).
    async fn offer_answer(
        &mut self,
        relay_a: SocketAddr,
        relay_b: SocketAddr,
    ) -> Result<(SocketAddr, SocketAddr), String> {
        let relay_of = |m: &Value| -> Result<SocketAddr, String> {
            m["payload"]["relay"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|_| format!("bad relay address in {}", m["payload"]["type"]))
        };
        let offer = json!({"type": "signal", "to": "b", "sid": self.sid_b,
            "payload": {"type": "offer", "relay": relay_a.to_string()}});
        send_json(&mut self.a, offer).await?;
        let got = expect(&mut self.b, "signal").await?;
        let partner_of_b = relay_of(&got)?;
        let answer = json!({"type": "signal", "to": "a", "sid": got["from_sid"],
            "payload": {"type": "answer", "relay": relay_b.to_string()}});
        send_json(&mut self.b, answer).await?;
        let got = expect(&mut self.a, "signal").await?;
        Ok((relay_of(&got)?, partner_of_b))
    }

    /// B reconnects with the same client id: the old connection must be
    /// closed as replaced, A must learn the new session, and the two
    /// re-signal (as an ICE restart would) while the relay keeps flowing.
    async fn churn(
        &mut self,
        relay_a: SocketAddr,
        relay_b: SocketAddr,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let (b, welcome, _) = connect(&self.url_b).await?;
        let old = std::mem::replace(&mut self.b, b);
        let mut old = old;
        let code = close_code(&mut old).await?;
        if code != CLOSE_REPLACED {
            return Err(format!("replaced connection closed with {code}"));
        }
        self.sid_b = welcome["session_id"].clone();
        loop {
            let joined = expect(&mut self.a, "peer-joined").await?;
            if joined["session_id"] == self.sid_b {
                break;
            }
        }
        let (to_b, to_a) = self.offer_answer(relay_a, relay_b).await?;
        if (to_b, to_a) != (relay_b, relay_a) {
            return Err("relayed addresses changed across a reconnect".into());
        }
        Ok(started.elapsed())
    }

    /// Reads both connections (which answers the server's heartbeats)
    /// until one closes; what happened.
    async fn keep_alive(&mut self) -> String {
        loop {
            let (who, m) = tokio::select! {
                m = self.a.next() => ("a", m),
                m = self.b.next() => ("b", m),
            };
            match m {
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return format!("signaling closed {who}'s connection mid-transfer ({code})");
                }
                None | Some(Err(_)) => {
                    return format!("{who}'s signaling connection dropped mid-transfer");
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Report the relayed share as a browser app does after a transfer,
    /// then leave.
    async fn leave(mut self, relayed: u64) -> Result<(), String> {
        let stats = json!({"type": "stats", "relayed_bytes": relayed});
        send_json(&mut self.a, stats.clone()).await?;
        send_json(&mut self.b, stats).await?;
        let _ = self.a.close(None).await;
        let _ = self.b.close(None).await;
        Ok(())
    }
}

/// One pair of peers and what it shares with the run.
struct Pair<'a> {
    i: usize,
    args: &'a TransferArgs,
    allowed: &'a [IpAddr],
    tally: &'a Tally,
    /// When pairs stop starting new rounds.
    run_until: Instant,
}

impl Pair<'_> {
    /// Meets (through signaling, or directly in a TURN-only run), allocates,
    /// swaps relayed addresses, transfers round after round, leaves.
    async fn run(&self) -> Result<(), String> {
        let Self {
            i,
            args,
            allowed,
            tally,
            ..
        } = *self;
        let (mut signaled, creds_a, creds_b) = match &args.turn_secret {
            Some(secret) => {
                let room = format!("turn-only-{}-{i}", std::process::id());
                let (a, b) = (
                    minted(args, secret, &room, "a"),
                    minted(args, secret, &room, "b"),
                );
                (None, a, b)
            }
            None => {
                let (s, a, b) = Signaled::join(i, args, allowed, tally).await?;
                (Some(s), a, b)
            }
        };
        let ice_at = Instant::now();
        let (ra, rb) = tokio::join!(
            Relay::allocate(creds_a, args.turn_transport),
            Relay::allocate(creds_b, args.turn_transport)
        );
        let (ra, rb) = (ra?, rb?);
        tally.alloc.lock().await.record_ms(ice_at.elapsed());
        let outcome = self.relay_files(&mut signaled, &ra, &rb, ice_at).await;
        ra.close().await;
        rb.close().await;
        let rounds = outcome?;
        if let Some(s) = signaled {
            s.leave(args.bytes as u64 * rounds).await?;
        }
        Ok(())
    }

    /// Swaps relayed addresses and runs the rounds; returns how many.
    async fn relay_files(
        &self,
        signaled: &mut Option<Signaled>,
        ra: &Relay,
        rb: &Relay,
        ice_at: Instant,
    ) -> Result<u64, String> {
        let Self {
            i,
            args,
            tally,
            run_until,
            ..
        } = *self;
        let (addr_a, addr_b) = (ra.addr()?, rb.addr()?);
        let (to_a, to_b) = match signaled {
            Some(s) => {
                let at = Instant::now();
                let partners = s.offer_answer(addr_a, addr_b).await?;
                let rtt = at.elapsed();
                tally.rtt.lock().await.record_ms(rtt);
                if let Some(route) = &s.route {
                    tally
                        .rtt_by_route
                        .lock()
                        .await
                        .entry(route.clone())
                        .or_default()
                        .record_ms(rtt);
                }
                partners
            }
            None => (addr_b, addr_a),
        };
        tokio::try_join!(
            crate::chunks::open_path(ra.conn.as_ref(), to_a, &tally.counters),
            crate::chunks::open_path(rb.conn.as_ref(), to_b, &tally.counters)
        )?;
        let _live = Transferring::start(tally);
        let shape = args.shape();
        let deadline = run_until + Duration::from_secs(args.timeout_secs);
        let (progress_a, progress_b) = (AtomicU32::new(0), AtomicU32::new(0));
        let mut round = 0u32;
        loop {
            let started = Instant::now();
            let r = Round::new(round, shape, &tally.counters, deadline);
            let (sa, sb) = (
                r.side(ra.conn.as_ref(), to_a, &progress_a),
                r.side(rb.conn.as_ref(), to_b, &progress_b),
            );
            let (fa, fb) = (OnceLock::new(), OnceLock::new());
            let exchanges = async {
                tokio::join!(
                    sa.exchange(|t| _ = fa.set(t)),
                    sb.exchange(|t| _ = fb.set(t))
                )
            };
            // Signaling stays read while the files move, as a browser's does
            // (heartbeats answered, pushes taken in); a churning pair
            // reconnects half way through. Ends only on failure.
            let churn_pending = AtomicBool::new(round == 0 && signaled.is_some() && args.churns(i));
            let reconnect = OnceLock::new();
            let signaling = async {
                let Some(s) = signaled.as_mut() else {
                    return std::future::pending().await;
                };
                if churn_pending.load(Ordering::Relaxed) {
                    let half = shape.chunks() / 2;
                    let halfway = async {
                        while progress_b.load(Ordering::Relaxed) < half {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! {
                        () = halfway => {}
                        e = s.keep_alive() => return e,
                    }
                    match s.churn(addr_a, addr_b).await {
                        Ok(took) => _ = reconnect.set(took),
                        Err(e) => return format!("churn: {e}"),
                    }
                    churn_pending.store(false, Ordering::Relaxed);
                }
                s.keep_alive().await
            };
            tokio::pin!(exchanges, signaling);
            let (x, y) = tokio::select! {
                r = &mut exchanges => r,
                e = &mut signaling => return Err(e),
            };
            // A reconnect that the round's end overtook is finished, never
            // abandoned half way (that would leave a replaced socket behind).
            while churn_pending.load(Ordering::Relaxed) {
                tokio::select! {
                    e = &mut signaling => return Err(e),
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
            x?;
            y?;
            if let Some(&took) = reconnect.get() {
                tally.reconnect.lock().await.record_ms(took);
                tally.churned.fetch_add(1, Ordering::Relaxed);
            }
            let ended = Instant::now();
            if round == 0 {
                for &at in [fa.get(), fb.get()].into_iter().flatten() {
                    tally.first_byte.lock().await.record_ms(at - ice_at);
                }
            }
            tally.transfer.lock().await.record_ms(ended - started);
            tally.widen_window(started, ended);
            tally.verified.fetch_add(2, Ordering::Relaxed);
            tally.rounds.fetch_add(1, Ordering::Relaxed);
            round += 1;
            if ended >= run_until {
                return Ok(u64::from(round));
            }
        }
    }
}

/// The tenant's relayed bytes (out, in) today, from the ledger (the
/// tenant's own API key may read its usage).
async fn ledger(args: &TransferArgs) -> Result<(u64, u64), String> {
    let v: Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/tenants/{}/usage",
            args.control_url.trim_end_matches('/'),
            args.tenant
        ))
        .basic_auth(&args.key_id, Some(&args.key_secret))
        .send()
        .await
        .map_err(|e| format!("usage: {e}"))?
        .json()
        .await
        .map_err(|e| format!("usage: {e}"))?;
    match (
        v["total"]["bytes_out"].as_u64(),
        v["total"]["bytes_in"].as_u64(),
    ) {
        (Some(o), Some(i)) => Ok((o, i)),
        _ => Err(format!("usage: unexpected answer {v}")),
    }
}

/// Runs the scenario; TURN servers named by signaling must be loopback or
/// in `allowed`.
pub async fn run(args: TransferArgs, allowed: &[IpAddr]) -> TransferReport {
    let args = Arc::new(args);
    let allowed: Arc<[IpAddr]> = allowed.into();
    let tally = Arc::new(Tally::default());
    let client_before = crate::procstat::sample(None);
    let before = ledger(&args).await;
    let started = Instant::now();
    let run_until = started + Duration::from_secs(args.duration_secs);
    let interval = Duration::from_secs_f64(1.0 / args.join_rate.max(0.1));
    let pb = crate::progress_bar(args.pairs as u64, "relaying", "pairs done, eta {eta}");
    let mut next = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(args.pairs);
    let pair_limit = Duration::from_secs(args.timeout_secs + args.duration_secs);
    for i in 0..args.pairs {
        tokio::time::sleep_until(next).await;
        next += interval;
        let (args, allowed, tally, pb) = (args.clone(), allowed.clone(), tally.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            let pair = Pair {
                i,
                args: &args,
                allowed: &allowed,
                tally: &tally,
                run_until,
            };
            let outcome = tokio::time::timeout(pair_limit, pair.run())
                .await
                .unwrap_or_else(|_| Err("pair timed out".into()));
            if let Err(e) = outcome {
                tally.failed.fetch_add(2, Ordering::Relaxed);
                tally.error(e).await;
            }
            pb.inc(1);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    pb.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let client_after = crate::procstat::sample(None);

    // Reconcile: TURN reports every few seconds; wait (bounded) for the
    // ledger to take in what the peers sent.
    let c = &tally.counters;
    let sent = c.sent_bytes.load(Ordering::Relaxed);
    let received = c.received_bytes.load(Ordering::Relaxed);
    let mut deltas = (0, 0);
    let mut reconciled = false;
    let before_ok = before.is_ok();
    match before {
        Ok(b) => {
            let deadline = Instant::now() + Duration::from_secs(args.settle_secs);
            loop {
                if let Ok(now) = ledger(&args).await {
                    deltas = (now.0.saturating_sub(b.0), now.1.saturating_sub(b.1));
                    if deltas == (sent, received) {
                        reconciled = true;
                        break;
                    }
                }
                if Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Err(e) => tally.error(e).await,
    }
    let verified_bytes = c.verified_bytes.load(Ordering::Relaxed);
    let busy = tally
        .window
        .lock()
        .ok()
        .and_then(|w| *w)
        .map_or(0.0, |(a, b)| (b - a).as_secs_f64());
    let client_cpu_seconds = match (client_before, client_after) {
        (Some(b), Some(a)) => a.cpu.saturating_sub(b.cpu).as_secs_f64(),
        _ => 0.0,
    };
    TransferReport {
        pairs: args.pairs,
        turn_transport: Some(args.turn_transport),
        turn_only: args.turn_secret.is_some(),
        transfers_verified: tally.verified.load(Ordering::Relaxed),
        transfers_failed: tally.failed.load(Ordering::Relaxed),
        rounds_completed: tally.rounds.load(Ordering::Relaxed),
        join_ms: tally.join.lock().await.summary(),
        offer_answer_ms: tally.rtt.lock().await.summary(),
        offer_answer_by_route_ms: Samples::summaries(&*tally.rtt_by_route.lock().await),
        allocation_ms: tally.alloc.lock().await.summary(),
        ice_to_first_byte_ms: tally.first_byte.lock().await.summary(),
        transfer_ms: tally.transfer.lock().await.summary(),
        payload_bytes_verified: verified_bytes,
        goodput_mbps: if busy > 0.0 {
            verified_bytes as f64 * 8.0 / busy / 1e6
        } else {
            0.0
        },
        retransmissions: c.retransmissions.load(Ordering::Relaxed),
        corrupt_chunks: c.corrupt.load(Ordering::Relaxed),
        churned_peers: tally.churned.load(Ordering::Relaxed),
        reconnect_ms: tally.reconnect.lock().await.summary(),
        peak_transferring_peers: tally.peak.load(Ordering::Relaxed),
        relayed_bytes_sent: sent,
        relayed_bytes_received: received,
        ledger_bytes_out: deltas.0,
        ledger_bytes_in: deltas.1,
        reconciled,
        unrelayed_bytes: sent.saturating_sub(deltas.0),
        undelivered_bytes: deltas.1.saturating_sub(received),
        consistent: before_ok && deltas.0 <= sent && deltas.1 >= received && deltas.1 <= deltas.0,
        errors: tally.errors.lock().await.clone().into_iter().collect(),
        seconds,
        client_cpu_seconds,
        client_cpu_percent: client_cpu_seconds / seconds.max(1e-9) * 100.0,
        client_rss_bytes: client_after.map_or(0, |s| s.rss),
    }
}

/// The human summary of a report.
pub fn render(r: &TransferReport) -> String {
    let ms = |s: &Option<Summary>| Summary::line_of(*s, 1);
    let transport = match r.turn_transport {
        Some(TurnTransport::Tcp) => "TCP",
        _ => "UDP",
    };
    let mut out = format!(
        "transfer: {} pairs over TURN/{transport}{}, {} files verified ({} rounds), {} peers failed, in {:.1} s\n\
         \x20 join                        {}\n\
         \x20 offer→answer                {}\n",
        r.pairs,
        if r.turn_only { " (TURN-only)" } else { "" },
        r.transfers_verified,
        r.rounds_completed,
        r.transfers_failed,
        r.seconds,
        ms(&r.join_ms),
        ms(&r.offer_answer_ms),
    );
    out.push_str(&Summary::by_key(&r.offer_answer_by_route_ms, 1));
    out.push_str(&format!(
        "  allocation                  {}\n\
         \x20 ICE servers → first byte    {}\n\
         \x20 transfer (round, both ways) {}\n\
         \x20 goodput {:.1} Mbit/s verified payload, peak {} peers transferring\n\
         \x20 retransmitted chunks {}  corrupt chunks {}\n",
        ms(&r.allocation_ms),
        ms(&r.ice_to_first_byte_ms),
        ms(&r.transfer_ms),
        r.goodput_mbps,
        r.peak_transferring_peers,
        r.retransmissions,
        r.corrupt_chunks,
    ));
    if r.churned_peers > 0 || r.reconnect_ms.is_some() {
        out.push_str(&format!(
            "  churn: {} peers reconnected mid-transfer; reconnect → re-signalled {}\n",
            r.churned_peers,
            ms(&r.reconnect_ms)
        ));
    }
    out.push_str(&format!(
        "  load tester: {:.1} s CPU ({:.0}% of a core), {:.1} MiB RSS\n\
         \x20 reconciliation: peers sent {} B to TURN, received {} B from it; ledger out {} B, in {} B → {}\n",
        r.client_cpu_seconds,
        r.client_cpu_percent,
        r.client_rss_bytes as f64 / 1_048_576.0,
        r.relayed_bytes_sent,
        r.relayed_bytes_received,
        r.ledger_bytes_out,
        r.ledger_bytes_in,
        if r.reconciled {
            "EXACT".to_owned()
        } else if r.consistent {
            format!(
                "consistent under loss: {} B sent were not relayed (lost on the way in, not billed), {} B relayed were not read by the peers (billed)",
                r.unrelayed_bytes, r.undelivered_bytes
            )
        } else {
            "MISMATCH: the ledger bills more than was sent or less than was received".to_owned()
        },
    ));
    for (e, n) in &r.errors {
        out.push_str(&format!("  error {e}: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TransferArgs,
    }

    fn args(extra: &[&str]) -> TransferArgs {
        let base = ["x", "--key-id", "k", "--key-secret", "s"];
        Cli::parse_from(base.iter().chain(extra)).args
    }

    #[test]
    fn churn_picks_the_fraction_evenly() {
        let a = args(&["--churn", "0.25"]);
        let picked: Vec<usize> = (0..12).filter(|&i| a.churns(i)).collect();
        assert_eq!(picked, [3, 7, 11]);
        assert!((0..100).all(|i| !args(&[]).churns(i)));
        assert!((0..100).all(|i| args(&["--churn", "1"]).churns(i)));
    }

    #[test]
    fn turn_url_is_chosen_by_transport_and_target() {
        let welcome = json!({"ice_servers": {"iceServers": [
            {"urls": ["stun:127.0.0.1:3478"]},
            {"urls": ["turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3479?transport=tcp"],
             "username": "u", "credential": "p"}]}});
        let udp = turn_of(&welcome, TurnTransport::Udp, &[], 0).expect("udp");
        let tcp = turn_of(&welcome, TurnTransport::Tcp, &[], 1).expect("tcp");
        assert_eq!((udp.server.port(), tcp.server.port()), (3478, 3479));
        assert_eq!((tcp.username.as_str(), tcp.password.as_str()), ("u", "p"));
        let far = json!({"ice_servers": {"iceServers": [
            {"urls": ["turn:192.0.2.1:3478?transport=udp"], "username": "u", "credential": "p"}]}});
        let two = json!({"ice_servers": {"iceServers": [
            {"urls": ["turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3480?transport=udp"],
             "username": "u", "credential": "p"}]}});
        let picked: Vec<u16> = (0..3)
            .map(|i| {
                turn_of(&two, TurnTransport::Udp, &[], i)
                    .expect("udp")
                    .server
                    .port()
            })
            .collect();
        assert_eq!(
            picked,
            [3478, 3480, 3478],
            "pairs spread over the servers offered"
        );
        let err = turn_of(&far, TurnTransport::Udp, &[], 0).expect_err("not loopback");
        assert!(err.contains("refusing"), "{err}");
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert!(turn_of(&far, TurnTransport::Udp, &[ip], 0).is_ok());
        assert!(turn_of(&far, TurnTransport::Tcp, &[ip], 0).is_err());
    }

    #[test]
    fn minted_credentials_carry_the_tenant_and_verify() {
        let a = args(&["--tenant", "acme", "--turn-kid", "k9"]);
        let c = minted(&a, "sekrit", "r1", "a");
        let fields: Vec<&str> = c.username.split(':').collect();
        assert_eq!(&fields[1..], ["k9", "acme", "r1", "a"]);
        assert_eq!(
            c.password,
            floe_proto::credential::turn_password(b"sekrit", &c.username)
        );
    }
}
