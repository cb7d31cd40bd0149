//! The TURN server's protocol core (RFC 8656 over RFC 8489), without I/O:
//! a [`Core`] is fed [`Input`]s with the time ([`Core::handle`]) and
//! leaves [`Outputs`]: datagrams for clients, peers and other shards,
//! relay sockets to bind or close. Long-term credentials, the allocation
//! table, permissions, channels, lifetimes, quotas, bit-rate caps and the
//! relay rules in both directions all live here; sockets, threads and
//! clocks live in [`crate::driver`].
//!
//! One core per shard, each owning its allocations outright (no lock on
//! the per-packet path). What shards share ([`Shared`]: counts against
//! the caps, the relay port owners, the auth-failure limiter) is touched
//! when an allocation opens or closes, never per packet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use floe_common::ratelimit::RateLimiter;
use floe_proto::credential::{TurnSecrets, TurnUsername};
use slab::Slab;
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::*;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

use crate::allocation::{Allocation, BindError, Counters, Credit, Traffic, Transport};
use crate::auth::{AuthError, Authenticator};
use crate::binding;
use crate::config::Settings;
use crate::framing::{self, Frame};
use crate::meter::Meter;
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Refused};

/// Default allocation lifetime (RFC 8656 §3.2).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Attempts at finding a free relay port.
const PORT_ATTEMPTS: usize = 50;
/// Largest datagram relayed.
pub(crate) const MAX_DATAGRAM: usize = 65_535;
/// How often expired allocations, permissions and channels are swept.
const SWEEP: Duration = Duration::from_secs(1);

/// The time, as a core sees it: monotonic for lifetimes and caps, Unix
/// seconds for credential and nonce expiry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub at: Instant,
    pub unix: u64,
}

impl Now {
    pub fn real() -> Self {
        Self {
            at: Instant::now(),
            unix: floe_proto::time::unix_now(),
        }
    }
}

/// What a core is fed.
pub(crate) enum Input<'a> {
    /// A UDP datagram, or one whole stream frame, from a client.
    Client {
        from: SocketAddr,
        transport: Transport,
        data: &'a [u8],
    },
    /// A datagram allocation `relay`'s socket received from `from`.
    Peer {
        relay: usize,
        from: SocketAddr,
        data: &'a [u8],
    },
    /// A datagram another shard's allocation (relayed at `from`) sent to
    /// this shard's relayed address `to`, handed over in memory.
    Hairpin {
        from: SocketAddr,
        to: SocketAddr,
        data: &'a [u8],
    },
    /// The driver's answer to [`Event::Bind`]: the bound address, or
    /// `None` when the port was taken.
    Bound {
        open: u64,
        local: Option<SocketAddr>,
    },
    /// Time passed (at or after [`Core::timeout`]).
    Timer,
    /// New enforcement state from the control plane.
    Policy(Arc<Policy>),
    /// New TURN secrets.
    Secrets(Arc<TurnSecrets>),
    /// A stream client's connection ended: its allocation ends with it.
    Disconnected {
        from: SocketAddr,
        transport: Transport,
    },
    /// Close every allocation (the server is stopping).
    CloseAll,
    /// Move every allocation's unreported traffic into the meter.
    Collect,
}

/// Where a [`Transmit`] goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// To the client at `to`, over the transport of its 5-tuple.
    Client(Transport),
    /// From allocation `relay`'s socket to the peer at `to`.
    Relay(usize),
    /// In memory to shard `shard`'s allocation relayed at `to`, from the
    /// relayed address `from`.
    Shard { shard: usize, from: SocketAddr },
}

/// A datagram (or stream frame) to send: `bytes[span]` of [`Outputs`].
pub(crate) struct Transmit {
    pub via: Via,
    pub to: SocketAddr,
    pub span: std::ops::Range<usize>,
    /// Relayed payload it carries, billed once it has gone.
    pub credit: Option<Credit>,
}

/// Socket work for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Bind a UDP relay socket at `addr`, then feed [`Input::Bound`].
    Bind { open: u64, addr: SocketAddr },
    /// The socket bound for `open` now serves allocation `relay`.
    Opened { open: u64, relay: usize },
    /// The socket bound for `open` is not needed (refused at commit).
    Abandon { open: u64 },
    /// Allocation `relay` closed: close its socket.
    Close { relay: usize },
}

/// What a core leaves for its driver; drained by the driver after each
/// batch of inputs.
#[derive(Default)]
pub(crate) struct Outputs {
    pub bytes: Vec<u8>,
    pub transmits: Vec<Transmit>,
    pub events: std::collections::VecDeque<Event>,
}

impl Outputs {
    fn push(&mut self, via: Via, to: SocketAddr, data: &[u8], credit: Option<Credit>) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        self.transmits.push(Transmit {
            via,
            to,
            span: start..self.bytes.len(),
            credit,
        });
    }

    /// Forgets what was sent.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.transmits.clear();
    }
}

/// Allocation counts against `--max-allocations` and the plans' quotas.
#[derive(Default)]
struct Counts {
    total: usize,
    per_tenant: HashMap<String, u32>,
}

/// Which shard owns each relayed transport address, so a datagram for
/// another shard's allocation is handed over without a lookup under a
/// lock: one byte per (advertised IP, relay port), 0 for none.
struct Owners {
    ips: Vec<IpAddr>,
    ports: (u16, u16),
    table: Vec<AtomicU8>,
}

impl Owners {
    fn new(settings: &Settings) -> Self {
        let mut ips: Vec<IpAddr> = settings
            .relay_ips
            .iter()
            .map(|ip| advertised_ip(settings, *ip))
            .collect();
        // Relay IPs advertised as one external IP share its rows.
        ips.sort_unstable();
        ips.dedup();
        let (lo, hi) = settings.relay_ports;
        let span = usize::from(hi.saturating_sub(lo)) + 1;
        Self {
            table: (0..ips.len() * span).map(|_| AtomicU8::new(0)).collect(),
            ips,
            ports: (lo, hi),
        }
    }

    fn slot(&self, addr: SocketAddr) -> Option<&AtomicU8> {
        let (lo, hi) = self.ports;
        if !(lo..=hi).contains(&addr.port()) {
            return None;
        }
        let ip = self.ips.iter().position(|ip| *ip == addr.ip())?;
        let span = usize::from(hi - lo) + 1;
        self.table.get(ip * span + usize::from(addr.port() - lo))
    }

    fn get(&self, addr: SocketAddr) -> Option<usize> {
        match self.slot(addr)?.load(Ordering::Acquire) {
            0 => None,
            n => Some(usize::from(n) - 1),
        }
    }

    fn set(&self, addr: SocketAddr, shard: Option<usize>) {
        if let Some(slot) = self.slot(addr) {
            let v = shard.map_or(0, |s| u8::try_from(s + 1).unwrap_or(0));
            slot.store(v, Ordering::Release);
        }
    }
}

/// The address clients are told for a relay socket bound on `ip`.
fn advertised_ip(settings: &Settings, ip: IpAddr) -> IpAddr {
    settings
        .external_ip
        .filter(|e| e.is_ipv4() == ip.is_ipv4())
        .unwrap_or(ip)
}

/// What every shard's core shares. Touched when allocations open and
/// close and on authentication failures; never per relayed packet
/// (except [`Owners`], an atomic load).
pub(crate) struct Shared {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub meter: Arc<Meter>,
    auth: Authenticator,
    counts: Mutex<Counts>,
    failures: Mutex<RateLimiter<IpAddr>>,
    draining: AtomicBool,
    next_port: AtomicUsize,
    owners: Owners,
}

impl Shared {
    pub fn new(settings: Settings, metrics: Arc<Metrics>, meter: Arc<Meter>) -> Self {
        let per_min = settings.auth_failures_per_min.max(1);
        Self {
            auth: Authenticator::new(&settings.realm, settings.nonce_lifetime.as_secs()),
            counts: Mutex::default(),
            failures: Mutex::new(RateLimiter::new(
                f64::from(per_min) / 60.0,
                per_min,
                100_000,
            )),
            draining: AtomicBool::new(false),
            next_port: AtomicUsize::new(rand::random::<u16>() as usize),
            owners: Owners::new(&settings),
            settings,
            metrics,
            meter,
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocations open on every shard.
    pub fn allocation_count(&self) -> usize {
        self.counts().total
    }

    /// Refuses new allocations from now on (existing ones keep relaying).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Gives back an allocation's place under the caps.
    fn release(&self, tenant: &str) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_tenant.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_tenant.remove(tenant);
            }
        }
    }

    /// The next relay port to try (an even one for EVEN-PORT; `None` when
    /// the turn fell on the range's odd last port).
    fn next_port(&self, even: bool) -> Option<u16> {
        let (lo, hi) = self.settings.relay_ports;
        let span = usize::from(hi - lo) + 1;
        let mut port = lo + (self.next_port.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if even && port % 2 == 1 {
            if port == hi {
                return None;
            }
            port += 1;
        }
        Some(port)
    }
}

/// Metrics of the per-packet path, resolved once.
struct Hot {
    binding_answered: [prometheus::IntCounter; 3],
    not_stun: prometheus::IntCounter,
    malformed: prometheus::IntCounter,
    bad_datagram: prometheus::IntCounter,
    no_allocation: prometheus::IntCounter,
    no_channel: prometheus::IntCounter,
    hairpinned: prometheus::IntCounter,
    no_permission: Discard,
    bitrate: Discard,
}

