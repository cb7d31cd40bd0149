//! TURN allocations (RFC 8656 §2.2, §9–§12): the relayed transport address
//! of one client 5-tuple, its permissions and channel bindings, its
//! lifetime, its traffic counters for metering and its bit-rate bucket.
//!
//! An allocation is shared by the task reading the client's socket and the
//! task reading its relay socket; per-packet state sits behind one
//! uncontended mutex, counters are atomics.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use floe_common::ratelimit::TokenBucket;
use floe_proto::credential::TurnUsername;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Permission lifetime (RFC 8656 §9).
pub(crate) const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 §12).
pub(crate) const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// Channel numbers accepted. RFC 8656 §12 allows 0x4000–0x4FFF; RFC 5766
/// allowed up to 0x7FFE, and clients still use it (coturn's tools do),
/// so the older range is accepted for interoperability.
pub(crate) const CHANNELS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFE;

/// Client transport of a 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Transport {
    Udp = 0,
    Tcp = 1,
    Tls = 2,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// How bytes reach a client.
#[derive(Clone)]
pub(crate) enum ClientSink {
    Udp {
        socket: Arc<UdpSocket>,
        addr: SocketAddr,
    },
    /// A stream connection's writer queue.
    Stream(mpsc::Sender<Outbound>),
}

/// Framed bytes on their way to a stream client, and the relayed payload
/// they carry with the counters to bill it to: billed "in" once written
/// to the socket, so bytes a connection never took are not billed.
pub(crate) struct Outbound {
    pub bytes: Bytes,
    pub credit: Option<(Arc<Counters>, usize)>,
}

/// Why relayed bytes did not reach a client (the `reason` label of the
/// discard metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// The kernel refused a UDP send.
    SendFailed,
    /// A stream client's queue was full: it reads slower than it is sent to.
    Slow,
    /// A stream client's connection is gone.
    Gone,
}

impl Undelivered {
    pub fn reason(self) -> &'static str {
        match self {
            Self::SendFailed => "client_send_failed",
            Self::Slow => "client_slow",
            Self::Gone => "client_gone",
        }
    }
}

impl ClientSink {
    /// Hands `bytes`, carrying `payload` relayed bytes, to the client,
    /// without waiting. Over UDP they are billed when the kernel takes
    /// them; over a stream when the writer has written them.
    pub fn relay(
        &self,
        bytes: &[u8],
        payload: usize,
        counters: &Arc<Counters>,
    ) -> Result<(), Undelivered> {
        match self {
            // The kernel decides, not tokio's readiness (see `Turn::to_peer`).
            Self::Udp { socket, addr } => {
                socket2::SockRef::from(&**socket)
                    .send_to(bytes, &(*addr).into())
                    .map_err(|_| Undelivered::SendFailed)?;
                counters.record_in(payload);
                Ok(())
            }
            Self::Stream(tx) => tx
                .try_send(Outbound {
                    bytes: Bytes::copy_from_slice(bytes),
                    credit: Some((counters.clone(), payload)),
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => Undelivered::Slow,
                    mpsc::error::TrySendError::Closed(_) => Undelivered::Gone,
                }),
        }
    }
}

/// Traffic counters: client→peer is "out", peer→client is "in".
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub packets_in: AtomicU64,
}

