//! Failover: pairs of peers join rooms on one signal node, that node goes
//! away (the caller kills it once `--ready-file` appears), and every peer
//! reconnects to a surviving node the way floe's SDK does (full-jitter
//! exponential backoff from 250 ms), with its join token and reconnect
//! secret. Reports how long until every peer was back in its room and
//! until every pair had traded an offer and an answer again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::procstat;
use crate::stats::{Samples, Summary};

use crate::join::{Ws, next_json};

/// Flags of `floe loadtest failover`.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// The node the peers join first (the one that will go away).
    #[arg(long)]
    pub signal_url: String,
    /// The node they reconnect to.
    #[arg(long)]
    pub failover_url: String,
    /// API key id: rooms and joins use join tokens minted with it.
    #[arg(long, env = "FLOE_KEY_ID")]
    pub key_id: String,
    /// API key secret.
    #[arg(long, env = "FLOE_KEY_SECRET", hide_env_values = true)]
    pub key_secret: String,
    /// Peers (pairs of them share a room).
    #[arg(long, default_value_t = 1_000)]
    pub peers: usize,
    /// New connections per second while setting up.
    #[arg(long, default_value_t = 2_000.0)]
    pub join_rate: f64,
    /// Written once every peer is connected: the cue to kill the node.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Pid of the surviving node, to report its CPU per reconnect.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Longest wait for the node to go away, and then for the peers to
    /// come back, seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// What a failover run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverReport {
    pub peers: usize,
    pub connected: usize,
    /// Peers whose first node closed on them.
    pub dropped: usize,
    pub reconnected: usize,
    /// First drop to the last peer back in its room (`welcome`), seconds.
    pub all_back_seconds: Option<f64>,
    /// First drop to the last pair having traded an offer and an answer.
    pub all_signalling_seconds: Option<f64>,
    /// Each peer's drop to its `welcome` on the surviving node, ms.
    pub reconnect_ms: Option<Summary>,
    pub reconnect_attempts: u64,
    pub pairs_signalling_again: usize,
    /// The surviving node's CPU over the storm, per reconnected peer.
    pub server_cpu_per_reconnect_us: Option<f64>,
    pub errors: Vec<(String, u64)>,
}

#[derive(Default)]
struct Tally {
    dropped: AtomicU64,
    reconnected: AtomicU64,
    attempts: AtomicU64,
    pairs_again: AtomicU64,
    first_drop: Mutex<Option<Instant>>,
    last_back: Mutex<Option<Instant>>,
    last_pair: Mutex<Option<Instant>>,
    reconnect: Mutex<Samples>,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    async fn error(&self, what: impl Into<String>) {
        *self.errors.lock().await.entry(what.into()).or_default() += 1;
    }
}

/// One joined peer.
struct Peer {
    ws: Ws,
    id: String,
    secret: String,
}

