//! TURN allocations (RFC 8656 §2.2, §9–§12): the relayed transport address
//! of one client 5-tuple, its permissions and channel bindings, its
//! lifetime, its traffic counters for metering and its bit-rate bucket.
//!
//! Plain state owned by one [`crate::core::Core`] (no lock, no socket);
//! only the traffic counters are shared, with whoever settles a send
//! (a shard driver, a stream connection's writer).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use floe_common::ratelimit::TokenBucket;
use floe_proto::credential::TurnUsername;

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

    /// A snapshot.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            packets_out: self.packets_out.load(Ordering::Relaxed),
            packets_in: self.packets_in.load(Ordering::Relaxed),
        }
    }
}

/// Relayed payload on its way out, and the counters it is billed to once
/// it has gone: the one place a relayed byte is counted.
pub(crate) struct Credit {
    pub counters: Arc<Counters>,
    pub bytes: usize,
    /// Towards the client ("in"), or towards a peer ("out").
    pub inbound: bool,
}

impl Credit {
    /// Bills the payload: it left.
    pub fn bill(&self) {
        if self.inbound {
            self.counters.record_in(self.bytes);
        } else {
            self.counters.record_out(self.bytes);
        }
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

/// One allocation.
pub(crate) struct Allocation {
    pub client: SocketAddr,
    pub transport: Transport,
    pub user: TurnUsername,
    /// The relayed transport address clients are told (external IP applied).
    pub relayed: SocketAddr,
    /// Transaction id of the Allocate that created it (retransmissions).
    pub created_by: [u8; 12],
    pub counters: Arc<Counters>,
    /// Counters already put into usage batches.
    pub reported: Traffic,
    expires: Instant,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, (SocketAddr, Instant)>,
    by_peer: HashMap<SocketAddr, u16>,
    /// Bits per second cap, when the plan has one.
    bucket: Option<TokenBucket>,
    /// The last route each way, so a flow of datagrams reads the maps
    /// once, not per datagram (each map lookup is a cache miss or two).
    /// Valid until the earliest expiry it depends on; any change to the
    /// permissions or channels forgets them.
    to_peer: Option<ToPeer>,
    from_peer: Option<FromPeer>,
}

#[derive(Debug, Clone, Copy)]
struct ToPeer {
    channel: u16,
    peer: SocketAddr,
    until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct FromPeer {
    peer: SocketAddr,
    channel: Option<u16>,
    until: Instant,
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
        relayed: SocketAddr,
        created_by: [u8; 12],
        lifetime: Duration,
        bitrate: Option<u64>,
        now: Instant,
    ) -> Self {
        Self {
            client,
            transport,
            user,
            relayed,
            created_by,
            counters: Arc::default(),
            reported: Traffic::default(),
            expires: now + lifetime,
            permissions: HashMap::new(),
            channels: HashMap::new(),
            by_peer: HashMap::new(),
            // Bits; a burst of one second's worth.
            bucket: bitrate.map(|bps| {
                TokenBucket::new(bps as f64, u32::try_from(bps).unwrap_or(u32::MAX), now)
            }),
            to_peer: None,
            from_peer: None,
        }
    }

    /// Forgets the cached routes (permissions or channels changed).
    fn changed(&mut self) {
        self.to_peer = None;
        self.from_peer = None;
    }

    fn permission(&self, ip: IpAddr, now: Instant) -> Option<Instant> {
        self.permissions.get(&ip).copied().filter(|t| *t > now)
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.expires <= now
    }

    /// Time left before expiry.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires.saturating_duration_since(now)
    }

    pub fn refresh(&mut self, lifetime: Duration, now: Instant) {
        self.expires = now + lifetime;
    }

    /// Installs or refreshes a permission for `ip`.
    pub fn permit(&mut self, ip: IpAddr, now: Instant) {
        self.permissions.insert(ip, now + PERMISSION_LIFETIME);
        self.changed();
    }

    /// Binds `channel` to `peer` (or refreshes the binding), installing a
    /// permission for the peer's IP (RFC 8656 §12.2).
    pub fn bind(&mut self, channel: u16, peer: SocketAddr, now: Instant) -> Result<(), BindError> {
        if !CHANNELS.contains(&channel) {
            return Err(BindError::OutOfRange);
        }
        if let Some((bound, _)) = self.channels.get(&channel)
            && *bound != peer
        {
            return Err(BindError::NumberTaken);
        }
        if let Some(n) = self.by_peer.get(&peer)
            && *n != channel
        {
            return Err(BindError::PeerTaken);
        }
        self.channels
            .insert(channel, (peer, now + CHANNEL_LIFETIME));
        self.by_peer.insert(peer, channel);
        self.permissions
            .insert(peer.ip(), now + PERMISSION_LIFETIME);
        self.changed();
        Ok(())
    }

    /// Whether data to or from `ip` is permitted now.
    pub fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        if let Some(r) = self.to_peer
            && r.peer.ip() == ip
            && now < r.until
        {
            return true;
        }
        self.permission(ip, now).is_some()
    }

