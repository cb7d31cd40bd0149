//! The full scenario: pairs of peers meet through signaling (join tokens
//! minted with a tenant API key), take the TURN credentials from their
//! `welcome`, allocate, swap relayed addresses over signaling, and move a
//! file each way through the relay: sequence-numbered, CRC-checked chunks
//! in a go-back-N window, so loss shows up as retransmission and
//! corruption is counted, never silently accepted. Afterwards the tenant's
//! ledger is read back from the control plane and compared with the bytes
//! the peers put through TURN.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use webrtc_util::Conn;

use crate::stats::{Samples, Summary};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// CRC-32 of every chunk.
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
const DATA: u8 = 0;
const ACK: u8 = 1;
/// Chunk header: type, sequence, CRC.
const HEADER: usize = 9;
/// Retransmission timeout bounds.
const MIN_RTO: Duration = Duration::from_millis(300);
const MAX_RTO: Duration = Duration::from_secs(3);

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
    /// Bytes each peer sends to its partner.
    #[arg(long, default_value_t = 65_536)]
    pub bytes: usize,
    /// Payload bytes per chunk.
    #[arg(long, default_value_t = 1_000)]
    pub chunk: usize,
    /// Chunks in flight per direction.
    #[arg(long, default_value_t = 32)]
    pub window: u32,
    /// New pairs per second.
    #[arg(long, default_value_t = 100.0)]
    pub join_rate: f64,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// Everything a transfer run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferReport {
    pub pairs: usize,
    pub transfers_verified: u64,
    pub transfers_failed: u64,
    pub join_ms: Option<Summary>,
    pub offer_answer_ms: Option<Summary>,
    pub allocation_ms: Option<Summary>,
    pub ice_to_first_byte_ms: Option<Summary>,
    pub transfer_ms: Option<Summary>,
    pub retransmissions: u64,
    pub corrupt_chunks: u64,
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
}

#[derive(Default)]
struct Tally {
    join: Mutex<Samples>,
    rtt: Mutex<Samples>,
    alloc: Mutex<Samples>,
    first_byte: Mutex<Samples>,
    transfer: Mutex<Samples>,
    verified: AtomicU64,
    failed: AtomicU64,
    retransmissions: AtomicU64,
    corrupt: AtomicU64,
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    async fn error(&self, e: impl Into<String>) {
        *self.errors.lock().await.entry(e.into()).or_default() += 1;
    }
}

fn token(args: &TransferArgs, room: &str, peer: &str) -> Result<String, String> {
    crate::join::join_token(&args.key_id, &args.key_secret, room, peer).map_err(|e| e.to_string())
}

async fn next_json(ws: &mut Ws, wait: Duration) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + wait;
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
async fn expect(ws: &mut Ws, kind: &str, wait: Duration) -> Result<Value, String> {
    loop {
        let m = next_json(ws, wait).await?;
        if m["type"] == kind {
            return Ok(m);
        }
        if m["type"] == "error" {
            return Err(format!("signal error {}", m["code"]));
        }
    }
}

/// TURN server address and credentials from a welcome's ICE servers.
fn turn_of(welcome: &Value) -> Result<(SocketAddr, String, String), String> {
    let servers = welcome["ice_servers"]["iceServers"]
        .as_array()
        .ok_or("welcome without ICE servers")?;
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
                && url.contains("transport=udp")
            {
                let host = rest.split('?').next().unwrap_or_default();
                let addr = host
                    .parse()
                    .map_err(|_| format!("TURN URL {url} is not ip:port"))?;
                return Ok((addr, user.to_owned(), pass.to_owned()));
            }
        }
    }
    Err(format!(
        "no TURN over UDP offered ({})",
        welcome["ice_servers"]["turn_refused"]
            .as_str()
            .unwrap_or("?")
    ))
}

/// One peer on the relay: its allocation and what it knows of the partner.
struct Relay {
    client: turn::client::Client,
    conn: Arc<dyn Conn + Send + Sync>,
}

async fn allocate(server: SocketAddr, user: String, pass: String) -> Result<Relay, String> {
    let socket = Arc::new(
        UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?,
    );
    let client = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user,
        password: pass,
        realm: String::new(),
        software: "floe-loadtest".into(),
        rto_in_ms: 0,
        conn: socket,
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
    Ok(Relay {
        client,
        conn: Arc::new(conn),
    })
}

