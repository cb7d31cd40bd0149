//! STUN Binding load: `requests` Binding requests over UDP from several
//! sockets, at most `in_flight` outstanding in all, each answered or timed
//! out; reports bindings per second, latency and loss.
//!
//! The client must cost less per request than the server it measures, or
//! the figure is the client's: requests are 20 fixed bytes with the
//! sequence number in the transaction id, sent in one segmented send
//! (UDP GSO; `sendmmsg` where the kernel cannot) and received in batches
//! (`recvmmsg`), and answers are checked in place.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use floe_common::udp_batch::{MAX_SEGMENTS, RecvBatch, SendBatch, send_segmented};
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::stats::{Samples, Summary};

/// Outcome of a Binding flood.
#[derive(Debug, Clone, Serialize)]
pub struct BindingReport {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub sockets: usize,
    pub seconds: f64,
    pub bindings_per_sec: f64,
    /// Round-trip latency, milliseconds.
    pub latency_ms: Option<Summary>,
}

/// The shape of a flood.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    pub requests: u64,
    /// Outstanding requests over all sockets.
    pub in_flight: usize,
    /// Client sockets (distinct source ports, so a server spreading
    /// clients over cores sees several).
    pub sockets: usize,
    /// An unanswered request is given up after this.
    pub timeout: Duration,
}

/// How often timed-out requests are looked for.
const SWEEP: Duration = Duration::from_millis(10);
/// A Binding request without attributes: the header alone.
const REQUEST_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = 0x2112_A442u32.to_be_bytes();
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// One socket's share of the flood.
#[derive(Default)]
struct Part {
    sent: u64,
    answered: u64,
    lost: u64,
    latency: Samples,
}

/// Floods `target` with Binding requests; an error when not one was
/// answered (so "is it up?" probes can use it).
pub async fn run(target: SocketAddr, flood: Flood) -> std::io::Result<BindingReport> {
    let sockets = flood.sockets.clamp(1, 256);
    let in_flight = flood.in_flight.max(sockets);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..sockets {
        let requests = flood.requests / sockets as u64
            + u64::from((i as u64) < flood.requests % sockets as u64);
        let window = in_flight / sockets + usize::from(i < in_flight % sockets);
        let bind: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(target).await?;
        workers.spawn(worker(
            socket,
            target,
            i as u32,
            requests,
            window,
            flood.timeout,
        ));
    }
    let mut total = Part::default();
    while let Some(done) = workers.join_next().await {
        let part = done.map_err(std::io::Error::other)??;
        total.sent += part.sent;
        total.answered += part.answered;
        total.lost += part.lost;
        total.latency.merge(&part.latency);
    }
    if total.answered == 0 && flood.requests > 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("none of {} Binding requests was answered", total.sent),
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(BindingReport {
        sent: total.sent,
        answered: total.answered,
        lost: total.lost,
        sockets,
        seconds,
        bindings_per_sec: total.answered as f64 / seconds.max(1e-9),
        latency_ms: total.latency.summary(),
    })
}

/// A Binding request whose transaction id is `worker` then `seq`.
fn request(worker: u32, seq: u64) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..2].copy_from_slice(&[0x00, 0x01]);
    r[4..8].copy_from_slice(&MAGIC_COOKIE);
    r[8..12].copy_from_slice(&worker.to_be_bytes());
    r[12..20].copy_from_slice(&seq.to_be_bytes());
    r
}

/// The sequence number a Binding success response answers, when it is one
/// for `worker` and carries an XOR-MAPPED-ADDRESS.
fn answered_seq(resp: &[u8], worker: u32) -> Option<u64> {
    let header = resp.get(..20)?;
    if header[0..2] != [0x01, 0x01]
        || header[4..8] != MAGIC_COOKIE
        || header[8..12] != worker.to_be_bytes()
        || usize::from(u16::from_be_bytes([header[2], header[3]])) + 20 != resp.len()
    {
        return None;
    }
    let mut at = 20;
    let mut mapped = false;
    while let Some(attr) = resp.get(at..at + 4) {
        let len = usize::from(u16::from_be_bytes([attr[2], attr[3]]));
        mapped |= u16::from_be_bytes([attr[0], attr[1]]) == ATTR_XOR_MAPPED_ADDRESS && len >= 8;
        at += 4 + len.div_ceil(4) * 4;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[12..20]);
    (mapped && at == resp.len()).then_some(u64::from_be_bytes(seq))
}