    /// The peer bound to `channel`, if the binding and the peer's
    /// permission are live.
    pub fn channel_peer(&mut self, channel: u16, now: Instant) -> Option<SocketAddr> {
        if let Some(r) = self.to_peer
            && r.channel == channel
            && now < r.until
        {
            return Some(r.peer);
        }
        let (peer, bound) = self.channels.get(&channel).filter(|(_, t)| *t > now)?;
        let (peer, bound) = (*peer, *bound);
        let permitted = self.permission(peer.ip(), now)?;
        self.to_peer = Some(ToPeer {
            channel,
            peer,
            until: bound.min(permitted),
        });
        Some(peer)
    }

    /// The live channel bound to `peer`, if any, and whether the peer is
    /// permitted at all.
    pub fn route_from_peer(&mut self, peer: SocketAddr, now: Instant) -> (bool, Option<u16>) {
        if let Some(r) = self.from_peer
            && r.peer == peer
            && now < r.until
        {
            return (true, r.channel);
        }
        let Some(permitted) = self.permission(peer.ip(), now) else {
            return (false, None);
        };
        let channel = self.by_peer.get(&peer).and_then(|n| {
            let (_, t) = self.channels.get(n).filter(|(_, t)| *t > now)?;
            Some((*n, *t))
        });
        self.from_peer = Some(FromPeer {
            peer,
            channel: channel.map(|(n, _)| n),
            until: channel.map_or(permitted, |(_, t)| t.min(permitted)),
        });
        (true, channel.map(|(n, _)| n))
    }

    /// Takes `bytes` worth of bit-rate budget; `false`: over the cap.
    pub fn within_rate(&mut self, bytes: usize, now: Instant) -> bool {
        match &mut self.bucket {
            Some(b) => b.take((bytes * 8) as f64, now),
            None => true,
        }
    }

    /// Drops expired permissions and channels.
    pub fn prune(&mut self, now: Instant) {
        self.changed();
        self.permissions.retain(|_, t| *t > now);
        let by_peer = &mut self.by_peer;
        self.channels.retain(|_, (peer, t)| {
            let live = *t > now;
            if !live {
                by_peer.remove(peer);
            }
            live
        });
    }

    /// Traffic since the last call (and marks it reported).
    pub fn take_unreported(&mut self) -> Traffic {
        let now = self.counters.traffic();
        let delta = now.minus(&self.reported);
        self.reported = now;
        delta
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An allocation of tenant `t`, room `r`, for client 127.0.0.1:5000.
    pub(crate) fn allocation(bitrate: Option<u64>, now: Instant) -> Allocation {
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
            "127.0.0.1:30000".parse().expect("addr"),
            [0; 12],
            Duration::from_secs(600),
            bitrate,
            now,
        )
    }

    #[test]
    fn permissions_and_channels_expire_and_conflict() {
        let t0 = Instant::now();
        let mut a = allocation(None, t0);
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

    /// The cached routes never outlive what they were read from: a
    /// channel bound after a route without one is seen at once, and
    /// expiry ends a cached route.
    #[test]
    fn cached_routes_follow_changes_and_expiry() {
        let t0 = Instant::now();
        let mut a = allocation(None, t0);
        let peer: SocketAddr = "198.51.100.1:4000".parse().expect("addr");
        a.permit(peer.ip(), t0);
        assert_eq!(a.route_from_peer(peer, t0), (true, None));
        a.bind(0x4001, peer, t0 + Duration::from_secs(200))
            .expect("bind");
        assert_eq!(a.route_from_peer(peer, t0), (true, Some(0x4001)));
        assert_eq!(a.channel_peer(0x4001, t0), Some(peer));
        // The bind refreshed the permission to 200 + 300 s.
        let late = t0 + Duration::from_secs(499);
        assert_eq!(a.channel_peer(0x4001, late), Some(peer));
        assert_eq!(a.route_from_peer(peer, late), (true, Some(0x4001)));
        let gone = t0 + Duration::from_secs(500);
        assert_eq!(a.channel_peer(0x4001, gone), None);
        assert_eq!(a.route_from_peer(peer, gone), (false, None));
        assert!(!a.permitted(peer.ip(), gone));
    }

    /// Credits settled from other threads (a driver, a stream writer)
    /// while the owner takes deltas: the deltas add up to the counters.
    #[test]
    fn concurrent_credits_add_up_in_the_reports() {
        let mut a = allocation(None, Instant::now());
        let counters = a.counters.clone();
        let done = std::sync::atomic::AtomicBool::new(false);
        let mut total = Traffic::default();
        let add = |t: &mut Traffic, d: Traffic| {
            t.bytes_out += d.bytes_out;
            t.bytes_in += d.bytes_in;
            t.packets_out += d.packets_out;
            t.packets_in += d.packets_in;
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..1_000_000 {
                    Credit {
                        counters: counters.clone(),
                        bytes: 3 + 2 * (i % 2),
                        inbound: i % 2 == 1,
                    }
                    .bill();
                }
                done.store(true, Ordering::Relaxed);
            });
            while !done.load(Ordering::Relaxed) {
                add(&mut total, a.take_unreported());
            }
        });
        add(&mut total, a.take_unreported());
        assert_eq!(
            (
                total.bytes_out,
                total.bytes_in,
                total.packets_out,
                total.packets_in
            ),
            (1_500_000, 2_500_000, 500_000, 500_000)
        );
    }

    #[test]
    fn counters_report_deltas_and_bitrate_caps() {
        let t0 = Instant::now();
        let mut a = allocation(Some(80_000), t0);
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
