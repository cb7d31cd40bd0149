//! The file transfer two simulated peers run through their TURN relays:
//! sequence-numbered, CRC-checked chunks sent in a go-back-N window with
//! an AIMD congestion window, an adaptive retransmission timeout (RFC 6298)
//! and an optional send rate, acknowledged cumulatively. Loss shows up as
//! retransmission, corruption is counted, and nothing is accepted unless it
//! is the exact chunk expected.
//!
//! Files go in rounds (one per round and direction); every packet carries
//! its round so a late duplicate from an earlier round is never mistaken
//! for new data. Both sides of a pair keep acknowledging until both have
//! finished the round, so the last acknowledgement's loss cannot strand the
//! partner.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use webrtc_util::Conn;

/// CRC-32 of every chunk.
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
const DATA: u8 = 0;
const ACK: u8 = 1;
const PROBE: u8 = 2;
/// DATA header: type, round, sequence, CRC of the payload.
const DATA_HEADER: usize = 13;
/// ACK: type, round, next sequence expected.
const ACK_LEN: usize = 9;
/// Retransmission timeout before the first round-trip sample, and its bounds.
const INITIAL_RTO: Duration = Duration::from_millis(300);
const MIN_RTO: Duration = Duration::from_millis(50);
const MAX_RTO: Duration = Duration::from_secs(3);
/// How long the receiver waits for a packet before re-acknowledging.
const IDLE: Duration = Duration::from_millis(200);
/// Silence after a round that counts as nothing left in flight. Under
/// load a relay queues for a good part of this (20 ms left a few hundred
/// bytes of late acks unread, and so unmatched, at 2,000 peers).
const QUIET: Duration = Duration::from_millis(250);

/// The shape of one file.
#[derive(Debug, Clone, Copy)]
pub struct FileShape {
    /// Total payload bytes.
    pub bytes: usize,
    /// Payload bytes per chunk.
    pub chunk: usize,
    /// Largest congestion window, chunks.
    pub window: u32,
    /// Payload send rate limit, bit/s (0: none).
    pub rate_bps: u64,
}

impl FileShape {
    /// Chunks in the file (an empty file still sends one empty chunk).
    pub fn chunks(&self) -> u32 {
        self.bytes.div_ceil(self.chunk.max(1)).max(1) as u32
    }

    fn len_of(&self, seq: u32) -> usize {
        if seq + 1 == self.chunks() {
            self.bytes - (self.chunks() as usize - 1) * self.chunk
        } else {
            self.chunk
        }
    }
}

/// The retransmission timer of RFC 6298: a smoothed round trip and its
/// variation from chunks sent once (Karn's rule is the caller's), doubled
/// per timeout in a row. A fixed timeout fires spuriously once a loaded
/// relay queues for longer, and go-back-N then resends whole windows.
#[derive(Debug, Default)]
struct RtoTimer {
    srtt: Option<Duration>,
    rttvar: Duration,
    backoff: u32,
}

impl RtoTimer {
    fn sample(&mut self, rtt: Duration) {
        self.backoff = 0;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                self.rttvar = (self.rttvar * 3 + srtt.abs_diff(rtt)) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    fn rto(&self) -> Duration {
        let base = self
            .srtt
            .map_or(INITIAL_RTO, |srtt| srtt + self.rttvar * 4)
            .clamp(MIN_RTO, MAX_RTO);
        (base * 2u32.pow(self.backoff)).min(MAX_RTO)
    }

    fn back_off(&mut self) {
        self.backoff = (self.backoff + 1).min(6);
    }
}

/// One round of a pair: what both sides share.
pub struct Round<'a> {
    pub number: u32,
    pub shape: FileShape,
    pub counters: &'a Counters,
    /// When both sides give up.
    pub deadline: Instant,
    /// Sides that have sent and received everything.
    finished: AtomicU8,
    wake: Notify,
}

