//! STUN Binding load: `requests` Binding requests over UDP with at most
//! `in_flight` outstanding, each answered or timed out; reports
//! bindings per second, latency and loss.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message};
use tokio::net::UdpSocket;

use crate::stats::{Samples, Summary};

/// Outcome of a Binding flood.
#[derive(Debug, Clone, Serialize)]
pub struct BindingReport {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub seconds: f64,
    pub bindings_per_sec: f64,
    /// Round-trip latency, milliseconds.
    pub latency_ms: Option<Summary>,
}

/// Sends `requests` Binding requests to `target`, at most `in_flight`
/// outstanding; each unanswered request is given up after `timeout`.
pub async fn run(
    target: SocketAddr,
    requests: u64,
    in_flight: usize,
    timeout: Duration,
) -> std::io::Result<BindingReport> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal address");
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(target).await?;
    let in_flight = in_flight.max(1);
    let mut pending: HashMap<[u8; 12], Instant> = HashMap::with_capacity(in_flight);
    let mut latency = Samples::default();
    let (mut sent, mut answered, mut lost) = (0u64, 0u64, 0u64);
    let mut msg = Message::new();
    let mut resp = Message::new();
    let mut buf = vec![0u8; 1500];
    let started = Instant::now();
    while answered + lost < requests {
        while pending.len() < in_flight && sent < requests {
            msg.build(&[
                Box::new(BINDING_REQUEST),
                Box::new(stun::agent::TransactionId::new()),
            ])
            .map_err(std::io::Error::other)?;
            socket.send(&msg.raw).await?;
            pending.insert(msg.transaction_id.0, Instant::now());
            sent += 1;
        }
        let oldest = pending.values().min().copied().unwrap_or_else(Instant::now);
        let deadline = oldest + timeout;
        match tokio::time::timeout_at(deadline.into(), socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                resp.raw.clear();
                resp.raw.extend_from_slice(&buf[..n]);
                if resp.decode().is_ok()
                    && resp.typ == BINDING_SUCCESS
                    && let Some(at) = pending.remove(&resp.transaction_id.0)
                {
                    latency.record_ms(at.elapsed());
                    answered += 1;
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let now = Instant::now();
                let before = pending.len();
                pending.retain(|_, at| now.duration_since(*at) < timeout);
                lost += (before - pending.len()) as u64;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(BindingReport {
        sent,
        answered,
        lost,
        seconds,
        bindings_per_sec: answered as f64 / seconds.max(1e-9),
        latency_ms: latency.summary(),
    })
}