fn chunk_payload(seq: u32, size: usize) -> Vec<u8> {
    (0..size).map(|i| (seq as usize * 31 + i) as u8).collect()
}

/// Sends `bytes` to `to` in a go-back-N window while receiving the
/// partner's file; returns when both directions are complete.
async fn exchange(
    relay: &Relay,
    to: SocketAddr,
    args: &TransferArgs,
    tally: &Tally,
    started: Instant,
) -> Result<(), String> {
    let chunks = args.bytes.div_ceil(args.chunk).max(1) as u32;
    let last_len = args.bytes - (chunks as usize - 1) * args.chunk;
    let acked = Arc::new(AtomicU32::new(0));
    let conn = relay.conn.clone();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let send = |buf: Vec<u8>| {
        let conn = conn.clone();
        async move {
            tally
                .sent_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            conn.send_to(&buf, to)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let packet = |seq: u32| {
        let len = if seq + 1 == chunks {
            last_len
        } else {
            args.chunk
        };
        let payload = chunk_payload(seq, len);
        let mut p = Vec::with_capacity(HEADER + len);
        p.push(DATA);
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&CRC32.checksum(&payload).to_be_bytes());
        p.extend_from_slice(&payload);
        p
    };
    // Receiver: in-order chunks, acked cumulatively.
    let receiver = {
        let (conn, acked) = (conn.clone(), acked.clone());
        async move {
            let mut expected = 0u32;
            let mut first = true;
            let mut buf = vec![0u8; 65_536];
            let mut acks_sent = 0u64;
            while Instant::now() < deadline {
                let (n, _) = match tokio::time::timeout(
                    Duration::from_millis(200),
                    conn.recv_from(&mut buf),
                )
                .await
                {
                    Ok(Ok(v)) => {
                        tally
                            .received_bytes
                            .fetch_add(v.0 as u64, Ordering::Relaxed);
                        v
                    }
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => {
                        if expected == chunks && acked.load(Ordering::Relaxed) == chunks {
                            return Ok(acks_sent);
                        }
                        // Re-ack, in case the last ack was lost.
                        let mut ack = vec![ACK];
                        ack.extend_from_slice(&expected.to_be_bytes());
                        send(ack).await?;
                        acks_sent += 1;
                        continue;
                    }
                };
                match buf.first() {
                    Some(&ACK) if n >= 5 => {
                        let next = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                        acked.fetch_max(next, Ordering::Relaxed);
                    }
                    Some(&DATA) if n >= HEADER => {
                        if first {
                            tally.first_byte.lock().await.record_ms(started.elapsed());
                            first = false;
                        }
                        let seq = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                        let crc = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                        let payload = &buf[HEADER..n];
                        if CRC32.checksum(payload) != crc {
                            tally.corrupt.fetch_add(1, Ordering::Relaxed);
                        } else if seq == expected {
                            let len = if seq + 1 == chunks {
                                last_len
                            } else {
                                args.chunk
                            };
                            if payload != chunk_payload(seq, len).as_slice() {
                                tally.corrupt.fetch_add(1, Ordering::Relaxed);
                            } else {
                                expected += 1;
                            }
                        }
                        let mut ack = vec![ACK];
                        ack.extend_from_slice(&expected.to_be_bytes());
                        send(ack).await?;
                        acks_sent += 1;
                    }
                    _ => {}
                }
                if expected == chunks && acked.load(Ordering::Relaxed) == chunks {
                    return Ok(acks_sent);
                }
            }
            Err(format!(
                "transfer timed out ({expected}/{chunks} chunks in)"
            ))
        }
    };
    // Sender: go-back-N with a congestion window (AIMD) capped by
    // --window, and a retransmission timeout that backs off, so thousands
    // of transfers sharing one relay slow down instead of collapsing.
    let sender = {
        let acked = acked.clone();
        async move {
            let mut next = 0u32;
            let mut base = 0u32;
            let mut cwnd = 2.0f64;
            let mut rto = MIN_RTO;
            let mut progress = Instant::now();
            while acked.load(Ordering::Relaxed) < chunks {
                if Instant::now() > deadline {
                    return Err("sender timed out".to_owned());
                }
                let now_acked = acked.load(Ordering::Relaxed);
                if now_acked > base {
                    // Additive increase: about one chunk per window acked.
                    cwnd = (cwnd + f64::from(now_acked - base) / cwnd).min(f64::from(args.window));
                    base = now_acked;
                    progress = Instant::now();
                    rto = MIN_RTO;
                }
                next = next.max(base);
                if progress.elapsed() > rto {
                    // Nothing acknowledged for a while: halve the window,
                    // back off, resend from the first unacknowledged chunk.
                    tally
                        .retransmissions
                        .fetch_add(u64::from(next - base), Ordering::Relaxed);
                    cwnd = (cwnd / 2.0).max(1.0);
                    rto = (rto * 2).min(MAX_RTO);
                    next = base;
                    progress = Instant::now();
                }
                if next < chunks && next < base + cwnd as u32 {
                    send(packet(next)).await?;
                    next += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok::<(), String>(())
        }
    };
    let (r, s) = tokio::join!(receiver, sender);
    r?;
    s
}

async fn connect(url: &str) -> Result<(Ws, Value, Duration), String> {
    let started = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let welcome = next_json(&mut ws, Duration::from_secs(10)).await?;
    if welcome["type"] != "welcome" {
        return Err(format!("join: {}", welcome["code"]));
    }
    Ok((ws, welcome, started.elapsed()))
}

/// One pair: a creates the room, both join, swap relayed addresses through
/// signaling, then transfer both ways.
async fn pair(i: usize, args: Arc<TransferArgs>, tally: Arc<Tally>) -> Result<(), String> {
    let http = reqwest::Client::new();
    let urls = &args.signal_urls;
    let (url_a, url_b) = (&urls[(2 * i) % urls.len()], &urls[(2 * i + 1) % urls.len()]);
    let room = format!("xfer-{}-{i}", std::process::id());
    let r = http
        .post(format!("{}/v1/rooms", url_a.trim_end_matches('/')))
        .bearer_auth(token(&args, &room, "a")?)
        .json(&json!({"ttl_secs": 3600}))
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
            token(&args, &room, peer)?
        ))
    };
    let (mut a, welcome_a, ja) = connect(&ws_url(url_a, "a")?).await?;
    let (mut b, welcome_b, jb) = connect(&ws_url(url_b, "b")?).await?;
    tally.join.lock().await.record_ms(ja);
    tally.join.lock().await.record_ms(jb);
    let ice_at = Instant::now();
    let wait = Duration::from_secs(10);
    expect(&mut a, "peer-joined", wait).await?;

    // Allocate on both sides with the credentials signaling handed out.
    let alloc_started = Instant::now();
    let (ta, tb) = (turn_of(&welcome_a)?, turn_of(&welcome_b)?);
    let (ra, rb) = tokio::join!(allocate(ta.0, ta.1, ta.2), allocate(tb.0, tb.1, tb.2));
    let (ra, rb) = (ra?, rb?);
    tally.alloc.lock().await.record_ms(alloc_started.elapsed());
    let addr_a = ra.conn.local_addr().map_err(|e| e.to_string())?;
    let addr_b = rb.conn.local_addr().map_err(|e| e.to_string())?;

    // Offer/answer carrying the relayed candidates.
    let sid_b = welcome_b["session_id"].clone();
    let offer_at = Instant::now();
    let offer = json!({"type": "signal", "to": "b", "sid": sid_b, "payload": {"type": "offer", "relay": addr_a.to_string()}});
    a.send(Message::text(offer.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let got = expect(&mut b, "signal", wait).await?;
    let partner_of_b: SocketAddr = got["payload"]["relay"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|_| "bad relay in offer")?;
    let answer = json!({"type": "signal", "to": "a", "sid": got["from_sid"], "payload": {"type": "answer", "relay": addr_b.to_string()}});
    b.send(Message::text(answer.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let got = expect(&mut a, "signal", wait).await?;
    tally.rtt.lock().await.record_ms(offer_at.elapsed());
    let partner_of_a: SocketAddr = got["payload"]["relay"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|_| "bad relay in answer")?;

    let transfer_started = Instant::now();
    let (x, y) = tokio::join!(
        exchange(&ra, partner_of_a, &args, &tally, ice_at),
        exchange(&rb, partner_of_b, &args, &tally, ice_at)
    );
    x?;
    y?;
    tally
        .transfer
        .lock()
        .await
        .record_ms(transfer_started.elapsed());
    // Report the path the bytes took, as a browser app does after a
    // transfer, so operators see the relayed share; then leave.
    let stats = json!({"type": "stats", "relayed_bytes": args.bytes}).to_string();
    for ws in [&mut a, &mut b] {
        ws.send(Message::text(stats.clone()))
            .await
            .map_err(|e| e.to_string())?;
    }
    for r in [&ra, &rb] {
        let _ = r.conn.close().await;
        let _ = r.client.close().await;
    }
    let _ = a.close(None).await;
    let _ = b.close(None).await;
    Ok(())
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

/// Runs the scenario.
pub async fn run(args: TransferArgs) -> TransferReport {
    let args = Arc::new(args);
    let tally = Arc::new(Tally::default());
    let before = ledger(&args).await;
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.join_rate.max(0.1));
    let pb = crate::progress_bar((2 * args.pairs) as u64, "relaying", "transfers, eta {eta}");
    let mut next = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        tokio::time::sleep_until(next).await;
        next += interval;
        let (args, tally, pb) = (args.clone(), tally.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = tokio::time::timeout(
                Duration::from_secs(args.timeout_secs),
                pair(i, args.clone(), tally.clone()),
            )
            .await
            .unwrap_or_else(|_| Err("pair timed out".into()));
            match outcome {
                Ok(()) => {
                    tally.verified.fetch_add(2, Ordering::Relaxed);
                }
                Err(e) => {
                    tally.failed.fetch_add(2, Ordering::Relaxed);
                    tally.error(e).await;
                }
            }
            pb.inc(2);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    pb.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    // Reconcile: TURN reports every few seconds; wait (bounded) for the
    // ledger to take in what the peers sent.
    let sent = tally.sent_bytes.load(Ordering::Relaxed);
    let received = tally.received_bytes.load(Ordering::Relaxed);
    let mut deltas = (0, 0);
    let mut reconciled = false;
    let before_ok = before.is_ok();
    if let Ok(b) = before {
        let deadline = Instant::now() + Duration::from_secs(30);
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
    } else if let Err(e) = before {
        tally.error(e).await;
    }
    TransferReport {
        pairs: args.pairs,
        transfers_verified: tally.verified.load(Ordering::Relaxed),
        transfers_failed: tally.failed.load(Ordering::Relaxed),
        join_ms: tally.join.lock().await.summary(),
        offer_answer_ms: tally.rtt.lock().await.summary(),
        allocation_ms: tally.alloc.lock().await.summary(),
        ice_to_first_byte_ms: tally.first_byte.lock().await.summary(),
        transfer_ms: tally.transfer.lock().await.summary(),
        retransmissions: tally.retransmissions.load(Ordering::Relaxed),
        corrupt_chunks: tally.corrupt.load(Ordering::Relaxed),
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
    }
}

/// The human summary of a report.
pub fn render(r: &TransferReport) -> String {
    let ms = |s: &Option<Summary>| Summary::line_of(*s, 1);
    let mut out = format!(
        "transfer: {} pairs, {} transfers verified, {} failed, in {:.1} s\n\
         \x20 join                        {}\n\
         \x20 offer→answer                {}\n\
         \x20 allocation                  {}\n\
         \x20 ICE servers → first byte    {}\n\
         \x20 transfer (both ways)        {}\n\
         \x20 retransmitted chunks {}  corrupt chunks {}\n\
         \x20 reconciliation: peers sent {} B to TURN, received {} B from it; ledger out {} B, in {} B → {}\n",
        r.pairs,
        r.transfers_verified,
        r.transfers_failed,
        r.seconds,
        ms(&r.join_ms),
        ms(&r.offer_answer_ms),
        ms(&r.allocation_ms),
        ms(&r.ice_to_first_byte_ms),
        ms(&r.transfer_ms),
        r.retransmissions,
        r.corrupt_chunks,
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
    );
    for (e, n) in &r.errors {
        out.push_str(&format!("  error {e}: {n}\n"));
    }
    out
}