impl<'a> Round<'a> {
    pub fn new(number: u32, shape: FileShape, counters: &'a Counters, deadline: Instant) -> Self {
        Self {
            number,
            shape,
            counters,
            deadline,
            finished: AtomicU8::new(0),
            wake: Notify::new(),
        }
    }

    /// One side: it sends over `conn` to the partner's relayed address
    /// `to` and stores the chunks it has received in order in `progress`.
    pub fn side(
        &'a self,
        conn: &'a (dyn Conn + Send + Sync),
        to: SocketAddr,
        progress: &'a AtomicU32,
    ) -> Side<'a> {
        Side {
            conn,
            to,
            progress,
            round: self,
        }
    }

    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_waiters();
    }

    fn both_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire) >= 2
    }
}

/// Counters a transfer adds to.
#[derive(Default)]
pub struct Counters {
    /// Bytes handed to TURN (chunks, retransmissions and acks).
    pub sent_bytes: AtomicU64,
    /// Bytes read from TURN.
    pub received_bytes: AtomicU64,
    /// Chunks sent again after a timeout.
    pub retransmissions: AtomicU64,
    /// Chunks whose CRC or content was wrong.
    pub corrupt: AtomicU64,
    /// Payload bytes received in order and verified.
    pub verified_bytes: AtomicU64,
}

/// One side of one round.
pub struct Side<'a> {
    conn: &'a (dyn Conn + Send + Sync),
    to: SocketAddr,
    progress: &'a AtomicU32,
    round: &'a Round<'a>,
}

/// Byte `i` of chunk `seq` of `round`: a pattern the receiver can check
/// without keeping a copy.
fn pattern(round: u32, seq: u32) -> impl Fn(usize) -> u8 {
    let base = (round as usize).wrapping_mul(7) + (seq as usize).wrapping_mul(31);
    move |i| base.wrapping_add(i) as u8
}

fn is_payload(round: u32, seq: u32, body: &[u8]) -> bool {
    let byte = pattern(round, seq);
    body.iter().enumerate().all(|(i, b)| *b == byte(i))
}

fn data_packet(round: u32, seq: u32, len: usize) -> Vec<u8> {
    let byte = pattern(round, seq);
    let mut p = Vec::with_capacity(DATA_HEADER + len);
    p.push(DATA);
    p.extend_from_slice(&round.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend((0..len).map(&byte));
    let crc = CRC32.checksum(&p[DATA_HEADER..]);
    p[9..DATA_HEADER].copy_from_slice(&crc.to_be_bytes());
    p
}

fn ack_packet(round: u32, next: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(ACK_LEN);
    p.push(ACK);
    p.extend_from_slice(&round.to_be_bytes());
    p.extend_from_slice(&next.to_be_bytes());
    p
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A packet as the receiver sees it.
#[derive(Debug, PartialEq)]
enum Packet<'a> {
    Ack {
        round: u32,
        next: u32,
    },
    Data {
        round: u32,
        seq: u32,
        crc: u32,
        body: &'a [u8],
    },
    Probe,
    Junk,
}

fn parse(p: &[u8]) -> Packet<'_> {
    match p.first() {
        Some(&ACK) if p.len() == ACK_LEN => Packet::Ack {
            round: be32(&p[1..]),
            next: be32(&p[5..]),
        },
        Some(&DATA) if p.len() >= DATA_HEADER => Packet::Data {
            round: be32(&p[1..]),
            seq: be32(&p[5..]),
            crc: be32(&p[9..]),
            body: &p[DATA_HEADER..],
        },
        Some(&PROBE) if p.len() == 1 => Packet::Probe,
        _ => Packet::Junk,
    }
}