impl Counters {
    pub fn record_out(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
        self.packets_out.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_in(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
        self.packets_in.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Traffic {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl Traffic {
    /// `self - earlier`, counter by counter. Counters only grow, so a
    /// negative difference would be a bug; it saturates at 0 rather than
    /// panicking the reporter or wrapping into an absurd bill.
    pub fn minus(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
            bytes_in: self.bytes_in.saturating_sub(earlier.bytes_in),
            packets_out: self.packets_out.saturating_sub(earlier.packets_out),
            packets_in: self.packets_in.saturating_sub(earlier.packets_in),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Traffic::default()
    }
}

struct State {
    expires: Instant,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, (SocketAddr, Instant)>,
    by_peer: HashMap<SocketAddr, u16>,
    /// Bits per second cap, when the plan has one.
    bucket: Option<TokenBucket>,
    /// Counters already put into usage batches.
    reported: Traffic,
}

/// One allocation.
pub(crate) struct Allocation {
    pub client: SocketAddr,
    pub transport: Transport,
    pub user: TurnUsername,
    pub relay: Arc<UdpSocket>,
    /// The relayed transport address clients are told (external IP applied).
    pub relayed: SocketAddr,
    pub sink: ClientSink,
    /// Transaction id of the Allocate that created it (retransmissions).
    pub created_by: [u8; 12],
    pub counters: Arc<Counters>,
    pub closed: CancellationToken,
    state: Mutex<State>,
}

/// Why a channel could not be bound (400 Bad Request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindError {
    OutOfRange,
    NumberTaken,
    PeerTaken,
}

impl Allocation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: SocketAddr,
        transport: Transport,
        user: TurnUsername,
        relay: Arc<UdpSocket>,
        relayed: SocketAddr,
        sink: ClientSink,
        created_by: [u8; 12],
        lifetime: Duration,
        bitrate: Option<u64>,
        now: Instant,
    ) -> Self {
        Self {
            client,
            transport,
            user,
            relay,
            relayed,
            sink,
            created_by,
            counters: Arc::default(),
            closed: CancellationToken::new(),
            state: Mutex::new(State {
                expires: now + lifetime,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                by_peer: HashMap::new(),
                // Bits; a burst of one second's worth.
                bucket: bitrate.map(|bps| {
                    TokenBucket::new(bps as f64, u32::try_from(bps).unwrap_or(u32::MAX), now)
                }),
                reported: Traffic::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.state().expires <= now
    }

    /// Time left before expiry.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.state().expires.saturating_duration_since(now)
    }

    pub fn refresh(&self, lifetime: Duration, now: Instant) {
        self.state().expires = now + lifetime;
    }

    /// Installs or refreshes a permission for `ip`.
    pub fn permit(&self, ip: IpAddr, now: Instant) {
        self.state()
            .permissions
            .insert(ip, now + PERMISSION_LIFETIME);
    }

    /// Binds `channel` to `peer` (or refreshes the binding), installing a
    /// permission for the peer's IP (RFC 8656 §12.2).
    pub fn bind(&self, channel: u16, peer: SocketAddr, now: Instant) -> Result<(), BindError> {
        if !CHANNELS.contains(&channel) {
            return Err(BindError::OutOfRange);
        }
        let mut s = self.state();
        if let Some((bound, _)) = s.channels.get(&channel)
            && *bound != peer
        {
            return Err(BindError::NumberTaken);
        }
        if let Some(n) = s.by_peer.get(&peer)
            && *n != channel
        {
            return Err(BindError::PeerTaken);
        }
        s.channels.insert(channel, (peer, now + CHANNEL_LIFETIME));
        s.by_peer.insert(peer, channel);
        s.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
        Ok(())
    }

    /// Whether data to or from `ip` is permitted now.
    pub fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.state().permissions.get(&ip).is_some_and(|t| *t > now)
    }

    /// The peer bound to `channel`, if the binding is live.
    pub fn channel_peer(&self, channel: u16, now: Instant) -> Option<SocketAddr> {
        let s = self.state();
        s.channels
            .get(&channel)
            .filter(|(_, t)| *t > now)
            .map(|(p, _)| *p)
            .filter(|p| s.permissions.get(&p.ip()).is_some_and(|t| *t > now))
    }

    /// The live channel bound to `peer`, if any, and whether the peer is
    /// permitted at all.
    pub fn route_from_peer(&self, peer: SocketAddr, now: Instant) -> (bool, Option<u16>) {
        let s = self.state();
        let permitted = s.permissions.get(&peer.ip()).is_some_and(|t| *t > now);
        let channel = s
            .by_peer
            .get(&peer)
            .copied()
            .filter(|n| s.channels.get(n).is_some_and(|(_, t)| *t > now));
        (permitted, channel)
    }

    /// Takes `bytes` worth of bit-rate budget; `false`: over the cap.
    pub fn within_rate(&self, bytes: usize, now: Instant) -> bool {
        match &mut self.state().bucket {
            Some(b) => b.take((bytes * 8) as f64, now),
            None => true,
        }
    }

    /// Drops expired permissions and channels.
    pub fn prune(&self, now: Instant) {
        let mut s = self.state();
        s.permissions.retain(|_, t| *t > now);
        let State {
            channels, by_peer, ..
        } = &mut *s;
        channels.retain(|_, (peer, t)| {
            let live = *t > now;
            if !live {
                by_peer.remove(peer);
            }
            live
        });
    }

    /// Traffic since the last call (and marks it reported).
    pub fn take_unreported(&self) -> Traffic {
        // The counters are read under the lock: read before it, a
        // concurrent call (a close racing the report task) could store a
        // later reading first, and this one would then go backwards.
        let mut s = self.state();
        let now = Traffic {
            bytes_out: self.counters.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.counters.bytes_in.load(Ordering::Relaxed),
            packets_out: self.counters.packets_out.load(Ordering::Relaxed),
            packets_in: self.counters.packets_in.load(Ordering::Relaxed),
        };
        let delta = now.minus(&s.reported);
        s.reported = now;
        delta
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An allocation of tenant `t`, room `r`, for client 127.0.0.1:5000.
    pub(crate) async fn allocation(bitrate: Option<u64>, now: Instant) -> Allocation {
        let relay = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let addr = relay.local_addr().expect("addr");
        Allocation::new(
            "127.0.0.1:5000".parse().expect("addr"),
            Transport::Udp,
            TurnUsername {
                expires: 0,
                kid: "k".into(),
                tenant: "t".into(),
                room: "r".into(),
                peer: "p".into(),
            },
            relay.clone(),
            addr,
            ClientSink::Udp {
                socket: relay,
                addr,
            },
            [0; 12],
            Duration::from_secs(600),
            bitrate,
            now,
        )
    }

    /// Two reporters (the report task and a close) and a relay racing:
    /// the deltas add up to the final counters, none goes backwards.
    #[tokio::test]
    async fn concurrent_reports_add_up_to_the_counters() {
        let a = Arc::new(allocation(None, Instant::now()).await);
        let total = std::sync::Mutex::new(Traffic::default());
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..2_000_000 {
                    a.counters.record_out(3);
                    a.counters.record_in(5);
                }
                done.store(true, Ordering::Relaxed);
            });
            for _ in 0..3 {
                scope.spawn(|| {
                    while !done.load(Ordering::Relaxed) {
                        let d = a.take_unreported();
                        let mut t = total.lock().expect("lock");
                        t.bytes_out += d.bytes_out;
                        t.bytes_in += d.bytes_in;
                        t.packets_out += d.packets_out;
                        t.packets_in += d.packets_in;
                    }
                });
            }
        });
        let mut t = total.into_inner().expect("lock");
        let last = a.take_unreported();
        t.bytes_out += last.bytes_out;
        t.bytes_in += last.bytes_in;
        t.packets_out += last.packets_out;
        t.packets_in += last.packets_in;
        assert_eq!(
            (t.bytes_out, t.bytes_in, t.packets_out, t.packets_in),
            (6_000_000, 10_000_000, 2_000_000, 2_000_000)
        );
    }

    #[tokio::test]
    async fn permissions_and_channels_expire_and_conflict() {
        let t0 = Instant::now();
        let a = allocation(None, t0).await;
        let peer: SocketAddr = "198.51.100.1:4000".parse().expect("addr");
        assert!(!a.permitted(peer.ip(), t0));
        a.permit(peer.ip(), t0);
        assert!(a.permitted(peer.ip(), t0 + Duration::from_secs(299)));
        assert!(!a.permitted(peer.ip(), t0 + PERMISSION_LIFETIME));

        assert_eq!(a.bind(0x3FFF, peer, t0), Err(BindError::OutOfRange));
        assert_eq!(a.bind(0x4000, peer, t0), Ok(()));
        assert_eq!(a.bind(0x4000, peer, t0), Ok(()), "refresh is allowed");
        let other: SocketAddr = "198.51.100.2:4000".parse().expect("addr");
        assert_eq!(a.bind(0x4000, other, t0), Err(BindError::NumberTaken));
        assert_eq!(a.bind(0x4001, peer, t0), Err(BindError::PeerTaken));
        assert_eq!(a.channel_peer(0x4000, t0), Some(peer));
        assert_eq!(a.route_from_peer(peer, t0), (true, Some(0x4000)));
        let later = t0 + CHANNEL_LIFETIME;
        a.prune(later);
        assert_eq!(a.channel_peer(0x4000, later), None);
        assert_eq!(a.bind(0x4001, peer, later), Ok(()), "freed after expiry");
    }

    #[tokio::test]
    async fn counters_report_deltas_and_bitrate_caps() {
        let t0 = Instant::now();
        let a = allocation(Some(80_000), t0).await;
        a.counters.record_out(100);
        a.counters.record_in(40);
        a.counters.record_in(60);
        let d = a.take_unreported();
        assert_eq!(
            (d.bytes_out, d.bytes_in, d.packets_out, d.packets_in),
            (100, 100, 1, 2)
        );
        assert!(a.take_unreported().is_zero());
        a.counters.record_out(1);
        assert_eq!(a.take_unreported().bytes_out, 1);
        // 80 kbit/s: 10,000 bytes at once, then nothing until refilled.
        assert!(a.within_rate(10_000, t0));
        assert!(!a.within_rate(1_000, t0));
        assert!(a.within_rate(1_000, t0 + Duration::from_millis(100)));
    }
}