async fn worker(
    socket: UdpSocket,
    target: SocketAddr,
    id: u32,
    requests: u64,
    window: usize,
    timeout: Duration,
) -> std::io::Result<Part> {
    let mut part = Part::default();
    let mut pending: HashMap<u64, Instant> = HashMap::with_capacity(window);
    let mut answers = RecvBatch::new(socket.local_addr()?, 512);
    let mut requests_out = SendBatch::default();
    let mut segmented = Vec::with_capacity(REQUEST_LEN * MAX_SEGMENTS);
    let mut gso = true;
    let mut last_sweep = Instant::now();
    while part.answered + part.lost < requests {
        let now = Instant::now();
        while pending.len() < window
            && part.sent < requests
            && segmented.len() < REQUEST_LEN * MAX_SEGMENTS
        {
            segmented.extend_from_slice(&request(id, part.sent));
            pending.insert(part.sent, now);
            part.sent += 1;
        }
        if gso
            && !segmented.is_empty()
            && send_segmented(&socket, &segmented, REQUEST_LEN as u16)
                .await
                .is_err()
        {
            gso = false;
        }
        if !gso {
            for r in segmented.chunks(REQUEST_LEN) {
                requests_out.push(r, target);
            }
            // A request the kernel refused is never answered: it times out.
            requests_out.flush(&socket).await;
        }
        segmented.clear();
        // One timer per wake-up, not per answer.
        if let Ok(got) = tokio::time::timeout(SWEEP, answers.recv(&socket)).await {
            for i in 0..got? {
                let (buf, len, _) = answers.get_mut(i);
                if let Some(at) = answered_seq(&buf[..len], id).and_then(|s| pending.remove(&s)) {
                    part.latency.record_ms(at.elapsed());
                    part.answered += 1;
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= SWEEP {
            last_sweep = now;
            let before = pending.len();
            pending.retain(|_, at| now.duration_since(*at) < timeout);
            part.lost += (before - pending.len()) as u64;
        }
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_to_their_requests_only() {
        let req = request(7, 42);
        let mut m = stun::message::Message::new();
        m.raw = req.to_vec();
        m.decode().expect("a well-formed Binding request");
        assert_eq!(m.typ, stun::message::BINDING_REQUEST);

        let resp = |worker: u32, seq: u64, attrs: &[u8]| {
            let mut r = request(worker, seq).to_vec();
            r[0..2].copy_from_slice(&[0x01, 0x01]);
            r[2..4].copy_from_slice(&(attrs.len() as u16).to_be_bytes());
            r.extend_from_slice(attrs);
            r
        };
        let mapped = [0x00, 0x20, 0x00, 0x08, 0, 1, 0x12, 0x34, 1, 2, 3, 4];
        assert_eq!(answered_seq(&resp(7, 42, &mapped), 7), Some(42));
        // Another worker's, no XOR-MAPPED-ADDRESS, truncated, an error.
        assert_eq!(answered_seq(&resp(8, 42, &mapped), 7), None);
        assert_eq!(answered_seq(&resp(7, 42, &[]), 7), None);
        assert_eq!(answered_seq(&resp(7, 42, &mapped[..8]), 7), None);
        let mut error = resp(7, 42, &mapped);
        error[0..2].copy_from_slice(&[0x01, 0x11]);
        assert_eq!(answered_seq(&error, 7), None);
        assert_eq!(answered_seq(&[1, 1, 0], 7), None);
    }
}