/// A discard reason's two counters (datagrams and payload bytes).
#[derive(Clone)]
pub(crate) struct Discard {
    packets: prometheus::IntCounter,
    bytes: prometheus::IntCounter,
}

impl Discard {
    pub fn new(metrics: &Metrics, reason: &str) -> Self {
        Self {
            packets: metrics.discarded.with_label_values(&[reason]),
            bytes: metrics.discarded_bytes.with_label_values(&[reason]),
        }
    }

    pub fn count(&self, bytes: usize) {
        self.packets.inc();
        self.bytes.inc_by(bytes as u64);
    }
}

impl Hot {
    fn new(m: &Metrics) -> Self {
        let discarded = |r: &str| m.discarded.with_label_values(&[r]);
        Self {
            binding_answered: [Transport::Udp, Transport::Tcp, Transport::Tls].map(|t| {
                m.stun_requests
                    .with_label_values(&["binding", t.as_str(), "success"])
            }),
            not_stun: discarded("not_stun"),
            malformed: discarded("malformed"),
            bad_datagram: discarded("bad_datagram"),
            no_allocation: discarded("no_allocation"),
            no_channel: discarded("no_channel"),
            hairpinned: m.hairpinned.clone(),
            no_permission: Discard::new(m, "no_permission"),
            bitrate: Discard::new(m, "bitrate"),
        }
    }
}

/// A STUN error to answer with.
struct Failure {
    code: ErrorCode,
    reason: &'static str,
    /// Attach REALM and NONCE (401, 438).
    challenge: bool,
}

fn fail(code: ErrorCode, reason: &'static str) -> Failure {
    Failure {
        code,
        reason,
        challenge: false,
    }
}

/// An Allocate waiting for its relay socket.
struct Opening {
    client: SocketAddr,
    transport: Transport,
    user: TurnUsername,
    txid: TransactionId,
    integrity: MessageIntegrity,
    lifetime: Duration,
    bitrate: Option<u64>,
    decline_v6: bool,
    even: bool,
    ip: IpAddr,
    attempts: usize,
}

/// An allocation closed since the last usage cut: a send settled after
/// the close still counts on it, and the next cut bills that.
struct Closed {
    user: TurnUsername,
    counters: Arc<Counters>,
    reported: Traffic,
}

/// One shard's TURN state machine.
pub(crate) struct Core {
    shard: usize,
    shared: Arc<Shared>,
    secrets: Option<Arc<TurnSecrets>>,
    /// What the control plane last said; `None` until known, and then
    /// allocations are refused.
    policy: Option<Arc<Policy>>,
    allocations: Slab<Allocation>,
    by_client: HashMap<(SocketAddr, Transport), usize>,
    /// The same allocations by relayed transport address, so a datagram
    /// for one of them skips the kernel round trip.
    by_relay: HashMap<SocketAddr, usize>,
    opening: HashMap<u64, Opening>,
    next_open: u64,
    closed: Vec<Closed>,
    next_sweep: Instant,
    hot: Hot,
    out: Outputs,
}

impl Core {
    pub fn new(
        shard: usize,
        shared: Arc<Shared>,
        secrets: Option<Arc<TurnSecrets>>,
        policy: Option<Arc<Policy>>,
        now: Instant,
    ) -> Self {
        Self {
            shard,
            hot: Hot::new(&shared.metrics),
            shared,
            secrets,
            policy,
            allocations: Slab::new(),
            by_client: HashMap::new(),
            by_relay: HashMap::new(),
            opening: HashMap::new(),
            next_open: 0,
            closed: Vec::new(),
            next_sweep: now + SWEEP,
            out: Outputs::default(),
        }
    }

    /// What the inputs so far left to do.
    pub fn outputs(&mut self) -> &mut Outputs {
        &mut self.out
    }

    /// When to feed [`Input::Timer`] next.
    pub fn timeout(&self) -> Instant {
        self.next_sweep
    }

    /// Counts a Binding request answered over `transport` (answers the
    /// driver gives itself, for NAT behaviour discovery).
    pub fn count_binding_answer(&self, transport: Transport) {
        self.hot.binding_answered[transport as usize].inc();
    }

    /// Feeds one input. Returns the TURN method's name when it was a
    /// request (for the driver's latency histogram).
    pub fn handle(&mut self, now: Now, input: Input<'_>) -> Option<&'static str> {
        match input {
            Input::Client {
                from,
                transport,
                data,
            } => return self.on_client(now, from, transport, data),
            Input::Peer { relay, from, data } => {
                if self.allocations.contains(relay) {
                    self.relay_to_client(relay, from, data, now.at);
                }
            }
            Input::Hairpin { from, to, data } => match self.by_relay.get(&to) {
                Some(&b) => self.relay_to_client(b, from, data, now.at),
                None => self.hot.no_allocation.inc(),
            },
            Input::Bound { open, local } => self.bound(now, open, local),
            Input::Timer => self.sweep(now.at),
            Input::Policy(p) => self.apply_policy(p),
            Input::Secrets(s) => self.secrets = Some(s),
            Input::Disconnected { from, transport } => {
                if let Some(&key) = self.by_client.get(&(from, transport)) {
                    self.close(key, "connection", "connection closed");
                }
            }
            Input::CloseAll => {
                let keys: Vec<usize> = self.allocations.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.close(key, "shutdown", "server shutting down");
                }
            }
            Input::Collect => self.collect(),
        }
        None
    }

