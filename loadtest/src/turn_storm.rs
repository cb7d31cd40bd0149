//! TURN allocation storm: `count` authenticated Allocates (each from its
//! own UDP socket, so each is a new 5-tuple), at most `in_flight` at once.
//! Credentials are TURN REST credentials made from a shared secret, which
//! floe and coturn (`use-auth-secret`) both accept. Reports allocations
//! per second, latency and failures by error code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE, Message, MessageType, Setter,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, Semaphore};

use crate::stats::{Samples, Summary};

/// Knobs of an allocation storm.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    /// TURN server address.
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub target: SocketAddr,
    /// TURN REST secret (shared with the server).
    #[arg(long, env = "FLOE_TURN_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Username after the expiry: floe reads `<kid>:<tenant>:<room>:<peer>`.
    #[arg(long, default_value = "k1:default:storm:peer")]
    pub user: String,
    /// Allocates to make.
    #[arg(long, default_value_t = 3_000)]
    pub count: usize,
    /// Allocates outstanding at once.
    #[arg(long, default_value_t = 100)]
    pub in_flight: usize,
    /// Give up on one request after this many milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub timeout_ms: u64,
}

/// Outcome of a storm.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub allocated: u64,
    pub failed: BTreeMap<String, u64>,
    pub seconds: f64,
    pub allocations_per_sec: f64,
    /// Both legs (401 challenge + authenticated Allocate), milliseconds.
    pub latency_ms: Option<Summary>,
}

/// Builds a request (setters are not `Send`, so this happens before any await).
fn build(setters: Vec<Box<dyn Setter>>) -> Result<Message, String> {
    let mut m = Message::new();
    m.build(&setters).map_err(|e| e.to_string())?;
    Ok(m)
}

async fn ask(sock: &UdpSocket, m: Message, timeout: Duration) -> Result<Message, String> {
    let mut buf = [0u8; 1_500];
    // Retransmit like a client would (RFC 8489 §6.2.1), within the timeout.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rto = Duration::from_millis(250);
    loop {
        sock.send(&m.raw).await.map_err(|e| e.to_string())?;
        let wait = (tokio::time::Instant::now() + rto).min(deadline);
        match tokio::time::timeout_at(wait, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let mut r = Message::new();
                r.raw = buf[..n].to_vec();
                r.decode().map_err(|e| e.to_string())?;
                if r.transaction_id == m.transaction_id {
                    return Ok(r);
                }
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) if tokio::time::Instant::now() >= deadline => return Err("timeout".into()),
            Err(_) => rto *= 2,
        }
    }
}

fn error_code(m: &Message) -> String {
    let mut e = ErrorCodeAttribute::default();
    match e.get_from(m) {
        Ok(()) => e.code.0.to_string(),
        Err(_) => "malformed".into(),
    }
}

/// One allocation; the socket is returned so its 5-tuple stays taken
/// (a reused client port would meet its own earlier allocation).
async fn one(args: &StormArgs, timeout: Duration) -> Result<(Duration, UdpSocket), String> {
    let bind = if args.target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(args.target).await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let transport = || turn::proto::reqtrans::RequestedTransport {
        protocol: turn::proto::PROTO_UDP,
    };
    let req = build(vec![
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(stun::agent::TransactionId::new()),
        Box::new(transport()),
    ])?;
    let first = ask(&sock, req, timeout).await?;
    let (realm, nonce) = match (first.get(ATTR_REALM), first.get(ATTR_NONCE)) {
        (Ok(r), Ok(n)) => (
            String::from_utf8_lossy(&r).into_owned(),
            String::from_utf8_lossy(&n).into_owned(),
        ),
        _ => return Err(format!("challenge {}", error_code(&first))),
    };
    let username = format!("{}:{}", floe_proto::time::unix_now() + 3_600, args.user);
    let password = floe_proto::credential::turn_password(args.secret.as_bytes(), &username);
    let req = build(vec![
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(stun::agent::TransactionId::new()),
        Box::new(transport()),
        Box::new(TextAttribute::new(ATTR_USERNAME, username.clone())),
        Box::new(TextAttribute::new(ATTR_REALM, realm.clone())),
        Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
        Box::new(MessageIntegrity::new_long_term_integrity(
            username, realm, password,
        )),
    ])?;
    let second = ask(&sock, req, timeout).await?;
    if second.typ.class == CLASS_SUCCESS_RESPONSE {
        Ok((started.elapsed(), sock))
    } else {
        Err(error_code(&second))
    }
}

/// Runs the storm.
pub async fn run(args: StormArgs) -> StormReport {
    let args = Arc::new(args);
    let timeout = Duration::from_millis(args.timeout_ms);
    let gate = Arc::new(Semaphore::new(args.in_flight.max(1)));
    let latency = Arc::new(Mutex::new(Samples::default()));
    let failed = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let held = Arc::new(Mutex::new(Vec::with_capacity(args.count)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        let (args, latency, failed, held) =
            (args.clone(), latency.clone(), failed.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            match one(&args, timeout).await {
                Ok((d, sock)) => {
                    latency.lock().await.record_ms(d);
                    held.lock().await.push(sock);
                }
                Err(e) => *failed.lock().await.entry(e).or_default() += 1,
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let latency = latency.lock().await;
    StormReport {
        allocated: latency.len() as u64,
        failed: failed.lock().await.clone(),
        seconds,
        allocations_per_sec: latency.len() as f64 / seconds.max(1e-9),
        latency_ms: latency.summary(),
    }
}