/// Opens the path to `to` before the first round, as ICE checks would:
/// the first send makes the TURN client install its permission for the
/// partner, so the partner's first chunks are not dropped by TURN for want
/// of one (which would cost them a retransmission timeout). A probe that
/// arrives before the partner's own permission is relayed (billed out) but
/// not delivered (not billed in), which is what the peers count too.
pub async fn open_path(
    conn: &(dyn Conn + Send + Sync),
    to: SocketAddr,
    counters: &Counters,
) -> Result<(), String> {
    counters.sent_bytes.fetch_add(1, Ordering::Relaxed);
    conn.send_to(&[PROBE], to)
        .await
        .map(|_| ())
        .map_err(|e| format!("opening the path: {e}"))
}

impl Side<'_> {
    async fn send(&self, p: Vec<u8>) -> Result<(), String> {
        self.round
            .counters
            .sent_bytes
            .fetch_add(p.len() as u64, Ordering::Relaxed);
        self.conn
            .send_to(&p, self.to)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Sends this side's file and receives the partner's; returns when
    /// both sides of the pair have finished the round. `first_byte` is
    /// called with the arrival time of the first chunk.
    pub async fn exchange(&self, first_byte: impl FnOnce(Instant)) -> Result<(), String> {
        let acked = AtomicU32::new(0);
        let ack_arrived = Notify::new();
        let (r, s) = tokio::join!(
            self.receive(&acked, &ack_arrived, first_byte),
            self.transmit(&acked, &ack_arrived)
        );
        r.and(s)
    }

    async fn receive(
        &self,
        acked: &AtomicU32,
        ack_arrived: &Notify,
        first_byte: impl FnOnce(Instant),
    ) -> Result<(), String> {
        let chunks = self.round.shape.chunks();
        let mut first_byte = Some(first_byte);
        let mut expected = 0u32;
        let mut finished = false;
        let mut buf = vec![0u8; 65_536];
        loop {
            if !finished && expected == chunks && acked.load(Ordering::Acquire) == chunks {
                finished = true;
                self.round.finish();
            }
            if self.round.both_finished() {
                self.drain(&mut buf).await;
                return Ok(());
            }
            if Instant::now() > self.round.deadline {
                return Err(format!(
                    "transfer timed out ({expected}/{chunks} chunks in, {}/{chunks} acked)",
                    acked.load(Ordering::Relaxed)
                ));
            }
            let n = tokio::select! {
                r = tokio::time::timeout(IDLE, self.conn.recv_from(&mut buf)) => match r {
                    Ok(Ok((n, _))) => n,
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => {
                        // Quiet: re-acknowledge in case the last ack was lost.
                        self.send(ack_packet(self.round.number, expected)).await?;
                        continue;
                    }
                },
                _ = self.round.wake.notified() => continue,
            };
            self.round
                .counters
                .received_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            match parse(&buf[..n]) {
                Packet::Ack { round, next } if round == self.round.number => {
                    acked.fetch_max(next.min(chunks), Ordering::AcqRel);
                    ack_arrived.notify_one();
                }
                Packet::Data {
                    round,
                    seq,
                    crc,
                    body,
                } if round == self.round.number => {
                    if let Some(f) = first_byte.take() {
                        f(Instant::now());
                    }
                    if CRC32.checksum(body) != crc {
                        self.round.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    } else if seq == expected {
                        if body.len() == self.round.shape.len_of(seq)
                            && is_payload(self.round.number, seq, body)
                        {
                            expected += 1;
                            self.progress.store(expected, Ordering::Relaxed);
                            self.round
                                .counters
                                .verified_bytes
                                .fetch_add(body.len() as u64, Ordering::Relaxed);
                        } else {
                            self.round.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.send(ack_packet(self.round.number, expected)).await?;
                }
                // Late duplicates of another round, or not ours at all.
                _ => {}
            }
        }
    }

    /// Reads (and counts) what is still in flight once the round is over,
    /// such as acks of resent chunks, until the path is quiet: TURN bills
    /// what it relayed, so the peers' count must include it too.
    async fn drain(&self, buf: &mut [u8]) {
        while let Ok(Ok((n, _))) = tokio::time::timeout(QUIET, self.conn.recv_from(buf)).await {
            self.round
                .counters
                .received_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Go-back-N with a congestion window (AIMD) capped by the shape's
    /// window, a retransmission timeout that backs off, and the shape's
    /// rate limit, so thousands of transfers sharing one relay slow down
    /// instead of collapsing.
    async fn transmit(&self, acked: &AtomicU32, ack_arrived: &Notify) -> Result<(), String> {
        let chunks = self.round.shape.chunks();
        let started = Instant::now();
        let (mut next, mut base) = (0u32, 0u32);
        let mut cwnd = 2.0f64;
        let mut timer = RtoTimer::default();
        // One chunk in flight is timed at a time; none that was resent.
        let mut timed: Option<(u32, Instant)> = None;
        let mut highest_sent = 0u32;
        let mut progress = Instant::now();
        let mut payload_sent = 0u64;
        while acked.load(Ordering::Acquire) < chunks {
            let now = Instant::now();
            if now > self.round.deadline {
                return Err("sender timed out".to_owned());
            }
            let now_acked = acked.load(Ordering::Acquire);
            if now_acked > base {
                // Additive increase: about one chunk per window acked.
                cwnd = (cwnd + f64::from(now_acked - base) / cwnd)
                    .min(f64::from(self.round.shape.window));
                base = now_acked;
                progress = now;
                if let Some((seq, at)) = timed
                    && base > seq
                {
                    timer.sample(now - at);
                    timed = None;
                }
            }
            next = next.max(base);
            if now.duration_since(progress) > timer.rto() {
                // Nothing acknowledged for a while: halve the window, back
                // off, resend from the first unacknowledged chunk.
                self.round
                    .counters
                    .retransmissions
                    .fetch_add(u64::from(next - base), Ordering::Relaxed);
                cwnd = (cwnd / 2.0).max(1.0);
                timer.back_off();
                timed = None;
                next = base;
                progress = now;
            }
            if self.round.shape.rate_bps > 0 {
                let due = started
                    + Duration::from_secs_f64(
                        payload_sent as f64 * 8.0 / self.round.shape.rate_bps as f64,
                    );
                if due > now {
                    tokio::time::sleep(due - now).await;
                    continue;
                }
            }
            if next < chunks && next < base + cwnd as u32 {
                let len = self.round.shape.len_of(next);
                if next >= highest_sent && timed.is_none() {
                    timed = Some((next, now));
                }
                self.send(data_packet(self.round.number, next, len)).await?;
                payload_sent += len as u64;
                next += 1;
                highest_sent = highest_sent.max(next);
            } else {
                // Window full: sleep until an ack arrives or the timeout.
                let wake = (progress + timer.rto()).max(now + Duration::from_millis(1));
                let _ = tokio::time::timeout_at(wake.into(), ack_arrived.notified()).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    #[test]
    fn packets_parse_back() {
        let d = data_packet(3, 9, 5);
        let Packet::Data {
            round,
            seq,
            crc,
            body,
        } = parse(&d)
        else {
            panic!("not data: {d:?}");
        };
        assert_eq!((round, seq, body.len()), (3, 9, 5));
        assert!(is_payload(3, 9, body));
        assert_eq!(crc, CRC32.checksum(body));
        assert_eq!(parse(&ack_packet(2, 7)), Packet::Ack { round: 2, next: 7 });
        assert_eq!(parse(&[ACK, 0, 0]), Packet::Junk);
        assert_eq!(parse(&[PROBE]), Packet::Probe);
        assert_eq!(parse(&[]), Packet::Junk);
        // Rounds differ in content, so a stale round cannot pass as new.
        assert!(!is_payload(1, 9, body));
        assert!(!is_payload(3, 8, body));
    }

    #[test]
    fn retransmission_timer_follows_the_round_trip() {
        let ms = Duration::from_millis;
        let mut t = RtoTimer::default();
        assert_eq!(t.rto(), INITIAL_RTO);
        t.sample(ms(100));
        // srtt 100, rttvar 50: 100 + 4 × 50.
        assert_eq!(t.rto(), ms(300));
        for _ in 0..50 {
            t.sample(ms(10));
        }
        assert_eq!(t.rto(), MIN_RTO, "a fast path is floored");
        t.back_off();
        t.back_off();
        assert_eq!(t.rto(), MIN_RTO * 4);
        for _ in 0..10 {
            t.back_off();
        }
        assert_eq!(t.rto(), MAX_RTO);
        t.sample(ms(2_000));
        assert_eq!(t.backoff, 0, "a sample ends the backoff");
        assert!(t.rto() > ms(2_000));
    }

    #[test]
    fn shape_splits_the_file() {
        let s = FileShape {
            bytes: 2_500,
            chunk: 1_000,
            window: 4,
            rate_bps: 0,
        };
        assert_eq!(s.chunks(), 3);
        assert_eq!((s.len_of(0), s.len_of(2)), (1_000, 500));
        let empty = FileShape { bytes: 0, ..s };
        assert_eq!((empty.chunks(), empty.len_of(0)), (1, 0));
    }

    /// A lossy datagram path between two sockets: drops every `drop_every`th
    /// packet it is asked to send.
    struct Lossy {
        sock: UdpSocket,
        sent: AtomicU64,
        drop_every: u64,
    }

    #[async_trait::async_trait]
    impl Conn for Lossy {
        async fn connect(&self, _: SocketAddr) -> webrtc_util::Result<()> {
            Ok(())
        }
        async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
            Ok(self.sock.recv(buf).await?)
        }
        async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
            Ok(self.sock.recv_from(buf).await?)
        }
        async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
            Ok(self.sock.send(buf).await?)
        }
        async fn send_to(&self, buf: &[u8], to: SocketAddr) -> webrtc_util::Result<usize> {
            if self.sent.fetch_add(1, Ordering::Relaxed) % self.drop_every == self.drop_every - 1 {
                return Ok(buf.len());
            }
            Ok(self.sock.send_to(buf, to).await?)
        }
        fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
            Ok(self.sock.local_addr()?)
        }
        fn remote_addr(&self) -> Option<SocketAddr> {
            None
        }
        async fn close(&self) -> webrtc_util::Result<()> {
            Ok(())
        }
        fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
            self
        }
    }

    /// Two rounds over paths that lose one packet in eleven one way and
    /// one in nine the other: every chunk arrives verified, the loss shows
    /// up as retransmissions, and both rounds end.
    #[tokio::test]
    async fn rounds_complete_over_a_lossy_path() {
        let lossy = |drop_every| async move {
            Lossy {
                sock: UdpSocket::bind("127.0.0.1:0").await.expect("bind"),
                sent: AtomicU64::new(0),
                drop_every,
            }
        };
        let (a, b) = (lossy(11).await, lossy(9).await);
        let (addr_a, addr_b) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        let shape = FileShape {
            bytes: 20_000,
            chunk: 1_000,
            window: 8,
            rate_bps: 0,
        };
        let counters = Counters::default();
        let (pa, pb) = (AtomicU32::new(0), AtomicU32::new(0));
        let deadline = Instant::now() + Duration::from_secs(60);
        for round in 0..2 {
            let r = Round::new(round, shape, &counters, deadline);
            let (sa, sb) = (r.side(&a, addr_b, &pa), r.side(&b, addr_a, &pb));
            let (x, y) = tokio::join!(sa.exchange(|_| {}), sb.exchange(|_| {}));
            x.expect("a's round");
            y.expect("b's round");
            assert_eq!(
                (pa.load(Ordering::Relaxed), pb.load(Ordering::Relaxed)),
                (20, 20)
            );
        }
        assert_eq!(counters.verified_bytes.load(Ordering::Relaxed), 4 * 20_000);
        assert_eq!(counters.corrupt.load(Ordering::Relaxed), 0);
        assert!(counters.retransmissions.load(Ordering::Relaxed) > 0);
    }
}