async fn join(url: &str, deadline: tokio::time::Instant) -> Result<Peer, String> {
    let (mut ws, _) = tokio::time::timeout_at(deadline, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| "connect: timeout".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let welcome = next_json(&mut ws, deadline)
        .await
        .ok_or_else(|| "join: no answer".to_owned())?;
    if welcome["type"] != "welcome" {
        return Err(format!(
            "join: {}",
            welcome["code"].as_str().unwrap_or("refused")
        ));
    }
    let text = |k: &str| welcome[k].as_str().unwrap_or_default().to_owned();
    Ok(Peer {
        ws,
        id: text("peer_id"),
        secret: text("reconnect_secret"),
    })
}

/// Waits until `peer`'s node closes on it (or `deadline`).
async fn until_dropped(peer: &mut Peer, deadline: tokio::time::Instant) -> bool {
    loop {
        match tokio::time::timeout_at(deadline, peer.ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Reconnects to `base` as the SDK does: full-jitter backoff from 250 ms,
/// capped at 10 s, until it is back or `deadline` passes.
async fn reconnect(
    base: &str,
    room: &str,
    token: &str,
    old: &Peer,
    tally: &Tally,
    deadline: tokio::time::Instant,
) -> Option<Peer> {
    let url = format!(
        "{}&token={token}&reconnect_secret={}",
        crate::join::ws_url(base, room, &old.id),
        old.secret
    );
    for attempt in 0u32.. {
        let cap_ms = 10_000f64.min(250.0 * 2f64.powi(attempt.min(16) as i32));
        let wait = Duration::from_secs_f64(rand::random::<f64>() * cap_ms / 1_000.0);
        tokio::time::sleep(wait).await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        match join(&url, deadline).await {
            Ok(p) => return Some(p),
            Err(e) => tally.error(e).await,
        }
    }
    None
}

/// One room: its pair joins `a`, waits for `a` to go away, reconnects both
/// to `b`, and trades an offer and an answer.
async fn pair(
    args: Arc<FailoverArgs>,
    r: usize,
    tally: Arc<Tally>,
    joined: Arc<AtomicU64>,
    setup_deadline: tokio::time::Instant,
) {
    let kid = &args.key_id;
    let room_name = format!("fo-{}-{r}", std::process::id());
    let tokens: Vec<String> = (0..2)
        .filter_map(|i| {
            crate::join::join_token(kid, &args.key_secret, &room_name, &format!("fo{r}-{i}")).ok()
        })
        .collect();
    let http = reqwest::Client::new();
    let created = http
        .post(format!(
            "{}/v1/rooms",
            args.signal_url.trim_end_matches('/')
        ))
        .bearer_auth(&tokens[0])
        .json(&json!({"ttl_secs": 3600}))
        .send()
        .await;
    let room = match created {
        Ok(resp) if resp.status().is_success() => resp
            .json::<Value>()
            .await
            .ok()
            .and_then(|v| v["room_id"].as_str().map(str::to_owned)),
        _ => None,
    };
    let Some(room) = room else {
        tally.error("create room").await;
        return;
    };
    let mut peers = Vec::with_capacity(2);
    for (i, token) in tokens.iter().enumerate() {
        let client = format!("fo{r}-{i}");
        let url = format!(
            "{}&token={token}",
            crate::join::ws_url(&args.signal_url, &room, &client)
        );
        match join(&url, setup_deadline).await {
            Ok(p) => peers.push(p),
            Err(e) => {
                tally.error(e).await;
                return;
            }
        }
        joined.fetch_add(1, Ordering::Relaxed);
    }
    let wait_deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs * 4);
    let (timeout, failover) = (Duration::from_secs(args.timeout_secs), &args.failover_url);
    let back = futures_util::future::join_all(peers.iter_mut().zip(&tokens).map(|(p, token)| {
        let (tally, room) = (&tally, &room);
        async move {
            if !until_dropped(p, wait_deadline).await {
                return None;
            }
            let dropped = Instant::now();
            tally.dropped.fetch_add(1, Ordering::Relaxed);
            tally.first_drop.lock().await.get_or_insert(dropped);
            let deadline = tokio::time::Instant::now() + timeout;
            let new = reconnect(failover, room, token, p, tally, deadline).await?;
            let now = Instant::now();
            tally.reconnected.fetch_add(1, Ordering::Relaxed);
            tally.reconnect.lock().await.record_ms(now - dropped);
            let mut last = tally.last_back.lock().await;
            *last = Some(last.map_or(now, |l| l.max(now)));
            Some(new)
        }
    }))
    .await;
    let [Some(mut caller), Some(mut callee)] =
        <[Option<Peer>; 2]>::try_from(back).unwrap_or_else(|_| [None, None])
    else {
        return;
    };
    // The pair signals again: an offer one way, an answer back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    if !relay(&mut caller, &mut callee, "offer", deadline).await {
        return tally.error("offer lost after failover").await;
    }
    if !relay(&mut callee, &mut caller, "answer", deadline).await {
        return tally.error("answer lost after failover").await;
    }
    let now = Instant::now();
    tally.pairs_again.fetch_add(1, Ordering::Relaxed);
    let mut last = tally.last_pair.lock().await;
    *last = Some(last.map_or(now, |l| l.max(now)));
    drop(last);
    let _ = caller.ws.close(None).await;
    let _ = callee.ws.close(None).await;
}

/// Sends a `signal` of type `what` from `from` to `to`; whether it arrived
/// by `deadline`.
async fn relay(from: &mut Peer, to: &mut Peer, what: &str, deadline: tokio::time::Instant) -> bool {
    let msg = json!({"type": "signal", "to": to.id, "payload": {"type": what}});
    if from.ws.send(Message::text(msg.to_string())).await.is_err() {
        return false;
    }
    loop {
        match next_json(&mut to.ws, deadline).await {
            Some(m) if m["type"] == "signal" => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

/// Runs the scenario.
pub async fn run(args: FailoverArgs) -> Result<FailoverReport, std::io::Error> {
    let args = Arc::new(args);
    let pairs = args.peers / 2;
    let tally = Arc::new(Tally::default());
    let joined = Arc::new(AtomicU64::new(0));
    let setup_deadline = tokio::time::Instant::now()
        + Duration::from_secs(args.timeout_secs)
        + Duration::from_secs_f64(args.peers as f64 / args.join_rate.max(1.0));
    let pb = crate::progress_bar((pairs * 2) as u64, "joining", "{per_sec} eta {eta}");
    let interval = Duration::from_secs_f64(2.0 / args.join_rate.max(1.0));
    let mut next_at = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(pairs);
    for r in 0..pairs {
        tokio::time::sleep_until(next_at).await;
        next_at += interval;
        tasks.push(tokio::spawn(pair(
            args.clone(),
            r,
            tally.clone(),
            joined.clone(),
            setup_deadline,
        )));
        pb.set_position(joined.load(Ordering::Relaxed));
    }
    // Every pair has joined (or failed to) when no count moves any more.
    let expected = (pairs * 2) as u64;
    let mut last = (u64::MAX, Instant::now());
    while joined.load(Ordering::Relaxed) < expected && tokio::time::Instant::now() < setup_deadline
    {
        let n = joined.load(Ordering::Relaxed);
        pb.set_position(n);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pb.finish_and_clear();
    let connected = joined.load(Ordering::Relaxed) as usize;
    let before = args.server_pid.and_then(|p| procstat::sample(Some(p)));
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{connected}\n"))?;
    }
    eprintln!(
        "{connected} peers connected to {}; waiting for it to go away",
        args.signal_url
    );
    let pb = crate::progress_bar(connected as u64, "back", "{per_sec} eta {eta}");
    let progress = {
        let (tally, pb) = (tally.clone(), pb.clone());
        tokio::spawn(async move {
            loop {
                pb.set_position(tally.reconnected.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    pb.finish_and_clear();
    let after = args.server_pid.and_then(|p| procstat::sample(Some(p)));
    let reconnected = tally.reconnected.load(Ordering::Relaxed) as usize;
    let first = *tally.first_drop.lock().await;
    let since_first = |t: Option<Instant>| Some(t?.duration_since(first?).as_secs_f64());
    Ok(FailoverReport {
        peers: pairs * 2,
        connected,
        dropped: tally.dropped.load(Ordering::Relaxed) as usize,
        reconnected,
        all_back_seconds: since_first(*tally.last_back.lock().await),
        all_signalling_seconds: since_first(*tally.last_pair.lock().await),
        reconnect_ms: tally.reconnect.lock().await.summary(),
        reconnect_attempts: tally.attempts.load(Ordering::Relaxed),
        pairs_signalling_again: tally.pairs_again.load(Ordering::Relaxed) as usize,
        server_cpu_per_reconnect_us: before.zip(after).map(|(b, a)| {
            a.cpu.saturating_sub(b.cpu).as_secs_f64() * 1e6 / reconnected.max(1) as f64
        }),
        errors: tally.errors.lock().await.clone().into_iter().collect(),
    })
}

/// The human summary of a report.
pub fn render(r: &FailoverReport) -> String {
    let secs = |s: Option<f64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s"));
    let mut out = format!(
        "failover: {} peers connected, {} dropped by their node, {} back on the other ({} attempts)\n\
         \x20 all back in their rooms      {}\n\
         \x20 all pairs signalling again   {} ({} pairs)\n\
         \x20 drop → welcome per peer      {}\n",
        r.connected,
        r.dropped,
        r.reconnected,
        r.reconnect_attempts,
        secs(r.all_back_seconds),
        secs(r.all_signalling_seconds),
        r.pairs_signalling_again,
        Summary::line_of(r.reconnect_ms, 1),
    );
    if let Some(us) = r.server_cpu_per_reconnect_us {
        out.push_str(&format!("  surviving node: {us:.1} µs CPU per reconnect\n"));
    }
    for (what, n) in &r.errors {
        out.push_str(&format!("  error {what}: {n}\n"));
    }
    out
}