    fn on_client(
        &mut self,
        now: Now,
        from: SocketAddr,
        transport: Transport,
        data: &[u8],
    ) -> Option<&'static str> {
        match framing::next_frame(data, transport != Transport::Udp) {
            Ok(Some(Frame::ChannelData {
                channel, data: n, ..
            })) => {
                self.channel_data(from, transport, channel, &data[4..4 + n], now.at);
                None
            }
            Ok(Some(Frame::Stun { len })) if len == data.len() => {
                self.on_stun(now, data, from, transport)
            }
            _ => {
                self.hot.bad_datagram.inc();
                None
            }
        }
    }

    /// Answers `bytes` to the client at `to`.
    fn reply(&mut self, transport: Transport, to: SocketAddr, bytes: &[u8]) {
        self.out.push(Via::Client(transport), to, bytes, None);
    }

    fn on_stun(
        &mut self,
        now: Now,
        raw: &[u8],
        from: SocketAddr,
        transport: Transport,
    ) -> Option<&'static str> {
        let mut fast = [0u8; binding::FAST_MAX];
        if let Some(n) = binding::fast_response(raw, from, &mut fast) {
            self.hot.binding_answered[transport as usize].inc();
            self.reply(transport, from, &fast[..n]);
            return None;
        }
        if !binding::looks_like_stun(raw) {
            self.hot.not_stun.inc();
            return None;
        }
        let mut req = Message::new();
        req.raw.clear();
        req.raw.extend_from_slice(raw);
        if req.decode().is_err() {
            self.hot.malformed.inc();
            return None;
        }
        let method = req.typ.method;
        if method == METHOD_BINDING {
            let mut out = Message::new();
            if binding::handle(&req, from, &mut out) == binding::Outcome::Respond {
                self.hot.binding_answered[transport as usize].inc();
                self.reply(transport, from, &out.raw);
            }
            return None;
        }
        if req.typ.class == CLASS_INDICATION {
            if method == METHOD_SEND {
                self.send_indication(&req, from, transport, now.at);
            }
            return None;
        }
        if req.typ.class != CLASS_REQUEST {
            return None;
        }
        let name = method_name(method);
        if let Some(resp) = self.request(now, &mut req, from, transport) {
            self.reply(transport, from, &resp);
        }
        Some(name)
    }

    fn request(
        &mut self,
        now: Now,
        req: &mut Message,
        from: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let method = req.typ.method;
        let unknown = binding::unknown_attributes(req, |a| understood(a.typ));
        if !unknown.is_empty() {
            let f = fail(CODE_UNKNOWN_ATTRIBUTE, "Unknown Attribute");
            return self.error(now, req, from, None, f, Some(unknown));
        }
        let Some(secrets) = self.secrets.clone() else {
            let f = fail(CODE_FORBIDDEN, "TURN not enabled");
            return self.error(now, req, from, None, f, None);
        };
        let authed = match self.shared.auth.check(req, from.ip(), &secrets, now.unix) {
            Ok(a) => a,
            Err(e) => return self.auth_failure(now, req, from, e),
        };
        let integrity = authed.integrity;
        let result = match method {
            METHOD_ALLOCATE => {
                match self.allocate(now, req, from, transport, authed.user, &integrity) {
                    // Answered once the relay socket is bound.
                    Ok(None) => return None,
                    Ok(Some(attrs)) => Ok(attrs),
                    Err(f) => Err(f),
                }
            }
            METHOD_REFRESH => self.refresh(now.at, req, from, transport, &authed.user),
            METHOD_CREATE_PERMISSION => {
                self.create_permission(now.at, req, from, transport, &authed.user)
            }
            METHOD_CHANNEL_BIND => self.channel_bind(now.at, req, from, transport, &authed.user),
            _ => Err(fail(CODE_BAD_REQUEST, "Unsupported Method")),
        };
        self.answer(
            now,
            req.typ.method,
            req.transaction_id,
            from,
            transport,
            &integrity,
            result,
        )
    }

    /// Builds the response to an authenticated request.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        now: Now,
        method: Method,
        txid: TransactionId,
        from: SocketAddr,
        transport: Transport,
        integrity: &MessageIntegrity,
        result: Result<Vec<Box<dyn Setter>>, Failure>,
    ) -> Option<Vec<u8>> {
        let label = method_name(method);
        let outcome = if result.is_ok() { "success" } else { "error" };
        self.shared
            .metrics
            .stun_requests
            .with_label_values(&[label, transport.as_str(), outcome])
            .inc();
        match result {
            Ok(attrs) => {
                let mut setters: Vec<Box<dyn Setter>> = vec![
                    Box::new(MessageType::new(method, CLASS_SUCCESS_RESPONSE)),
                    Box::new(stun::agent::TransactionId(txid.0)),
                ];
                setters.extend(attrs);
                setters.push(Box::new(TextAttribute::new(
                    ATTR_SOFTWARE,
                    binding::SOFTWARE.into(),
                )));
                setters.push(Box::new(MessageIntegrity(integrity.0.clone())));
                setters.push(Box::new(FINGERPRINT));
                build(&setters)
            }
            Err(f) => self.error_for(now, method, txid, from, Some(integrity), f, None),
        }
    }

    fn auth_failure(
        &mut self,
        now: Now,
        req: &Message,
        from: SocketAddr,
        e: AuthError,
    ) -> Option<Vec<u8>> {
        let reason = e.reason();
        let f = match e {
            AuthError::Challenge | AuthError::Unauthorized(_) | AuthError::Expired => Failure {
                code: CODE_UNAUTHORIZED,
                reason: "Unauthorized",
                challenge: true,
            },
            AuthError::StaleNonce => Failure {
                code: CODE_STALE_NONCE,
                reason: "Stale Nonce",
                challenge: true,
            },
            AuthError::BadRequest => fail(CODE_BAD_REQUEST, "Bad Request"),
        };
        if !matches!(e, AuthError::Challenge | AuthError::StaleNonce) {
            let metrics = &self.shared.metrics;
            metrics.auth_failures.with_label_values(&[reason]).inc();
            let allowed = self
                .shared
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow(&from.ip(), now.at);
            if !allowed {
                // Past the limit a guesser learns nothing more, not even a 401.
                metrics
                    .auth_failures
                    .with_label_values(&["rate_limited"])
                    .inc();
                return None;
            }
        }
        self.error(now, req, from, None, f, None)
    }

    fn error(
        &self,
        now: Now,
        req: &Message,
        from: SocketAddr,
        integrity: Option<&MessageIntegrity>,
        f: Failure,
        unknown: Option<Vec<AttrType>>,
    ) -> Option<Vec<u8>> {
        self.error_for(
            now,
            req.typ.method,
            req.transaction_id,
            from,
            integrity,
            f,
            unknown,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn error_for(
        &self,
        now: Now,
        method: Method,
        txid: TransactionId,
        from: SocketAddr,
        integrity: Option<&MessageIntegrity>,
        f: Failure,
        unknown: Option<Vec<AttrType>>,
    ) -> Option<Vec<u8>> {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(MessageType::new(method, CLASS_ERROR_RESPONSE)),
            Box::new(stun::agent::TransactionId(txid.0)),
            Box::new(ErrorCodeAttribute {
                code: f.code,
                reason: f.reason.as_bytes().to_vec(),
            }),
        ];
        if let Some(list) = unknown {
            setters.push(Box::new(stun::uattrs::UnknownAttributes(list)));
        }
        if f.challenge {
            let auth = &self.shared.auth;
            setters.push(Box::new(TextAttribute::new(
                ATTR_REALM,
                auth.realm().to_owned(),
            )));
            setters.push(Box::new(TextAttribute::new(
                ATTR_NONCE,
                auth.nonce(from.ip(), now.unix),
            )));
        }
        setters.push(Box::new(TextAttribute::new(
            ATTR_SOFTWARE,
            binding::SOFTWARE.into(),
        )));
        if let Some(i) = integrity {
            setters.push(Box::new(MessageIntegrity(i.0.clone())));
        }
        setters.push(Box::new(FINGERPRINT));
        build(&setters)
    }

    fn refuse<T>(&self, reason: &str, f: Failure) -> Result<T, Failure> {
        self.shared
            .metrics
            .allocations_refused
            .with_label_values(&[reason])
            .inc();
        Err(f)
    }

    /// Whether the policy lets `user` allocate; its limits if so.
    fn admit(&self, user: &TurnUsername) -> Result<(Option<u32>, Option<u64>), Failure> {
        let Some(policy) = self.policy.as_ref() else {
            // Not knowing who is cut off, allow no one; 508 sends clients
            // to their next TURN server.
            return self.refuse(
                "no_policy",
                fail(CODE_INSUFFICIENT_CAPACITY, "Control Plane Unavailable"),
            );
        };
        match policy.check(user) {
            Ok(()) => Ok(policy.limits(&user.tenant)),
            Err(Refused::CutOff(c)) => self.refuse(c.as_str(), fail(CODE_FORBIDDEN, "Forbidden")),
            Err(Refused::Revoked) => self.refuse("revoked", fail(CODE_FORBIDDEN, "Forbidden")),
        }
    }

    /// Checks an Allocate and asks for a relay socket (`Ok(None)`: the
    /// answer follows [`Input::Bound`]); a retransmission is answered at
    /// once.
    fn allocate(
        &mut self,
        now: Now,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: TurnUsername,
        integrity: &MessageIntegrity,
    ) -> Result<Option<Vec<Box<dyn Setter>>>, Failure> {
        if let Some(&key) = self.by_client.get(&(from, transport)) {
            let existing = &self.allocations[key];
            // A retransmitted Allocate gets the same answer (RFC 8656 §7.2).
            if existing.created_by == req.transaction_id.0 {
                let left = existing.remaining(now.at);
                return Ok(Some(allocation_attrs(existing.relayed, from, left, false)));
            }
            return self.refuse("mismatch", fail(CODE_ALLOC_MISMATCH, "Allocation Mismatch"));
        }
        if self
            .opening
            .values()
            .any(|o| o.client == from && o.transport == transport)
        {
            // Its twin is binding a socket; that one answers.
            return Ok(None);
        }
        if self.shared.draining.load(Ordering::Relaxed) {
            return self.refuse(
                "draining",
                fail(CODE_INSUFFICIENT_CAPACITY, "Server Draining"),
            );
        }
        match req.get(ATTR_REQUESTED_TRANSPORT).ok().as_deref() {
            Some([17, ..]) => {}
            Some(_) => {
                return self.refuse(
                    "transport",
                    fail(
                        CODE_UNSUPPORTED_TRANS_PROTO,
                        "Unsupported Transport Protocol",
                    ),
                );
            }
            None => {
                return self.refuse(
                    "bad_request",
                    fail(CODE_BAD_REQUEST, "Missing REQUESTED-TRANSPORT"),
                );
            }
        }
        // EVEN-PORT (RFC 8656 §18.8): an even relay port is granted; the
        // R bit (reserve the next port too) and RESERVATION-TOKEN are not.
        let even = match req.get(ATTR_EVEN_PORT).ok().as_deref() {
            None => false,
            Some([flags, ..]) if flags & 0x80 == 0 => true,
            Some(_) => {
                return self.refuse(
                    "reservation",
                    fail(CODE_INSUFFICIENT_CAPACITY, "Port Reservation Not Supported"),
                );
            }
        };
        if req.contains(ATTR_RESERVATION_TOKEN) {
            return self.refuse(
                "reservation",
                fail(CODE_INSUFFICIENT_CAPACITY, "Port Reservation Not Supported"),
            );
        }
        let family = match req.get(ATTR_REQUESTED_ADDRESS_FAMILY).ok().as_deref() {
            None | Some([0x01, ..]) => 4,
            Some([0x02, ..]) => 6,
            Some(_) => {
                return self.refuse("bad_request", fail(CODE_BAD_REQUEST, "Bad Address Family"));
            }
        };
        let additional = req.get(ATTR_ADDITIONAL_ADDRESS_FAMILY).ok();
        if additional.is_some() && req.contains(ATTR_REQUESTED_ADDRESS_FAMILY) {
            return self.refuse(
                "bad_request",
                fail(CODE_BAD_REQUEST, "Conflicting Address Families"),
            );
        }
        // Dual allocation (RFC 8656 §7.2): the IPv4 relay is granted; the
        // additional IPv6 one is declined with ADDRESS-ERROR-CODE.
        let decline_v6 = matches!(additional.as_deref(), Some([0x02, ..]));
        if additional.is_some() && !decline_v6 {
            return self.refuse(
                "bad_request",
                fail(CODE_BAD_REQUEST, "Bad Additional Address Family"),
            );
        }
        let settings = &self.shared.settings;
        let Some(ip) = settings
            .relay_ips
            .iter()
            .find(|ip| ip.is_ipv4() == (family == 4))
            .copied()
        else {
            return self.refuse(
                "family",
                fail(
                    CODE_ADDR_FAMILY_NOT_SUPPORTED,
                    "Address Family not Supported",
                ),
            );
        };
        let (quota, bitrate) = self.admit(&user)?;
        let lifetime = requested_lifetime(req, settings.max_lifetime);
        if lifetime.is_zero() {
            return self.refuse("bad_request", fail(CODE_BAD_REQUEST, "Zero Lifetime"));
        }
        // The place under the caps is taken now, before the socket is
        // bound, so Allocates on other shards cannot overshoot them.
        {
            let mut c = self.shared.counts();
            if c.total >= settings.max_allocations {
                drop(c);
                return self.refuse(
                    "capacity",
                    fail(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity"),
                );
            }
            let n = c.per_tenant.entry(user.tenant.clone()).or_insert(0);
            if quota.is_some_and(|max| *n >= max) {
                drop(c);
                return self.refuse(
                    "quota",
                    fail(CODE_ALLOC_QUOTA_REACHED, "Allocation Quota Reached"),
                );
            }
            *n += 1;
            c.total += 1;
        }
        let open = self.next_open;
        self.next_open += 1;
        self.opening.insert(
            open,
            Opening {
                client: from,
                transport,
                user,
                txid: req.transaction_id,
                integrity: MessageIntegrity(integrity.0.clone()),
                lifetime,
                bitrate,
                decline_v6,
                even,
                ip,
                attempts: 0,
            },
        );
        self.try_port(now, open);
        Ok(None)
    }

    /// Asks the driver to bind the next candidate port for `open`, or
    /// gives up after [`PORT_ATTEMPTS`].
    fn try_port(&mut self, now: Now, open: u64) {
        let Some(o) = self.opening.get_mut(&open) else {
            return;
        };
        let (lo, hi) = self.shared.settings.relay_ports;
        let tries = PORT_ATTEMPTS.min(usize::from(hi - lo) + 1);
        while o.attempts < tries {
            o.attempts += 1;
            if let Some(port) = self.shared.next_port(o.even) {
                let addr = SocketAddr::new(o.ip, port);
                self.out.events.push_back(Event::Bind { open, addr });
                return;
            }
        }
        tracing::warn!("no relay port available");
        let o = self.opening.remove(&open).expect("present");
        self.shared.release(&o.user.tenant);
        let f = fail(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity");
        let result = self.refuse("ports", f);
        self.finish_allocate(now, &o, result);
    }

    /// The driver bound (or could not bind) a relay socket for `open`.
    fn bound(&mut self, now: Now, open: u64, local: Option<SocketAddr>) {
        let Some(local) = local else {
            self.try_port(now, open);
            return;
        };
        let Some(o) = self.opening.remove(&open) else {
            return;
        };
        // The policy may have changed while the socket was bound.
        let result = match self.admit(&o.user) {
            Err(f) => {
                self.shared.release(&o.user.tenant);
                self.out.events.push_back(Event::Abandon { open });
                Err(f)
            }
            Ok(_) => {
                let relayed = SocketAddr::new(
                    advertised_ip(&self.shared.settings, local.ip()),
                    local.port(),
                );
                let a = Allocation::new(
                    o.client,
                    o.transport,
                    o.user.clone(),
                    relayed,
                    o.txid.0,
                    o.lifetime,
                    o.bitrate,
                    now.at,
                );
                let key = self.allocations.insert(a);
                self.by_client.insert((o.client, o.transport), key);
                self.by_relay.insert(relayed, key);
                self.shared.owners.set(relayed, Some(self.shard));
                self.out
                    .events
                    .push_back(Event::Opened { open, relay: key });
                let m = &self.shared.metrics;
                m.allocations
                    .with_label_values(&[o.user.tenant.as_str()])
                    .inc();
                m.allocations_created.inc();
                tracing::debug!(client = %o.client, relay = %relayed, tenant = %o.user.tenant, room = %o.user.room, "allocation created");
                Ok(allocation_attrs(
                    relayed,
                    o.client,
                    o.lifetime,
                    o.decline_v6,
                ))
            }
        };
        self.finish_allocate(now, &o, result);
    }

    fn finish_allocate(
        &mut self,
        now: Now,
        o: &Opening,
        result: Result<Vec<Box<dyn Setter>>, Failure>,
    ) {
        let resp = self.answer(
            now,
            METHOD_ALLOCATE,
            o.txid,
            o.client,
            o.transport,
            &o.integrity,
            result,
        );
        if let Some(resp) = resp {
            self.reply(o.transport, o.client, &resp);
        }
    }

    /// The allocation of this 5-tuple, if it belongs to `user` (437 otherwise).
    fn own_allocation(
        &self,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<usize, Failure> {
        self.by_client
            .get(&(from, transport))
            .copied()
            .filter(|k| same_user(&self.allocations[*k].user, user))
            .ok_or_else(|| fail(CODE_ALLOC_MISMATCH, "Allocation Mismatch"))
    }

    fn refresh(
        &mut self,
        now: Instant,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        let key = self.own_allocation(from, transport, user)?;
        let lifetime = requested_lifetime(req, self.shared.settings.max_lifetime);
        if lifetime.is_zero() {
            self.close(key, "client", "deleted by the client");
        } else {
            self.allocations[key].refresh(lifetime, now);
        }
        Ok(vec![Box::new(turn::proto::lifetime::Lifetime(lifetime))])
    }

    fn create_permission(
        &mut self,
        now: Instant,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        let key = self.own_allocation(from, transport, user)?;
        let peers = peer_addresses(req);
        if peers.is_empty() {
            return Err(fail(CODE_BAD_REQUEST, "Missing XOR-PEER-ADDRESS"));
        }
        for p in &peers {
            self.check_peer(key, *p)?;
        }
        let a = &mut self.allocations[key];
        for p in peers {
            a.permit(p.ip(), now);
        }
        Ok(Vec::new())
    }

    /// A peer must match the relay's address family (443) and be allowed
    /// by the relay policy (403).
    fn check_peer(&self, key: usize, peer: SocketAddr) -> Result<(), Failure> {
        if peer.is_ipv4() != self.allocations[key].relayed.is_ipv4() {
            return Err(fail(
                CODE_PEER_ADDR_FAMILY_MISMATCH,
                "Peer Address Family Mismatch",
            ));
        }
        if policy::peer_denied(peer.ip(), &self.shared.settings.allow_peers) {
            self.shared.metrics.denied_peers.inc();
            return Err(fail(CODE_FORBIDDEN, "Forbidden Peer Address"));
        }
        Ok(())
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        let key = self.own_allocation(from, transport, user)?;
        let number = match req.get(ATTR_CHANNEL_NUMBER).ok().as_deref() {
            Some([hi, lo, ..]) => u16::from_be_bytes([*hi, *lo]),
            _ => return Err(fail(CODE_BAD_REQUEST, "Missing CHANNEL-NUMBER")),
        };
        let peer = *peer_addresses(req)
            .first()
            .ok_or_else(|| fail(CODE_BAD_REQUEST, "Missing XOR-PEER-ADDRESS"))?;
        self.check_peer(key, peer)?;
        self.allocations[key]
            .bind(number, peer, now)
            .map_err(|e| match e {
                BindError::OutOfRange => fail(CODE_BAD_REQUEST, "Bad Channel Number"),
                BindError::NumberTaken | BindError::PeerTaken => {
                    fail(CODE_BAD_REQUEST, "Channel Already Bound")
                }
            })?;
        Ok(Vec::new())
    }

    /// Relays a Send indication's DATA to its peer (silently dropped when
    /// not permitted, RFC 8656 §11.2).
    fn send_indication(
        &mut self,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        now: Instant,
    ) {
        let Some(&key) = self.by_client.get(&(from, transport)) else {
            self.hot.no_allocation.inc();
            return;
        };
        let (Some(peer), Ok(data)) = (peer_addresses(req).first().copied(), req.get(ATTR_DATA))
        else {
            self.hot.malformed.inc();
            return;
        };
        self.relay_to_peer(key, peer, &data, now);
    }

    /// Relays a ChannelData message's data from a client to the bound peer.
    fn channel_data(
        &mut self,
        from: SocketAddr,
        transport: Transport,
        channel: u16,
        data: &[u8],
        now: Instant,
    ) {
        let Some(&key) = self.by_client.get(&(from, transport)) else {
            self.hot.no_allocation.inc();
            return;
        };
        match self.allocations[key].channel_peer(channel, now) {
            Some(peer) => self.relay_to_peer(key, peer, data, now),
            None => self.hot.no_channel.inc(),
        }
    }

    fn relay_to_peer(&mut self, key: usize, peer: SocketAddr, data: &[u8], now: Instant) {
        let a = &mut self.allocations[key];
        if !a.permitted(peer.ip(), now) {
            self.hot.no_permission.count(data.len());
            return;
        }
        if !a.within_rate(data.len(), now) {
            self.hot.bitrate.count(data.len());
            return;
        }
        let credit = Some(Credit {
            counters: a.counters.clone(),
            bytes: data.len(),
            inbound: false,
        });
        if !self.shared.settings.kernel_hairpin
            && data.len() <= MAX_DATAGRAM
            && let Some(owner) = self.shared.owners.get(peer)
        {
            // A relay of this server: what the kernel would do, minus a
            // send and a receive. `a` sent it; the peer allocation gets it
            // from `a`'s relayed address, with its own permissions and cap.
            self.hot.hairpinned.inc();
            let from = a.relayed;
            if owner != self.shard {
                let via = Via::Shard { shard: owner, from };
                self.out.push(via, peer, data, credit);
                return;
            }
            a.counters.record_out(data.len());
            match self.by_relay.get(&peer) {
                Some(&b) => self.relay_to_client(b, from, data, now),
                None => self.hot.no_allocation.inc(),
            }
            return;
        }
        self.out.push(Via::Relay(key), peer, data, credit);
    }

    /// Forwards a datagram from `peer` to allocation `key`'s client when
    /// permitted and within the cap: as ChannelData when a channel is
    /// bound, else as a Data indication.
    fn relay_to_client(&mut self, key: usize, peer: SocketAddr, data: &[u8], now: Instant) {
        let a = &mut self.allocations[key];
        let (permitted, channel) = a.route_from_peer(peer, now);
        if !permitted {
            self.hot.no_permission.count(data.len());
            return;
        }
        if !a.within_rate(data.len(), now) {
            self.hot.bitrate.count(data.len());
            return;
        }
        let bytes = &mut self.out.bytes;
        let start = bytes.len();
        match channel {
            Some(ch) => {
                bytes.extend_from_slice(&ch.to_be_bytes());
                bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
                bytes.extend_from_slice(data);
                if a.transport != Transport::Udp {
                    // Streams pad ChannelData to four bytes (RFC 8656 §12.5).
                    bytes.resize(start + ((data.len() + 4 + 3) & !3), 0);
                }
            }
            None => data_indication(bytes, peer, data, rand::random()),
        }
        self.out.transmits.push(Transmit {
            via: Via::Client(a.transport),
            to: a.client,
            span: start..bytes.len(),
            credit: Some(Credit {
                counters: a.counters.clone(),
                bytes: data.len(),
                inbound: true,
            }),
        });
    }

    /// Removes allocation `key`, closes its socket and meters what it had
    /// not reported yet; `why` is the metric's reason label.
    fn close(&mut self, key: usize, why: &str, reason: &str) {
        let Some(mut a) = self.allocations.try_remove(key) else {
            return;
        };
        self.by_client.remove(&(a.client, a.transport));
        self.by_relay.remove(&a.relayed);
        self.shared.owners.set(a.relayed, None);
        self.shared.release(&a.user.tenant);
        self.out.events.push_back(Event::Close { relay: key });
        let m = &self.shared.metrics;
        m.allocations_closed.with_label_values(&[why]).inc();
        m.allocations
            .with_label_values(&[a.user.tenant.as_str()])
            .dec();
        let d = a.take_unreported();
        self.account(&a.user, d);
        tracing::debug!(client = %a.client, tenant = %a.user.tenant, room = %a.user.room, reason, "allocation closed");
        self.closed.push(Closed {
            user: a.user,
            counters: a.counters,
            reported: a.reported,
        });
    }

    /// Closes expired allocations and prunes permissions and channels.
    fn sweep(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP;
        let expired: Vec<usize> = self
            .allocations
            .iter_mut()
            .filter_map(|(k, a)| {
                a.prune(now);
                a.expired(now).then_some(k)
            })
            .collect();
        for key in expired {
            self.close(key, "expired", "expired");
        }
    }

    /// Applies new enforcement state: closes allocations it no longer allows.
    fn apply_policy(&mut self, policy: Arc<Policy>) {
        let doomed: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(_, a)| policy.check(&a.user).is_err())
            .map(|(k, _)| k)
            .collect();
        self.policy = Some(policy);
        for key in doomed {
            self.close(key, "policy", "refused by the control plane");
        }
    }

    /// Moves every allocation's unreported traffic, and what settled on
    /// closed ones since, into the meter and the relayed-traffic metrics.
    fn collect(&mut self) {
        let deltas: Vec<(TurnUsername, Traffic)> = self
            .allocations
            .iter_mut()
            .map(|(_, a)| (a.user.clone(), a.take_unreported()))
            .collect();
        for (user, d) in deltas {
            self.account(&user, d);
        }
        for c in std::mem::take(&mut self.closed) {
            let d = c.counters.traffic().minus(&c.reported);
            self.account(&c.user, d);
        }
    }

    fn account(&self, user: &TurnUsername, d: Traffic) {
        if d.is_zero() {
            return;
        }
        let tenant = user.tenant.as_str();
        let m = &self.shared.metrics;
        m.relayed_bytes
            .with_label_values(&[tenant, "out"])
            .inc_by(d.bytes_out);
        m.relayed_bytes
            .with_label_values(&[tenant, "in"])
            .inc_by(d.bytes_in);
        m.relayed_packets
            .with_label_values(&[tenant, "out"])
            .inc_by(d.packets_out);
        m.relayed_packets
            .with_label_values(&[tenant, "in"])
            .inc_by(d.packets_in);
        self.shared.meter.add(tenant, &user.room, d);
    }
}

fn method_name(method: Method) -> &'static str {
    match method {
        METHOD_ALLOCATE => "allocate",
        METHOD_REFRESH => "refresh",
        METHOD_CREATE_PERMISSION => "create_permission",
        METHOD_CHANNEL_BIND => "channel_bind",
        _ => "other",
    }
}

/// Appends a Data indication (RFC 8656 §11.4) carrying `data` from
/// `peer`, written directly: it goes out for every datagram from a peer
/// without a channel, so it skips the generic message builder.
fn data_indication(out: &mut Vec<u8>, peer: SocketAddr, data: &[u8], txid: [u8; 12]) {
    const DATA_INDICATION: u16 = 0x0017;
    let addr_len: u16 = if peer.is_ipv4() { 8 } else { 20 };
    let padded = (data.len() + 3) & !3;
    let body = 4 + usize::from(addr_len) + 4 + padded;
    out.extend_from_slice(&DATA_INDICATION.to_be_bytes());
    out.extend_from_slice(&(body as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&txid);
    out.extend_from_slice(&ATTR_XOR_PEER_ADDRESS.0.to_be_bytes());
    out.extend_from_slice(&addr_len.to_be_bytes());
    let cookie = MAGIC_COOKIE.to_be_bytes();
    out.push(0);
    out.push(if peer.is_ipv4() { 0x01 } else { 0x02 });
    out.extend_from_slice(&(peer.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match peer.ip() {
        IpAddr::V4(ip) => out.extend(ip.octets().iter().zip(cookie).map(|(b, k)| b ^ k)),
        IpAddr::V6(ip) => {
            let key = cookie.iter().chain(&txid);
            out.extend(ip.octets().iter().zip(key).map(|(b, k)| b ^ k));
        }
    }
    out.extend_from_slice(&ATTR_DATA.0.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + padded - data.len(), 0);
}

fn same_user(a: &TurnUsername, b: &TurnUsername) -> bool {
    a.tenant == b.tenant && a.room == b.room && a.peer == b.peer
}

/// Decodes every XOR-PEER-ADDRESS of `msg` (CreatePermission may carry
/// several).
fn peer_addresses(msg: &Message) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for a in msg
        .attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
    {
        let mut one = Message::new();
        one.transaction_id = msg.transaction_id;
        one.attributes.0.push(a.clone());
        let mut x = XorMappedAddress::default();
        if x.get_from_as(&one, ATTR_XOR_PEER_ADDRESS).is_ok() {
            out.push(SocketAddr::new(x.ip, x.port));
        }
    }
    out
}

/// Comprehension-required attributes this server understands in TURN
/// requests; anything else below 0x8000 earns 420 (RFC 8489 §14).
fn understood(t: AttrType) -> bool {
    t.0 >= 0x8000
        || matches!(
            t,
            ATTR_USERNAME
                | ATTR_MESSAGE_INTEGRITY
                | ATTR_MESSAGE_INTEGRITY_SHA256
                | ATTR_REALM
                | ATTR_NONCE
                | ATTR_CHANNEL_NUMBER
                | ATTR_LIFETIME
                | ATTR_XOR_PEER_ADDRESS
                | ATTR_DATA
                | ATTR_REQUESTED_TRANSPORT
                | ATTR_DONT_FRAGMENT
                | ATTR_REQUESTED_ADDRESS_FAMILY
                | ATTR_EVEN_PORT
                | ATTR_RESERVATION_TOKEN
                | ATTR_USER_HASH
                | ATTR_PADDING
        )
}

/// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
const ATTR_ADDITIONAL_ADDRESS_FAMILY: AttrType = AttrType(0x8000);

/// ADDRESS-ERROR-CODE (RFC 8656 §18.13): why one family of a dual
/// allocation was not granted.
struct AddressErrorCode {
    family: u8,
    code: u16,
    reason: &'static str,
}

impl Setter for AddressErrorCode {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        let mut v = vec![
            self.family,
            0,
            (self.code / 100) as u8 & 0x07,
            (self.code % 100) as u8,
        ];
        v.extend_from_slice(self.reason.as_bytes());
        m.add(AttrType(0x8001), &v);
        Ok(())
    }
}

fn allocation_attrs(
    relayed: SocketAddr,
    from: SocketAddr,
    lifetime: Duration,
    decline_v6: bool,
) -> Vec<Box<dyn Setter>> {
    let mut attrs: Vec<Box<dyn Setter>> = vec![
        Box::new(turn::proto::relayaddr::RelayedAddress {
            ip: relayed.ip(),
            port: relayed.port(),
        }),
        Box::new(turn::proto::lifetime::Lifetime(lifetime)),
        Box::new(XorMappedAddress {
            ip: from.ip(),
            port: from.port(),
        }),
    ];
    if decline_v6 {
        attrs.push(Box::new(AddressErrorCode {
            family: 0x02,
            code: 440,
            reason: "Address Family not Supported",
        }));
    }
    attrs
}

/// LIFETIME from the request, capped; the default when absent.
fn requested_lifetime(req: &Message, max: Duration) -> Duration {
    match req.get(ATTR_LIFETIME).ok().as_deref() {
        Some([a, b, c, d, ..]) => {
            Duration::from_secs(u64::from(u32::from_be_bytes([*a, *b, *c, *d]))).min(max)
        }
        _ => DEFAULT_LIFETIME.min(max),
    }
}

fn build(setters: &[Box<dyn Setter>]) -> Option<Vec<u8>> {
    let mut m = Message::new();
    match m.build(setters) {
        Ok(()) => Some(m.raw),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build a STUN response");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use stun::message::Getter;
    use turn::proto::channum::ChannelNumber;
    use turn::proto::peeraddr::PeerAddress;
    use turn::proto::relayaddr::RelayedAddress;

    const UNIX: u64 = 1_800_000_000;
    const SECRET: &str = "k1=0123456789abcdef0";

    /// A core with a fake clock: `at(secs)` is the time `secs` after start.
    struct Harness {
        core: Core,
        t0: Instant,
        secrets: Arc<TurnSecrets>,
    }

    fn settings() -> Settings {
        let mut s = Settings::new(
            "127.0.0.1:3478".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        );
        s.relay_ips = vec!["127.0.0.1".parse().expect("ip")];
        s.relay_ports = (40_000, 40_009);
        s.allow_peers = vec!["0.0.0.0/0".parse().expect("net")];
        s
    }

    /// One row of relay-port owners per advertised IP, however the relay
    /// IPs repeat; addresses outside the rows have no owner.
    #[test]
    fn relay_port_owners() {
        let mut s = settings();
        s.relay_ips = ["10.0.0.1", "10.0.0.2", "10.0.0.1"]
            .map(|ip| ip.parse().expect("ip"))
            .to_vec();
        let owners = Owners::new(&s);
        assert_eq!(owners.ips.len(), 2);
        assert_eq!(owners.table.len(), 2 * 10);
        let a: SocketAddr = "10.0.0.1:40003".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:40003".parse().expect("addr");
        owners.set(a, Some(1));
        assert_eq!((owners.get(a), owners.get(b)), (Some(1), None));
        owners.set(a, None);
        assert_eq!(owners.get(a), None);
        assert_eq!(owners.get("10.0.0.1:40010".parse().expect("addr")), None);
        assert_eq!(owners.get("10.0.0.3:40003".parse().expect("addr")), None);
    }

    fn harness(settings: Settings, policy: Option<Policy>) -> Harness {
        let secrets = Arc::new(TurnSecrets::parse(SECRET).expect("secrets"));
        let metrics = Arc::new(Metrics::new(settings.max_allocations, 10));
        let meter = Arc::new(Meter::open("core-test", None).expect("meter"));
        let shared = Arc::new(Shared::new(settings, metrics, meter));
        let t0 = Instant::now();
        Harness {
            core: Core::new(0, shared, Some(secrets.clone()), policy.map(Arc::new), t0),
            t0,
            secrets,
        }
    }

    /// A client of the harness: its address and credential.
    struct Client {
        addr: SocketAddr,
        user: String,
        password: String,
        nonce: String,
    }

    impl Harness {
        fn at(&self, secs: u64) -> Now {
            Now {
                at: self.t0 + Duration::from_secs(secs),
                unix: UNIX + secs,
            }
        }

        fn client(&self, port: u16, tenant: &str) -> Client {
            let (user, password) = self.secrets.issue(UNIX + 86_400, tenant, "room", "peer");
            Client {
                addr: SocketAddr::new("192.0.2.1".parse().expect("ip"), port),
                user: user.to_string(),
                password,
                nonce: String::new(),
            }
        }

        /// Feeds a datagram from `from`; returns what the core sent back
        /// to it, and every other transmit.
        fn feed(
            &mut self,
            secs: u64,
            from: SocketAddr,
            data: &[u8],
        ) -> Vec<(Via, SocketAddr, Vec<u8>)> {
            self.input(secs, from, data);
            self.bind_all(self.at(secs), |_| true);
            self.take()
        }

        /// Answers every Bind the core asked for: `free(port)` says
        /// whether the port can be bound.
        fn bind_all(&mut self, now: Now, free: impl Fn(u16) -> bool) -> Vec<Event> {
            let mut seen = Vec::new();
            while let Some(e) = self.core.outputs().events.pop_front() {
                if let Event::Bind { open, addr } = e {
                    let local = free(addr.port()).then_some(addr);
                    self.core.handle(now, Input::Bound { open, local });
                }
                seen.push(e);
            }
            seen
        }

        fn take(&mut self) -> Vec<(Via, SocketAddr, Vec<u8>)> {
            let out = self.core.outputs();
            let sent = out
                .transmits
                .iter_mut()
                .map(|t| {
                    if let Some(c) = t.credit.take() {
                        c.bill();
                    }
                    (t.via, t.to, out.bytes[t.span.clone()].to_vec())
                })
                .collect();
            out.clear();
            sent
        }

        /// The 401 round trip at `secs`: learns a nonce for `c`.
        fn challenge(&mut self, secs: u64, c: &mut Client) {
            let raw = build_request(METHOD_ALLOCATE, &udp(), None);
            let answer = decode(&self.only_answer(secs, c.addr, &raw));
            assert_eq!(error_code(&answer), Some(401));
            c.nonce = String::from_utf8(answer.get(ATTR_NONCE).expect("nonce")).expect("utf8");
        }

        /// Feeds a UDP datagram from `from`, leaving the outputs.
        fn input(&mut self, secs: u64, from: SocketAddr, data: &[u8]) {
            let now = self.at(secs);
            self.core.handle(
                now,
                Input::Client {
                    from,
                    transport: Transport::Udp,
                    data,
                },
            );
        }

        /// Sends an authenticated request (after the 401 round trip the
        /// first time); returns the decoded answer.
        fn request(
            &mut self,
            secs: u64,
            c: &mut Client,
            method: Method,
            attrs: Vec<Box<dyn Setter>>,
        ) -> Message {
            if c.nonce.is_empty() {
                self.challenge(secs, c);
            }
            let raw = build_request(method, &attrs, Some(c));
            decode(&self.only_answer(secs, c.addr, &raw))
        }

        fn only_answer(&mut self, secs: u64, from: SocketAddr, raw: &[u8]) -> Vec<u8> {
            let sent = self.feed(secs, from, raw);
            assert_eq!(sent.len(), 1, "one answer");
            let (via, to, bytes) = sent.into_iter().next().expect("answer");
            assert_eq!((via, to), (Via::Client(Transport::Udp), from));
            bytes
        }

        /// Allocates for `c`; returns the relayed address.
        fn allocate(&mut self, secs: u64, c: &mut Client) -> SocketAddr {
            let answer = self.request(secs, c, METHOD_ALLOCATE, udp());
            assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE, "{answer}");
            let mut relayed = RelayedAddress::default();
            relayed.get_from(&answer).expect("relayed");
            SocketAddr::new(relayed.ip, relayed.port)
        }

        fn permit(&mut self, secs: u64, c: &mut Client, peer: SocketAddr) {
            let answer = self.request(
                secs,
                c,
                METHOD_CREATE_PERMISSION,
                vec![Box::new(peer_attr(peer))],
            );
            assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE, "{answer}");
        }

        fn bind_channel(&mut self, secs: u64, c: &mut Client, channel: u16, peer: SocketAddr) {
            let answer = self.request(
                secs,
                c,
                METHOD_CHANNEL_BIND,
                vec![Box::new(ChannelNumber(channel)), Box::new(peer_attr(peer))],
            );
            assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE, "{answer}");
        }
    }

    /// REQUESTED-TRANSPORT UDP, the attribute every Allocate here carries.
    fn udp() -> Vec<Box<dyn Setter>> {
        vec![Box::new(turn::proto::reqtrans::RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        })]
    }

    fn peer_attr(peer: SocketAddr) -> PeerAddress {
        PeerAddress {
            ip: peer.ip(),
            port: peer.port(),
        }
    }

    fn build_request(method: Method, attrs: &[Box<dyn Setter>], auth: Option<&Client>) -> Vec<u8> {
        let mut m = Message::new();
        m.build(&[
            Box::new(MessageType::new(method, CLASS_REQUEST)),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("header");
        for a in attrs {
            a.add_to(&mut m).expect("attr");
        }
        if let Some(c) = auth {
            for (t, v) in [
                (ATTR_USERNAME, &c.user),
                (ATTR_REALM, &"floe".to_owned()),
                (ATTR_NONCE, &c.nonce),
            ] {
                TextAttribute::new(t, v.clone())
                    .add_to(&mut m)
                    .expect("text");
            }
            MessageIntegrity::new_long_term_integrity(
                c.user.clone(),
                "floe".into(),
                c.password.clone(),
            )
            .add_to(&mut m)
            .expect("integrity");
        }
        m.raw
    }

    fn decode(raw: &[u8]) -> Message {
        let mut m = Message::new();
        m.raw = raw.to_vec();
        m.decode().expect("STUN");
        m
    }

    fn error_code(m: &Message) -> Option<u16> {
        let mut e = ErrorCodeAttribute::default();
        e.get_from(m).ok().map(|()| e.code.0)
    }

    fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
        let mut v = channel.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u16).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn peer() -> SocketAddr {
        "198.51.100.7:5000".parse().expect("addr")
    }

    /// The whole handshake with no socket: challenge, Allocate (the core
    /// asks for a relay port, then answers), permission, channel, data
    /// both ways, billed once each way when the transmit is settled.
    #[test]
    fn allocate_permit_bind_and_relay_both_ways() {
        let mut h = harness(settings(), Some(Policy::default()));
        let mut c = h.client(5000, "t");
        let relayed = h.allocate(0, &mut c);
        assert_eq!(relayed.ip().to_string(), "127.0.0.1");
        assert!((40_000..=40_009).contains(&relayed.port()));

        // No permission yet: dropped, not billed.
        assert!(h.feed(1, c.addr, &channel_data(0x4000, b"x")).is_empty());
        h.bind_channel(1, &mut c, 0x4000, peer());
        let sent = h.feed(2, c.addr, &channel_data(0x4000, b"hello"));
        assert_eq!(sent, vec![(Via::Relay(0), peer(), b"hello".to_vec())]);

        // From the peer: ChannelData to the client.
        h.core.handle(
            h.at(3),
            Input::Peer {
                relay: 0,
                from: peer(),
                data: b"back",
            },
        );
        assert_eq!(
            h.take(),
            vec![(
                Via::Client(Transport::Udp),
                c.addr,
                channel_data(0x4000, b"back")
            )]
        );
        // Another port of the peer's IP: permitted, no channel: a Data indication.
        let other: SocketAddr = "198.51.100.7:6000".parse().expect("addr");
        h.core.handle(
            h.at(3),
            Input::Peer {
                relay: 0,
                from: other,
                data: b"odd",
            },
        );
        let sent = h.take();
        let m = decode(&sent[0].2);
        assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
        let mut from = PeerAddress::default();
        from.get_from(&m).expect("peer");
        assert_eq!(SocketAddr::new(from.ip, from.port), other);
        assert_eq!(m.get(ATTR_DATA).expect("data"), b"odd");
        // An IP never permitted: dropped.
        h.core.handle(
            h.at(3),
            Input::Peer {
                relay: 0,
                from: "203.0.113.9:1".parse().expect("addr"),
                data: b"no",
            },
        );
        assert!(h.take().is_empty());

        h.core.handle(h.at(4), Input::Collect);
        let (_, batch) = cut(&h);
        assert_eq!(batch, (5, 7), "out: hello; in: back + odd");
    }

    /// The bytes and packets of every usage record cut so far.
    fn cut(h: &Harness) -> (u64, (u64, u64)) {
        let meter = &h.core.shared.meter;
        meter.cut(UNIX).expect("cut");
        let mut total = (0, 0);
        let mut packets = 0;
        while let Some(b) = meter.oldest() {
            for r in &b.records {
                total.0 += r.bytes_out;
                total.1 += r.bytes_in;
                packets += r.packets_out + r.packets_in;
            }
            meter.acked(&b.server_id, b.seq).expect("ack");
        }
        (packets, total)
    }

    /// Taken ports are skipped; when every try fails, 508.
    #[test]
    fn relay_ports_are_retried_then_refused() {
        let mut h = harness(settings(), Some(Policy::default()));
        let mut c = h.client(5000, "t");
        h.challenge(0, &mut c);
        let raw = build_request(METHOD_ALLOCATE, &udp(), Some(&c));
        // Only 40005 is free.
        h.input(0, c.addr, &raw);
        let events = h.bind_all(h.at(0), |p| p == 40_005);
        let tried = events
            .iter()
            .filter(|e| matches!(e, Event::Bind { .. }))
            .count();
        assert!((1..=10).contains(&tried));
        assert!(events.iter().any(|e| matches!(e, Event::Opened { .. })));
        let answer = decode(&h.take()[0].2);
        let mut relayed = RelayedAddress::default();
        relayed.get_from(&answer).expect("relayed");
        assert_eq!(relayed.port, 40_005);

        // Nothing free: ten tries (the whole range), then 508.
        let mut d = h.client(5001, "t");
        d.nonce = c.nonce.clone();
        d.addr = SocketAddr::new(c.addr.ip(), 5001);
        let raw = build_request(METHOD_ALLOCATE, &udp(), Some(&d));
        h.input(0, d.addr, &raw);
        let events = h.bind_all(h.at(0), |_| false);
        assert_eq!(events.len(), 10);
        assert_eq!(error_code(&decode(&h.take()[0].2)), Some(508));
        assert_eq!(
            h.core.shared.allocation_count(),
            1,
            "the refused one gave its place back"
        );
    }

    /// A cut-off that lands while an Allocate's socket is being bound
    /// refuses it at commit (403), and the socket is given up.
    #[test]
    fn a_cut_off_during_an_allocate_refuses_it() {
        let mut h = harness(settings(), Some(Policy::default()));
        let mut c = h.client(5000, "t");
        h.challenge(0, &mut c);
        let raw = build_request(METHOD_ALLOCATE, &udp(), Some(&c));
        h.input(0, c.addr, &raw);
        let Some(Event::Bind { open, addr }) = h.core.outputs().events.pop_front() else {
            panic!("a Bind first");
        };
        h.core
            .handle(h.at(0), Input::Policy(Arc::new(cut_off("t"))));
        h.core.handle(
            h.at(0),
            Input::Bound {
                open,
                local: Some(addr),
            },
        );
        assert_eq!(
            h.core.outputs().events.pop_front(),
            Some(Event::Abandon { open })
        );
        assert_eq!(error_code(&decode(&h.take()[0].2)), Some(403));
        assert_eq!(h.core.shared.allocation_count(), 0);
    }

    fn cut_off(tenant: &str) -> Policy {
        Policy::from_enforcement(floe_proto::usage::Enforcement {
            cut_off: vec![floe_proto::usage::CutOff {
                tenant: tenant.into(),
                reason: floe_proto::usage::CutOffReason::OverQuota,
            }],
            ..Default::default()
        })
    }

    /// Until the enforcement state is known, no one may allocate (508,
    /// so clients try their next server); a policy arriving lets them.
    #[test]
    fn without_enforcement_state_allocations_are_refused() {
        let mut h = harness(settings(), None);
        let mut c = h.client(5000, "t");
        let answer = h.request(0, &mut c, METHOD_ALLOCATE, udp());
        assert_eq!(error_code(&answer), Some(508));
        h.core
            .handle(h.at(0), Input::Policy(Arc::new(cut_off("someone-else"))));
        h.allocate(1, &mut c);
    }

    /// A policy cutting a tenant off closes its allocations at once and
    /// bills what they relayed.
    #[test]
    fn a_cut_off_closes_allocations_and_bills_them() {
        let mut h = harness(settings(), Some(Policy::default()));
        let mut c = h.client(5000, "t");
        h.allocate(0, &mut c);
        h.permit(0, &mut c, peer());
        h.core.handle(
            h.at(1),
            Input::Peer {
                relay: 0,
                from: peer(),
                data: &[1; 100],
            },
        );
        h.take();
        h.core
            .handle(h.at(1), Input::Policy(Arc::new(cut_off("t"))));
        assert_eq!(
            h.core.outputs().events.pop_front(),
            Some(Event::Close { relay: 0 })
        );
        assert_eq!(h.core.shared.allocation_count(), 0);
        assert_eq!(cut(&h).1, (0, 100));
    }

    /// Lifetimes: an allocation the client does not refresh closes at its
    /// expiry (on the timer); a refresh extends it; LIFETIME 0 deletes it.
    #[test]
    fn lifetimes_expire_refresh_and_delete() {
        let mut s = settings();
        s.max_lifetime = Duration::from_secs(60);
        let mut h = harness(s, Some(Policy::default()));
        let mut c = h.client(5000, "t");
        h.allocate(0, &mut c);
        assert!(h.core.timeout() <= h.at(1).at);
        h.core.handle(h.at(59), Input::Timer);
        assert!(h.core.outputs().events.is_empty(), "alive at 59 s");
        let lifetime = |secs: u32| -> Vec<Box<dyn Setter>> {
            vec![Box::new(turn::proto::lifetime::Lifetime(
                Duration::from_secs(u64::from(secs)),
            ))]
        };
        let answer = h.request(59, &mut c, METHOD_REFRESH, lifetime(600));
        let mut granted = turn::proto::lifetime::Lifetime::default();
        granted.get_from(&answer).expect("lifetime");
        assert_eq!(
            granted.0,
            Duration::from_secs(60),
            "capped at --max-lifetime"
        );
        h.core.handle(h.at(118), Input::Timer);
        assert!(h.core.outputs().events.is_empty(), "refreshed");
        h.core.handle(h.at(119), Input::Timer);
        assert_eq!(
            h.core.outputs().events.pop_front(),
            Some(Event::Close { relay: 0 })
        );

        let mut d = h.client(5001, "t");
        h.allocate(120, &mut d);
        let answer = h.request(121, &mut d, METHOD_REFRESH, lifetime(0));
        assert_eq!(answer.typ.class, CLASS_SUCCESS_RESPONSE);
        assert_eq!(h.core.shared.allocation_count(), 0);
        assert!(h.core.by_client.is_empty() && h.core.by_relay.is_empty());
    }

    /// The plan's allocation quota counts across the whole server (486),
    /// and a closed allocation gives its place back.
    #[test]
    fn tenant_quotas_hold() {
        let policy = Policy::from_enforcement(floe_proto::usage::Enforcement {
            policies: vec![floe_proto::usage::TenantPolicy {
                tenant: "t".into(),
                max_allocations: Some(1),
                max_bitrate_bps: None,
            }],
            ..Default::default()
        });
        let mut h = harness(settings(), Some(policy));
        let mut a = h.client(5000, "t");
        let mut b = h.client(5001, "t");
        h.allocate(0, &mut a);
        let answer = h.request(0, &mut b, METHOD_ALLOCATE, udp());
        assert_eq!(error_code(&answer), Some(486));
        h.core.handle(
            h.at(1),
            Input::Disconnected {
                from: a.addr,
                transport: Transport::Udp,
            },
        );
        h.allocate(1, &mut b);
    }

    /// Between two allocations of one core, a datagram is handed over in
    /// memory (no transmit to a relay socket), with the receiver's
    /// permissions applied; between cores it goes out as a hand-over.
    #[test]
    fn hairpins_stay_in_memory() {
        let mut h = harness(settings(), Some(Policy::default()));
        let mut a = h.client(5000, "t");
        let mut b = h.client(5001, "t");
        let ra = h.allocate(0, &mut a);
        let rb = h.allocate(0, &mut b);
        h.bind_channel(0, &mut a, 0x4000, rb);
        assert!(
            h.feed(1, a.addr, &channel_data(0x4000, b"hi")).is_empty(),
            "b has not permitted a"
        );
        h.permit(1, &mut b, ra);
        let sent = h.feed(2, a.addr, &channel_data(0x4000, b"hi"));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1, b.addr);
        let m = decode(&sent[0].2);
        assert_eq!(m.get(ATTR_DATA).expect("data"), b"hi");

        // An address another shard owns: handed over to that shard.
        h.core.shared.owners.set(rb, Some(3));
        let sent = h.feed(3, a.addr, &channel_data(0x4000, b"hi"));
        assert_eq!(
            sent,
            vec![(Via::Shard { shard: 3, from: ra }, rb, b"hi".to_vec())]
        );
    }

    /// Nonces expire (438 with a fresh one; the client retries with it),
    /// and a nonce is bound to the client's IP.
    #[test]
    fn nonces_expire_and_are_bound_to_the_ip() {
        let mut s = settings();
        s.nonce_lifetime = Duration::from_secs(60);
        let mut h = harness(s, Some(Policy::default()));
        let mut c = h.client(5000, "t");
        h.allocate(0, &mut c);
        let perm: Vec<Box<dyn Setter>> = vec![Box::new(peer_attr(peer()))];
        assert_eq!(
            h.request(60, &mut c, METHOD_CREATE_PERMISSION, perm)
                .typ
                .class,
            CLASS_SUCCESS_RESPONSE
        );
        let perm: Vec<Box<dyn Setter>> = vec![Box::new(peer_attr(peer()))];
        let stale = h.request(61, &mut c, METHOD_CREATE_PERMISSION, perm);
        assert_eq!(error_code(&stale), Some(438));
        c.nonce = String::from_utf8(stale.get(ATTR_NONCE).expect("nonce")).expect("utf8");
        h.permit(61, &mut c, peer());

        // The same nonce from another IP: stale too.
        let mut other = h.client(5000, "t");
        other.addr = "192.0.2.2:5000".parse().expect("addr");
        other.nonce = c.nonce.clone();
        let perm: Vec<Box<dyn Setter>> = vec![Box::new(peer_attr(peer()))];
        let raw = build_request(METHOD_CREATE_PERMISSION, &perm, Some(&other));
        assert_eq!(
            error_code(&decode(&h.only_answer(61, other.addr, &raw))),
            Some(438)
        );
    }

    /// A plan's bit-rate cap: a second's worth at once, then only what
    /// refills; what is over the cap is dropped (and not billed) both ways.
    #[test]
    fn bitrate_caps_hold_both_ways() {
        let policy = Policy::from_enforcement(floe_proto::usage::Enforcement {
            policies: vec![floe_proto::usage::TenantPolicy {
                tenant: "t".into(),
                max_allocations: None,
                max_bitrate_bps: Some(80_000),
            }],
            ..Default::default()
        });
        let mut h = harness(settings(), Some(policy));
        let mut c = h.client(5000, "t");
        h.allocate(0, &mut c);
        h.bind_channel(0, &mut c, 0x4000, peer());
        // 80 kbit/s: 10,000 bytes of burst.
        let sent: usize = (0..12)
            .map(|_| h.feed(1, c.addr, &channel_data(0x4000, &[0; 1000])).len())
            .sum();
        assert_eq!(sent, 10);
        h.core.handle(
            h.at(1),
            Input::Peer {
                relay: 0,
                from: peer(),
                data: &[0; 1000],
            },
        );
        assert!(h.take().is_empty(), "the cap is per allocation, both ways");
        // A second later, a second's worth again.
        h.core.handle(
            h.at(2),
            Input::Peer {
                relay: 0,
                from: peer(),
                data: &[0; 1000],
            },
        );
        assert_eq!(h.take().len(), 1);
        h.core.handle(h.at(3), Input::Collect);
        assert_eq!(cut(&h).1, (10_000, 1_000));
    }

    /// Bytes settled on an allocation after it closed (a send still in
    /// flight as it closed) are billed at the next cut, once.
    #[test]
    fn traffic_settled_after_a_close_is_billed_at_the_next_cut() {
        let mut h = harness(settings(), Some(Policy::default()));
        let mut c = h.client(5000, "t");
        h.allocate(0, &mut c);
        h.bind_channel(0, &mut c, 0x4000, peer());
        h.input(1, c.addr, &channel_data(0x4000, &[0; 7]));
        h.core.handle(
            h.at(1),
            Input::Disconnected {
                from: c.addr,
                transport: Transport::Udp,
            },
        );
        // Settled after the close.
        h.take();
        h.core.handle(h.at(2), Input::Collect);
        assert_eq!(cut(&h).1, (7, 0));
        h.core.handle(h.at(3), Input::Collect);
        assert_eq!(cut(&h).1, (0, 0), "billed once");
    }

    /// Data indications are written by hand: the stun crate reads them,
    /// IPv4 and IPv6, odd lengths padded.
    #[test]
    fn data_indications_decode() {
        for peer in ["198.51.100.1:3478", "[2001:db8::1]:40000"] {
            let peer: SocketAddr = peer.parse().expect("addr");
            for len in [0, 1, 5, 8] {
                let data = vec![0xAB; len];
                let mut out = vec![9, 9];
                data_indication(&mut out, peer, &data, [7; 12]);
                let m = decode(&out[2..]);
                assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
                let mut p = PeerAddress::default();
                p.get_from(&m).expect("peer");
                assert_eq!(SocketAddr::new(p.ip, p.port), peer);
                assert_eq!(m.get(ATTR_DATA).expect("data"), data);
            }
        }
    }

    /// A well-formed STUN header around arbitrary attribute bytes.
    fn stun_shaped(method: u16, class: u16, body: &[u8]) -> Vec<u8> {
        let body = &body[..body.len() / 4 * 4];
        let t = (method & 0x000F)
            | ((method & 0x0070) << 1)
            | ((method & 0x0F80) << 2)
            | ((class & 1) << 4)
            | ((class & 2) << 7);
        let mut v = t.to_be_bytes().to_vec();
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        v.extend_from_slice(&[7; 12]);
        v.extend_from_slice(body);
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a client or peer sends, the core answers or drops it:
        /// no panic, over every transport.
        #[test]
        fn arbitrary_inputs_never_panic(
            method in prop_oneof![Just(1u16), Just(3), Just(4), Just(6), Just(8), Just(9), any::<u16>()],
            class in 0u16..4,
            body in proptest::collection::vec(any::<u8>(), 0..200),
            raw in proptest::collection::vec(any::<u8>(), 0..120),
            relay in 0usize..3,
        ) {
            let mut h = harness(settings(), Some(Policy::default()));
            let mut c = h.client(5000, "t");
            h.allocate(0, &mut c);
            let from = c.addr;
            for transport in [Transport::Udp, Transport::Tcp] {
                h.core.handle(h.at(1), Input::Client { from, transport, data: &stun_shaped(method, class, &body) });
                h.core.handle(h.at(1), Input::Client { from, transport, data: &raw });
            }
            h.core.handle(h.at(1), Input::Peer { relay, from: peer(), data: &raw });
            h.core.handle(h.at(1), Input::Hairpin { from: peer(), to: peer(), data: &raw });
            h.bind_all(h.at(1), |_| true);
        }
    }
}
