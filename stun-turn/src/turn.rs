//! The TURN server proper (RFC 8656 over RFC 8489): request handling with
//! long-term credentials, the allocation table, the relay data path in
//! both directions, policy enforcement and metering hooks. Socket loops
//! live in [`crate::server`]; they call [`Turn::on_stun`] and
//! [`Turn::on_channel_data`] with what they read.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use floe_common::ratelimit::RateLimiter;
use floe_common::udp_batch::RecvBatch;
use floe_proto::credential::TurnUsername;
use floe_proto::time::unix_now;
use stun::attributes::*;
use stun::error_code::*;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;

use crate::allocation::{Allocation, BindError, ClientSink, Transport, Undelivered};
use crate::auth::{AuthError, Authenticator};
use crate::binding;
use crate::config::Settings;
use crate::meter::Meter;
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Refused};

/// Default allocation lifetime (RFC 8656 §3.2).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Attempts at finding a free relay port.
const PORT_ATTEMPTS: usize = 50;
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

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

/// The allocation table with per-tenant counts.
#[derive(Default)]
struct Table {
    by_client: HashMap<(SocketAddr, Transport), Arc<Allocation>>,
    /// The same allocations by relayed transport address, so a datagram
    /// for one of this server's own relays skips the kernel round trip.
    by_relay: HashMap<SocketAddr, Arc<Allocation>>,
    per_tenant: HashMap<String, u32>,
    /// Allocations closed since the last usage cut: a relay that held one
    /// as it closed may still count bytes on it, and the next cut bills
    /// them ([`Turn::take_closed`]).
    closed: Vec<Arc<Allocation>>,
}

/// The running TURN logic, shared by every socket task.
pub(crate) struct Turn {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub meter: Arc<Meter>,
    auth: Authenticator,
    /// The TURN secrets in use (reloaded from their file).
    secrets: RwLock<Option<Arc<floe_proto::credential::TurnSecrets>>>,
    table: RwLock<Table>,
    /// What the control plane last said; `None` until it (or a saved
    /// copy) is known, and then allocations are refused.
    policy: RwLock<Option<Arc<Policy>>>,
    failures: Mutex<RateLimiter<IpAddr>>,
    draining: AtomicBool,
    next_port: AtomicUsize,
    /// Binding answers by transport, resolved once (hot path).
    binding_answered: [prometheus::IntCounter; 3],
}

impl Turn {
    pub fn new(settings: Settings, metrics: Arc<Metrics>, meter: Arc<Meter>) -> Self {
        let per_min = settings.auth_failures_per_min.max(1);
        let binding_answered = [Transport::Udp, Transport::Tcp, Transport::Tls].map(|t| {
            metrics
                .stun_requests
                .with_label_values(&["binding", t.as_str(), "success"])
        });
        Self {
            binding_answered,
            auth: Authenticator::new(&settings.realm, settings.nonce_lifetime.as_secs()),
            failures: Mutex::new(RateLimiter::new(
                f64::from(per_min) / 60.0,
                per_min,
                100_000,
            )),
            next_port: AtomicUsize::new(rand::random::<u16>() as usize),
            secrets: RwLock::new(settings.secrets.clone().map(Arc::new)),
            settings,
            metrics,
            meter,
            table: RwLock::default(),
            policy: RwLock::default(),
            draining: AtomicBool::new(false),
        }
    }

    /// The TURN secrets in use.
    pub fn secrets(&self) -> Option<Arc<floe_proto::credential::TurnSecrets>> {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts new TURN secrets in use (credentials under a kid they no
    /// longer hold are refused from the next request).
    pub fn replace_secrets(&self, secrets: floe_proto::credential::TurnSecrets) {
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(secrets));
    }

    /// Refuses new allocations from now on (existing ones keep relaying).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The allocation table; a panic elsewhere never locks it for good.
    fn table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn allocation_count(&self) -> usize {
        self.table().by_client.len()
    }

    fn local_relay(&self, relayed: SocketAddr) -> Option<Arc<Allocation>> {
        self.table().by_relay.get(&relayed).cloned()
    }

    fn lookup(&self, client: SocketAddr, transport: Transport) -> Option<Arc<Allocation>> {
        self.table().by_client.get(&(client, transport)).cloned()
    }

    /// Every allocation (for metering, expiry and enforcement sweeps).
    pub fn allocations(&self) -> Vec<Arc<Allocation>> {
        self.table().by_client.values().cloned().collect()
    }

    /// Removes an allocation, stops its relay task and meters what it had
    /// not reported yet.
    pub fn close(&self, a: &Allocation, reason: &str) {
        let removed = {
            let mut t = self.table_mut();
            let removed = match t.by_client.remove(&(a.client, a.transport)) {
                Some(gone) => {
                    t.closed.push(gone);
                    true
                }
                None => false,
            };
            if removed {
                t.by_relay.remove(&a.relayed);
            }
            if removed && let Some(n) = t.per_tenant.get_mut(&a.user.tenant) {
                *n -= 1;
                if *n == 0 {
                    t.per_tenant.remove(&a.user.tenant);
                }
            }
            removed
        };
        if !removed {
            return;
        }
        a.closed.cancel();
        self.account(a);
        self.metrics
            .allocations
            .with_label_values(&[a.user.tenant.as_str()])
            .dec();
        tracing::debug!(client = %a.client, tenant = %a.user.tenant, room = %a.user.room, reason, "allocation closed");
    }

    /// The allocations closed since the last call (see `Table::closed`).
    pub fn take_closed(&self) -> Vec<Arc<Allocation>> {
        std::mem::take(&mut self.table_mut().closed)
    }

    /// Moves an allocation's unreported traffic into the next usage batch
    /// and the relayed-traffic metrics.
    pub fn account(&self, a: &Allocation) {
        let d = a.take_unreported();
        if d.is_zero() {
            return;
        }
        let tenant = a.user.tenant.as_str();
        let m = &self.metrics;
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
        self.meter.add(tenant, &a.user.room, d);
    }

    /// Applies new enforcement state: closes allocations it no longer allows.
    pub fn apply_policy(&self, policy: Policy) {
        // The policy first, then the scan: an Allocate commits under the
        // table lock after checking the policy, so it is either in the
        // scan or sees this policy (see `commit`).
        let policy = Arc::new(policy);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(policy.clone());
        let doomed: Vec<_> = self
            .allocations()
            .into_iter()
            .filter(|a| policy.check(&a.user).is_err())
            .collect();
        for a in doomed {
            self.metrics
                .allocations_closed
                .with_label_values(&["policy"])
                .inc();
            self.close(&a, "refused by the control plane");
        }
    }

    /// Whether the policy lets `user` allocate; its limits if so.
    fn admit(&self, user: &TurnUsername) -> Result<(Option<u32>, Option<u64>), Failure> {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let refused = |reason: &str, f: Failure| {
            self.metrics
                .allocations_refused
                .with_label_values(&[reason])
                .inc();
            Err(f)
        };
        let Some(policy) = policy.as_ref() else {
            // Not knowing who is cut off, allow no one; 508 sends clients
            // to their next TURN server.
            return refused(
                "no_policy",
                fail(CODE_INSUFFICIENT_CAPACITY, "Control Plane Unavailable"),
            );
        };
        match policy.check(user) {
            Ok(()) => Ok(policy.limits(&user.tenant)),
            Err(Refused::CutOff(c)) => refused(c.as_str(), fail(CODE_FORBIDDEN, "Forbidden")),
            Err(Refused::Revoked) => refused("revoked", fail(CODE_FORBIDDEN, "Forbidden")),
        }
    }

    /// Puts a new allocation in the table, unless the policy changed
    /// against it while its relay socket was bound.
    fn commit(&self, allocation: &Arc<Allocation>) -> Result<(), Failure> {
        let mut t = self.table_mut();
        self.admit(&allocation.user)?;
        t.by_client.insert(
            (allocation.client, allocation.transport),
            allocation.clone(),
        );
        t.by_relay.insert(allocation.relayed, allocation.clone());
        Ok(())
    }

    /// Closes expired allocations and prunes permissions.
    pub fn sweep(&self, now: Instant) {
        for a in self.allocations() {
            if a.expired(now) {
                self.metrics
                    .allocations_closed
                    .with_label_values(&["expired"])
                    .inc();
                self.close(&a, "expired");
            } else {
                a.prune(now);
            }
        }
    }

    /// Counts a Binding request answered over `transport`.
    pub(crate) fn count_binding_answer(&self, transport: Transport) {
        self.binding_answered[transport as usize].inc();
    }

    /// Handles one STUN message from a client; returns the response.
    pub async fn on_stun(
        self: &Arc<Self>,
        raw: &[u8],
        from: SocketAddr,
        transport: Transport,
        sink: &ClientSink,
    ) -> Option<Vec<u8>> {
        let mut fast = [0u8; binding::FAST_MAX];
        if let Some(n) = binding::fast_response(raw, from, &mut fast) {
            self.count_binding_answer(transport);
            return Some(fast[..n].to_vec());
        }
        if !binding::looks_like_stun(raw) {
            self.metrics
                .discarded
                .with_label_values(&["not_stun"])
                .inc();
            return None;
        }
        let mut req = Message::new();
        req.raw.clear();
        req.raw.extend_from_slice(raw);
        if req.decode().is_err() {
            self.metrics
                .discarded
                .with_label_values(&["malformed"])
                .inc();
            return None;
        }
        let method = req.typ.method;
        if method == METHOD_BINDING {
            let mut out = Message::new();
            let r = binding::handle(&req, from, &mut out);
            if r == binding::Outcome::Respond {
                self.count_binding_answer(transport);
            }
            return (r == binding::Outcome::Respond).then_some(out.raw);
        }
        if req.typ.class == CLASS_INDICATION {
            if method == METHOD_SEND {
                self.on_send_indication(&req, from, transport);
            }
            return None;
        }
        if req.typ.class != CLASS_REQUEST {
            return None;
        }
        let started = Instant::now();
        let name = match method {
            METHOD_ALLOCATE => "allocate",
            METHOD_REFRESH => "refresh",
            METHOD_CREATE_PERMISSION => "create_permission",
            METHOD_CHANNEL_BIND => "channel_bind",
            _ => "other",
        };
        let out = self.on_request(&mut req, from, transport, sink).await;
        self.metrics
            .request_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        out
    }

    async fn on_request(
        self: &Arc<Self>,
        req: &mut Message,
        from: SocketAddr,
        transport: Transport,
        sink: &ClientSink,
    ) -> Option<Vec<u8>> {
        let method = req.typ.method;
        let unknown = binding::unknown_attributes(req, |a| understood(a.typ));
        if !unknown.is_empty() {
            return self.error(
                req,
                from,
                None,
                fail(CODE_UNKNOWN_ATTRIBUTE, "Unknown Attribute"),
                Some(unknown),
            );
        }
        let Some(secrets) = self.secrets() else {
            return self.error(
                req,
                from,
                None,
                fail(CODE_FORBIDDEN, "TURN not enabled"),
                None,
            );
        };
        let now_unix = unix_now();
        let authed = match self.auth.check(req, from.ip(), &secrets, now_unix) {
            Ok(a) => a,
            Err(e) => return self.auth_failure(req, from, e),
        };
        let integrity = &authed.integrity;
        let result = match method {
            METHOD_ALLOCATE => self.allocate(req, from, transport, sink, authed.user).await,
            METHOD_REFRESH => self.refresh(req, from, transport, &authed.user),
            METHOD_CREATE_PERMISSION => self.create_permission(req, from, transport, &authed.user),
            METHOD_CHANNEL_BIND => self.channel_bind(req, from, transport, &authed.user),
            _ => Err(fail(CODE_BAD_REQUEST, "Unsupported Method")),
        };
        let label = match method {
            METHOD_ALLOCATE => "allocate",
            METHOD_REFRESH => "refresh",
            METHOD_CREATE_PERMISSION => "create_permission",
            METHOD_CHANNEL_BIND => "channel_bind",
            _ => "other",
        };
        match result {
            Ok(attrs) => {
                self.metrics
                    .stun_requests
                    .with_label_values(&[label, transport.as_str(), "success"])
                    .inc();
                let mut setters: Vec<Box<dyn Setter>> = vec![
                    Box::new(MessageType::new(method, CLASS_SUCCESS_RESPONSE)),
                    Box::new(stun::agent::TransactionId(req.transaction_id.0)),
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
            Err(f) => {
                self.metrics
                    .stun_requests
                    .with_label_values(&[label, transport.as_str(), "error"])
                    .inc();
                self.error(req, from, Some(integrity), f, None)
            }
        }
    }

    fn auth_failure(&self, req: &Message, from: SocketAddr, e: AuthError) -> Option<Vec<u8>> {
        let reason = e.reason();
        let f = match e {
            AuthError::Challenge => Failure {
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
            AuthError::Unauthorized(_) | AuthError::Expired => Failure {
                code: CODE_UNAUTHORIZED,
                reason: "Unauthorized",
                challenge: true,
            },
        };
        if !matches!(e, AuthError::Challenge | AuthError::StaleNonce) {
            self.metrics
                .auth_failures
                .with_label_values(&[reason])
                .inc();
            let allowed = self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow(&from.ip(), Instant::now());
            if !allowed {
                // Past the limit a guesser learns nothing more, not even a 401.
                self.metrics
                    .auth_failures
                    .with_label_values(&["rate_limited"])
                    .inc();
                return None;
            }
        }
        self.error(req, from, None, f, None)
    }

    fn error(
        &self,
        req: &Message,
        from: SocketAddr,
        integrity: Option<&MessageIntegrity>,
        f: Failure,
        unknown: Option<Vec<AttrType>>,
    ) -> Option<Vec<u8>> {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(MessageType::new(req.typ.method, CLASS_ERROR_RESPONSE)),
            Box::new(stun::agent::TransactionId(req.transaction_id.0)),
            Box::new(ErrorCodeAttribute {
                code: f.code,
                reason: f.reason.as_bytes().to_vec(),
            }),
        ];
        if let Some(list) = unknown {
            setters.push(Box::new(stun::uattrs::UnknownAttributes(list)));
        }
        if f.challenge {
            setters.push(Box::new(TextAttribute::new(
                ATTR_REALM,
                self.auth.realm().to_owned(),
            )));
            setters.push(Box::new(TextAttribute::new(
                ATTR_NONCE,
                self.auth.nonce(from.ip(), unix_now()),
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

    fn refuse_allocation(&self, reason: &str, f: Failure) -> Result<Vec<Box<dyn Setter>>, Failure> {
        self.metrics
            .allocations_refused
            .with_label_values(&[reason])
            .inc();
        Err(f)
    }

    async fn allocate(
        self: &Arc<Self>,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        sink: &ClientSink,
        user: TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        if let Some(existing) = self.lookup(from, transport) {
            // A retransmitted Allocate gets the same answer (RFC 8656 §7.2).
            if existing.created_by == req.transaction_id.0 {
                let left = existing.remaining(Instant::now());
                return Ok(self.allocation_attrs(&existing, from, left, false));
            }
            return self
                .refuse_allocation("mismatch", fail(CODE_ALLOC_MISMATCH, "Allocation Mismatch"));
        }
        if self.draining.load(Ordering::Relaxed) {
            return self.refuse_allocation(
                "draining",
                fail(CODE_INSUFFICIENT_CAPACITY, "Server Draining"),
            );
        }
        let proto = req.get(ATTR_REQUESTED_TRANSPORT).ok();
        match proto.as_deref() {
            Some([17, ..]) => {}
            Some(_) => {
                return self.refuse_allocation(
                    "transport",
                    fail(
                        CODE_UNSUPPORTED_TRANS_PROTO,
                        "Unsupported Transport Protocol",
                    ),
                );
            }
            None => {
                return self.refuse_allocation(
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
                return self.refuse_allocation(
                    "reservation",
                    fail(CODE_INSUFFICIENT_CAPACITY, "Port Reservation Not Supported"),
                );
            }
        };
        if req.contains(ATTR_RESERVATION_TOKEN) {
            return self.refuse_allocation(
                "reservation",
                fail(CODE_INSUFFICIENT_CAPACITY, "Port Reservation Not Supported"),
            );
        }
        let family = match req.get(ATTR_REQUESTED_ADDRESS_FAMILY).ok().as_deref() {
            None | Some([0x01, ..]) => 4,
            Some([0x02, ..]) => 6,
            Some(_) => {
                return self.refuse_allocation(
                    "bad_request",
                    fail(CODE_BAD_REQUEST, "Bad Address Family"),
                );
            }
        };
        let additional = req.get(ATTR_ADDITIONAL_ADDRESS_FAMILY).ok();
        if additional.is_some() && req.contains(ATTR_REQUESTED_ADDRESS_FAMILY) {
            return self.refuse_allocation(
                "bad_request",
                fail(CODE_BAD_REQUEST, "Conflicting Address Families"),
            );
        }
        // Dual allocation (RFC 8656 §7.2): the IPv4 relay is granted; the
        // additional IPv6 one is declined with ADDRESS-ERROR-CODE.
        let decline_v6 = matches!(additional.as_deref(), Some([0x02, ..]));
        if additional.is_some() && !decline_v6 {
            return self.refuse_allocation(
                "bad_request",
                fail(CODE_BAD_REQUEST, "Bad Additional Address Family"),
            );
        }
        let Some(relay_ip) = self
            .settings
            .relay_ips
            .iter()
            .find(|ip| {
                if family == 4 {
                    ip.is_ipv4()
                } else {
                    ip.is_ipv6()
                }
            })
            .copied()
        else {
            return self.refuse_allocation(
                "family",
                fail(
                    CODE_ADDR_FAMILY_NOT_SUPPORTED,
                    "Address Family not Supported",
                ),
            );
        };
        let policy_limits = self.admit(&user)?;
        let lifetime = requested_lifetime(req, self.settings.max_lifetime);
        if lifetime.is_zero() {
            return self.refuse_allocation("bad_request", fail(CODE_BAD_REQUEST, "Zero Lifetime"));
        }
        // Reserve the slot before the await, so concurrent Allocates
        // cannot overshoot the caps.
        {
            let mut t = self.table_mut();
            if t.by_client.len() >= self.settings.max_allocations {
                drop(t);
                return self.refuse_allocation(
                    "capacity",
                    fail(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity"),
                );
            }
            let n = t.per_tenant.entry(user.tenant.clone()).or_insert(0);
            if policy_limits.0.is_some_and(|max| *n >= max) {
                drop(t);
                return self.refuse_allocation(
                    "quota",
                    fail(CODE_ALLOC_QUOTA_REACHED, "Allocation Quota Reached"),
                );
            }
            *n += 1;
        }
        let tenant = user.tenant.clone();
        let release = move |this: &Self| {
            let mut t = this.table_mut();
            if let Some(n) = t.per_tenant.get_mut(&tenant) {
                *n -= 1;
                if *n == 0 {
                    t.per_tenant.remove(&tenant);
                }
            }
        };
        let relay = match self.bind_relay(relay_ip, even).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                release(self);
                tracing::warn!(error = %e, "no relay port available");
                return self.refuse_allocation(
                    "ports",
                    fail(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity"),
                );
            }
        };
        let local = match relay.local_addr() {
            Ok(a) => a,
            Err(_) => {
                release(self);
                return self.refuse_allocation(
                    "ports",
                    fail(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity"),
                );
            }
        };
        let advertised = SocketAddr::new(
            self.settings
                .external_ip
                .filter(|ip| ip.is_ipv4() == local.is_ipv4())
                .unwrap_or(local.ip()),
            local.port(),
        );
        let allocation = Arc::new(Allocation::new(
            from,
            transport,
            user,
            relay,
            advertised,
            sink.clone(),
            req.transaction_id.0,
            lifetime,
            policy_limits.1,
            Instant::now(),
        ));
        if let Err(f) = self.commit(&allocation) {
            release(self);
            return Err(f);
        }
        self.metrics
            .allocations
            .with_label_values(&[allocation.user.tenant.as_str()])
            .inc();
        self.metrics.allocations_created.inc();
        tokio::spawn(relay_task(self.clone(), allocation.clone()));
        tracing::debug!(client = %from, relay = %advertised, tenant = %allocation.user.tenant, room = %allocation.user.room, "allocation created");
        Ok(self.allocation_attrs(&allocation, from, lifetime, decline_v6))
    }

    fn allocation_attrs(
        &self,
        a: &Allocation,
        from: SocketAddr,
        lifetime: Duration,
        decline_v6: bool,
    ) -> Vec<Box<dyn Setter>> {
        let mut attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(turn::proto::relayaddr::RelayedAddress {
                ip: a.relayed.ip(),
                port: a.relayed.port(),
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

    async fn bind_relay(&self, ip: IpAddr, even: bool) -> std::io::Result<UdpSocket> {
        let (lo, hi) = self.settings.relay_ports;
        let span = usize::from(hi - lo) + 1;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS.min(span) {
            let mut port = lo + (self.next_port.fetch_add(1, Ordering::Relaxed) % span) as u16;
            if even && port % 2 == 1 {
                if port == hi {
                    continue;
                }
                port += 1;
            }
            match UdpSocket::bind(SocketAddr::new(ip, port)).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("empty port range")))
    }

    /// The allocation of this 5-tuple, if it belongs to `user` (437 otherwise).
    fn own_allocation(
        &self,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Arc<Allocation>, Failure> {
        self.lookup(from, transport)
            .filter(|a| same_user(&a.user, user))
            .ok_or_else(|| fail(CODE_ALLOC_MISMATCH, "Allocation Mismatch"))
    }

    fn refresh(
        &self,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        let a = self.own_allocation(from, transport, user)?;
        let lifetime = requested_lifetime(req, self.settings.max_lifetime);
        if lifetime.is_zero() {
            self.metrics
                .allocations_closed
                .with_label_values(&["client"])
                .inc();
            self.close(&a, "deleted by the client");
        } else {
            a.refresh(lifetime, Instant::now());
        }
        Ok(vec![Box::new(turn::proto::lifetime::Lifetime(lifetime))])
    }

    fn create_permission(
        &self,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        let a = self.own_allocation(from, transport, user)?;
        let peers = peer_addresses(req);
        if peers.is_empty() {
            return Err(fail(CODE_BAD_REQUEST, "Missing XOR-PEER-ADDRESS"));
        }
        for p in &peers {
            self.check_peer(&a, *p)?;
        }
        let now = Instant::now();
        for p in peers {
            a.permit(p.ip(), now);
        }
        Ok(Vec::new())
    }

    /// A peer must match the relay's address family (443) and be allowed
    /// by the relay policy (403).
    fn check_peer(&self, a: &Allocation, peer: SocketAddr) -> Result<(), Failure> {
        if peer.is_ipv4() != a.relayed.is_ipv4() {
            return Err(fail(
                CODE_PEER_ADDR_FAMILY_MISMATCH,
                "Peer Address Family Mismatch",
            ));
        }
        if policy::peer_denied(peer.ip(), &self.settings.allow_peers) {
            self.metrics.denied_peers.inc();
            return Err(fail(CODE_FORBIDDEN, "Forbidden Peer Address"));
        }
        Ok(())
    }

    fn channel_bind(
        &self,
        req: &Message,
        from: SocketAddr,
        transport: Transport,
        user: &TurnUsername,
    ) -> Result<Vec<Box<dyn Setter>>, Failure> {
        let a = self.own_allocation(from, transport, user)?;
        let number = match req.get(ATTR_CHANNEL_NUMBER).ok().as_deref() {
            Some([hi, lo, ..]) => u16::from_be_bytes([*hi, *lo]),
            _ => return Err(fail(CODE_BAD_REQUEST, "Missing CHANNEL-NUMBER")),
        };
        let peer = *peer_addresses(req)
            .first()
            .ok_or_else(|| fail(CODE_BAD_REQUEST, "Missing XOR-PEER-ADDRESS"))?;
        self.check_peer(&a, peer)?;
        a.bind(number, peer, Instant::now()).map_err(|e| match e {
            BindError::OutOfRange => fail(CODE_BAD_REQUEST, "Bad Channel Number"),
            BindError::NumberTaken | BindError::PeerTaken => {
                fail(CODE_BAD_REQUEST, "Channel Already Bound")
            }
        })?;
        Ok(Vec::new())
    }

    /// Relays a Send indication's DATA to its peer (silently dropped when
    /// not permitted, RFC 8656 §11.2).
    fn on_send_indication(&self, req: &Message, from: SocketAddr, transport: Transport) {
        let Some(a) = self.lookup(from, transport) else {
            self.metrics
                .discarded
                .with_label_values(&["no_allocation"])
                .inc();
            return;
        };
        let (Some(peer), Ok(data)) = (peer_addresses(req).first().copied(), req.get(ATTR_DATA))
        else {
            self.metrics
                .discarded
                .with_label_values(&["malformed"])
                .inc();
            return;
        };
        self.to_peer(&a, peer, &data);
    }

    /// Relays a ChannelData message's data from a client to the bound peer.
    pub fn on_channel_data(
        &self,
        from: SocketAddr,
        transport: Transport,
        channel: u16,
        data: &[u8],
    ) {
        let Some(a) = self.lookup(from, transport) else {
            self.metrics
                .discarded
                .with_label_values(&["no_allocation"])
                .inc();
            return;
        };
        match a.channel_peer(channel, Instant::now()) {
            Some(peer) => self.to_peer(&a, peer, data),
            None => {
                self.metrics
                    .discarded
                    .with_label_values(&["no_channel"])
                    .inc();
            }
        }
    }

    /// Forwards a datagram from `peer` to `a`'s client when permitted and
    /// within the cap: as ChannelData when a channel is bound, else as a
    /// Data indication. The data sits at `buf[4..4 + n]`, with four bytes
    /// of headroom for the ChannelData header and three spare after it for
    /// stream padding.
    fn to_client(&self, a: &Allocation, peer: SocketAddr, buf: &mut [u8], n: usize) {
        let now = Instant::now();
        let (permitted, channel) = a.route_from_peer(peer, now);
        if !permitted {
            self.undelivered("no_permission", n);
            return;
        }
        if !a.within_rate(n, now) {
            self.undelivered("bitrate", n);
            return;
        }
        let sent = match channel {
            Some(ch) => {
                buf[0..2].copy_from_slice(&ch.to_be_bytes());
                buf[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                let mut len = 4 + n;
                if a.transport != Transport::Udp {
                    // Streams pad ChannelData to four bytes (RFC 8656 §12.5).
                    let padded = (len + 3) & !3;
                    buf[len..padded].fill(0);
                    len = padded;
                }
                a.sink.relay(&buf[..len], n, &a.counters)
            }
            None => {
                let mut m = Message::new();
                let built = m.build(&[
                    Box::new(MessageType::new(METHOD_DATA, CLASS_INDICATION)),
                    Box::new(stun::agent::TransactionId::new()),
                    Box::new(turn::proto::peeraddr::PeerAddress {
                        ip: peer.ip(),
                        port: peer.port(),
                    }),
                    Box::new(turn::proto::data::Data(buf[4..4 + n].to_vec())),
                ]);
                match built {
                    Ok(()) => a.sink.relay(&m.raw, n, &a.counters),
                    Err(_) => Err(Undelivered::SendFailed),
                }
            }
        };
        if let Err(why) = sent {
            self.undelivered(why.reason(), n);
        }
    }

    /// Counts relayed payload that could not be passed on, by reason.
    pub(crate) fn undelivered(&self, reason: &str, bytes: usize) {
        self.metrics.discarded.with_label_values(&[reason]).inc();
        self.metrics
            .discarded_bytes
            .with_label_values(&[reason])
            .inc_by(bytes as u64);
    }

    fn to_peer(&self, a: &Allocation, peer: SocketAddr, data: &[u8]) {
        let now = Instant::now();
        if !a.permitted(peer.ip(), now) {
            self.undelivered("no_permission", data.len());
            return;
        }
        if !a.within_rate(data.len(), now) {
            self.undelivered("bitrate", data.len());
            return;
        }
        if !self.settings.kernel_hairpin
            && data.len() <= MAX_DATAGRAM
            && let Some(b) = self.local_relay(peer)
        {
            // A relay of this server: what the kernel would do, minus a
            // send and a receive. `a` sent it; `b` gets it from `a`'s
            // relayed address, with `b`'s permissions and cap applied.
            a.counters.record_out(data.len());
            self.metrics.hairpinned.inc();
            HAIRPIN.with_borrow_mut(|buf| {
                buf[4..4 + data.len()].copy_from_slice(data);
                self.to_client(&b, a.relayed, buf, data.len());
            });
            return;
        }
        // Straight to the kernel, not through tokio's readiness: a fresh
        // relay socket has no writable event observed yet, and tokio's
        // `try_send_to` then answers WouldBlock without trying, so the
        // first datagrams of a new allocation were dropped unbilled (the
        // load tester's ledger check caught it). The kernel says
        // WouldBlock only when the send buffer is really full.
        match socket2::SockRef::from(&*a.relay).send_to(data, &peer.into()) {
            Ok(_) => a.counters.record_out(data.len()),
            Err(_) => self.undelivered("send_failed", data.len()),
        }
    }
}

fn same_user(a: &TurnUsername, b: &TurnUsername) -> bool {
    a.tenant == b.tenant && a.room == b.room && a.peer == b.peer
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

/// A datagram in `Turn::to_client`'s layout: four bytes of headroom,
/// the datagram, room for stream padding.
const RELAY_BUF: usize = 4 + MAX_DATAGRAM + 4;

thread_local! {
    /// Scratch space for a datagram handed from one local allocation to
    /// another.
    static HAIRPIN: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; RELAY_BUF]);
    /// Receive batches for relay sockets, by address family, shared by
    /// every allocation whose task runs on this thread: a buffer per
    /// allocation cost each one 64 KiB of address space and a few pages.
    static RELAY_BATCH: [std::cell::RefCell<RecvBatch>; 2] = {
        let v4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
        let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
        [v4, v6].map(|a| std::cell::RefCell::new(RecvBatch::new(a, RELAY_BUF).with_headroom(4)))
    };
}

/// Reads an allocation's relay socket, a batch at a time, and hands each
/// datagram to [`Turn::to_client`].
async fn relay_task(turn: Arc<Turn>, a: Arc<Allocation>) {
    let family = usize::from(a.relayed.is_ipv6());
    let take = || {
        RELAY_BATCH.with(|batches| {
            let batch = &mut *batches[family].borrow_mut();
            let n = batch.try_recv(&a.relay)?;
            for i in 0..n {
                if let (buf, len, Some(peer)) = batch.get_mut(i) {
                    turn.to_client(&a, peer, buf, len);
                }
            }
            Ok(())
        })
    };
    loop {
        tokio::select! {
            _ = a.closed.cancelled() => return,
            // Errors are ICMP reports of earlier sends; keep relaying.
            _ = a.relay.async_io(tokio::io::Interest::READABLE, take) => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A server with no sockets of its own, for driving by hand.
    pub(crate) fn server() -> Arc<Turn> {
        let mut s = Settings::new(
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        );
        s.secrets = Some(
            floe_proto::credential::TurnSecrets::parse("k1=0123456789abcdef0").expect("secrets"),
        );
        let meter = Arc::new(Meter::open("fuzz", None).expect("meter"));
        let metrics = Arc::new(Metrics::new(s.max_allocations, 16_384));
        let turn = Arc::new(Turn::new(s, metrics, meter));
        turn.apply_policy(Policy::default());
        turn
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

    /// A cut-off applied while an Allocate was binding its relay socket
    /// (after its first check) still refuses it when it commits.
    #[tokio::test]
    async fn a_cut_off_during_an_allocate_refuses_it() {
        let turn = server();
        let a = Arc::new(crate::allocation::tests::allocation(None, Instant::now()).await);
        assert!(turn.admit(&a.user).is_ok(), "allowed before the cut-off");
        turn.apply_policy(cut_off("t"));
        let refused = turn.commit(&a).expect_err("refused at commit");
        assert_eq!(refused.code.0, CODE_FORBIDDEN.0);
        assert!(turn.allocations().is_empty());
    }

    /// Until the enforcement state is known, no one may allocate (508,
    /// so clients try their next server).
    #[tokio::test]
    async fn without_enforcement_state_allocations_are_refused() {
        let turn = server();
        *turn.policy.write().expect("lock") = None;
        let a = crate::allocation::tests::allocation(None, Instant::now()).await;
        assert_eq!(
            turn.admit(&a.user).expect_err("refused").code.0,
            CODE_INSUFFICIENT_CAPACITY.0
        );
        turn.apply_policy(cut_off("someone-else"));
        assert!(turn.admit(&a.user).is_ok(), "allowed once known");
    }

    /// Bytes a relay counts on an allocation after it closed (it held the
    /// allocation as it closed) are billed with the next cut, not lost.
    #[tokio::test]
    async fn traffic_after_the_final_accounting_is_billed_at_the_next_cut() {
        let turn = server();
        let a = Arc::new(crate::allocation::tests::allocation(None, Instant::now()).await);
        let (client, addr) = (a.client, a.relayed);
        {
            let mut t = turn.table_mut();
            t.by_client.insert((client, Transport::Udp), a.clone());
            t.by_relay.insert(addr, a.clone());
            t.per_tenant.insert("t".into(), 1);
        }
        a.counters.record_out(100);
        turn.close(&a, "test");
        a.counters.record_out(7);
        a.counters.record_in(11);
        crate::report::collect(&turn, floe_proto::time::unix_now());
        let mut total = (0, 0);
        while let Some(b) = turn.meter.oldest() {
            for r in &b.records {
                total.0 += r.bytes_out;
                total.1 += r.bytes_in;
            }
            turn.meter.acked(&b.server_id, b.seq).expect("ack");
        }
        assert_eq!(total, (107, 11));
        assert!(
            turn.take_closed().is_empty(),
            "each closed allocation is billed once more, then forgotten"
        );
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
        v.extend_from_slice(&stun::message::MAGIC_COOKIE.to_be_bytes());
        v.extend_from_slice(&[7; 12]);
        v.extend_from_slice(body);
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a client sends, the server answers or drops it: no panic.
        #[test]
        fn arbitrary_requests_never_panic(
            method in prop_oneof![Just(1u16), Just(3), Just(4), Just(6), Just(8), Just(9), any::<u16>()],
            class in 0u16..4,
            body in proptest::collection::vec(any::<u8>(), 0..200),
            raw in proptest::collection::vec(any::<u8>(), 0..120),
            channel in any::<u16>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let turn = server();
                let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                let from: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
                let sink = ClientSink::Udp { socket, addr: from };
                let _ = turn.on_stun(&stun_shaped(method, class, &body), from, Transport::Udp, &sink).await;
                let _ = turn.on_stun(&raw, from, Transport::Tcp, &sink).await;
                turn.on_channel_data(from, Transport::Udp, channel, &raw);
            });
        }
    }
}
