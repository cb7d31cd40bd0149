//! Shards: the sockets and clock around [`Core`].
//!
//! A shard is a `mio` poll over its own UDP listening socket (one of the
//! `SO_REUSEPORT` group, so the kernel keeps each client 5-tuple on one
//! shard), the relay sockets of the shard's allocations and its inbox.
//! Every socket is read a batch at a time (`recvmmsg`); what a turn
//! leaves to send goes out together (`sendmmsg` per socket), and only
//! then is each relayed byte billed, with the kernel's word that it
//! went. A relay socket is not a task: thousands of allocations cost one
//! poll and one wake-up per turn, not one per datagram. Which thread
//! runs a shard's turns is [`crate::workers`]' business.
//!
//! Stream (TCP/TLS) connections stay async tasks in [`crate::server`];
//! their readers hand whole frames to a shard's inbox and its answers go
//! to the connection's writer queue. Datagrams for an allocation of
//! another shard are handed over in memory, a batch per turn.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use floe_common::udp_batch::{self, RecvBatch};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::{mpsc, oneshot};

use crate::allocation::{Credit, Transport, Undelivered};
use crate::behavior;
use crate::binding;
use crate::core::{Core, Discard, Event, Input, MAX_DATAGRAM, Now, Shared, Transmit, Via};
use crate::framing::{self, Frame, MAX_FRAME};
use crate::policy::Policy;
use crate::server::{Discovery, Outbound};
use crate::workers::{self, Packing, Pool};

const BELL: Token = Token(0);
const LISTEN: Token = Token(1);
/// Relay socket of allocation `k`: `Token(RELAY + k)`.
const RELAY: usize = 2;
/// Stream chunks and hand-overs queued towards one shard.
const INBOX: usize = 4_096;
/// A relay datagram's slot: the datagram and room for a header.
const RELAY_SLOT: usize = MAX_DATAGRAM + 1;

/// Orders for a shard from the rest of the server.
pub(crate) enum Control {
    Policy(Arc<Policy>),
    Secrets(Arc<floe_proto::credential::TurnSecrets>),
    /// Meter every allocation's traffic; answered when done.
    Collect(oneshot::Sender<()>),
    /// Close every allocation; answered when done.
    CloseAll(oneshot::Sender<()>),
    /// Panics the shard's thread: how tests kill a shard.
    #[cfg(test)]
    Crash,
}

/// Traffic for a shard: stream connections' frames, and datagrams other
/// shards' allocations relay to this one's.
pub(crate) enum Data {
    /// A stream connection opened; answers to it go to `writer`.
    Connected {
        from: SocketAddr,
        transport: Transport,
        writer: mpsc::Sender<Outbound>,
    },
    /// Whole frames a stream connection read (framing already checked).
    Frames {
        from: SocketAddr,
        transport: Transport,
        bytes: Vec<u8>,
    },
    /// A stream connection ended.
    Disconnected {
        from: SocketAddr,
        transport: Transport,
    },
    Handoff(Handoff),
}

/// Datagrams from allocations of one shard to allocations of another.
#[derive(Default)]
pub(crate) struct Handoff {
    bytes: Vec<u8>,
    /// (from relayed address, to relayed address, bytes).
    items: Vec<(SocketAddr, SocketAddr, std::ops::Range<usize>)>,
}

/// Wakes a shard's loop; rings once however many messages wait.
struct Bell {
    waker: Waker,
    rung: AtomicBool,
}

impl Bell {
    fn ring(&self) {
        if !self.rung.swap(true, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }
}

/// How the rest of the server talks to a shard.
pub(crate) struct ShardHandle {
    control: std::sync::mpsc::Sender<Control>,
    data: mpsc::Sender<Data>,
    bell: Arc<Bell>,
}

impl ShardHandle {
    pub fn control(&self, c: Control) {
        if self.control.send(c).is_ok() {
            self.bell.ring();
        }
    }

    /// Queues stream traffic, waiting while the shard's inbox is full;
    /// `false` once the shard is gone.
    pub async fn data(&self, d: Data) -> bool {
        let ok = self.data.send(d).await.is_ok();
        self.bell.ring();
        ok
    }

    fn try_data(&self, d: Data) -> bool {
        let ok = self.data.try_send(d).is_ok();
        self.bell.ring();
        ok
    }
}

/// Per-packet discard counters of the driver, resolved once.
struct Discards {
    send_failed: Discard,
    client_send_failed: Discard,
    client_slow: Discard,
    client_gone: Discard,
    /// Answers (no relayed payload) a stream client's queue refused.
    answer_dropped: prometheus::IntCounter,
}

impl Discards {
    fn undelivered(&self, why: Undelivered) -> &Discard {
        match why {
            Undelivered::SendFailed => &self.client_send_failed,
            Undelivered::Slow => &self.client_slow,
            Undelivered::Gone => &self.client_gone,
        }
    }

    /// Counts relayed payload that did not go.
    fn lost(&self, c: &Credit, why: Undelivered) {
        let d = if c.inbound {
            self.undelivered(why)
        } else {
            &self.send_failed
        };
        d.count(c.bytes);
    }
}

/// Sockets of one shard.
struct Io {
    poll: Poll,
    listen: UdpSocket,
    local: SocketAddr,
    discovery: Option<Arc<Discovery>>,
    /// Relay sockets by allocation key, and whether each is IPv6.
    relays: Vec<Option<(UdpSocket, bool)>>,
    /// Sockets bound for Allocates not yet committed.
    opening: HashMap<u64, UdpSocket>,
    streams: HashMap<(SocketAddr, Transport), mpsc::Sender<Outbound>>,
    /// Whether segmented sends work here (until the kernel says no).
    gso: bool,
}

impl Io {
    /// Carries out the core's socket work (binding may feed it answers,
    /// which may ask for more).
    fn events(&mut self, core: &mut Core, now: Now, peers: &Peers, d: &Discards) {
        while let Some(e) = core.outputs().events.pop_front() {
            match e {
                Event::Bind { open, addr } => {
                    let local = match bind_relay(addr) {
                        Ok((socket, local)) => {
                            self.opening.insert(open, socket);
                            Some(local)
                        }
                        Err(_) => None,
                    };
                    core.handle(now, Input::Bound { open, local });
                }
                Event::Opened { open, relay } => {
                    let Some(mut socket) = self.opening.remove(&open) else {
                        continue;
                    };
                    if let Err(e) = self.poll.registry().register(
                        &mut socket,
                        Token(RELAY + relay),
                        Interest::READABLE,
                    ) {
                        tracing::warn!(error = %e, "cannot watch a relay socket");
                    }
                    if self.relays.len() <= relay {
                        self.relays.resize_with(relay + 1, || None);
                    }
                    let v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
                    self.relays[relay] = Some((socket, v6));
                }
                Event::Abandon { open } => {
                    self.opening.remove(&open);
                }
                Event::Close { relay } => {
                    // What is queued for this socket leaves before its key
                    // can name another allocation's.
                    self.flush(core, peers, d);
                    if let Some((mut socket, _)) = self.relays.get_mut(relay).and_then(Option::take)
                    {
                        let _ = self.poll.registry().deregister(&mut socket);
                    }
                }
            }
        }
    }

    /// Sends what the core left, a batch per socket, and bills or counts
    /// each relayed payload by what the kernel (or the queue) said.
    fn flush(&mut self, core: &mut Core, peers: &Peers, d: &Discards) {
        let out = core.outputs();
        if out.transmits.is_empty() {
            return;
        }
        self.send_to_udp_clients(&out.bytes, &out.transmits, d);
        self.send_to_peers(&out.bytes, &out.transmits, d);
        self.send_to_streams_and_shards(&out.bytes, &mut out.transmits, peers, d);
        out.clear();
    }

    /// Clients over UDP: one socket. A run of equal-size datagrams to one
    /// client goes out as one segmented send (UDP GSO) where the kernel
    /// allows it; the rest as sendmmsg batches.
    fn send_to_udp_clients(&mut self, bytes: &[u8], transmits: &[Transmit], d: &Discards) {
        let mut udp: Vec<usize> = (0..transmits.len())
            .filter(|i| transmits[*i].via == Via::Client(Transport::Udp))
            .collect();
        // Stable: each client's datagrams keep their order.
        udp.sort_by_key(|i| transmits[*i].to);
        let (mut list, mut which) = (Vec::new(), Vec::new());
        let mut k = 0;
        while k < udp.len() {
            let end = k + segment_run(transmits, &udp[k..]);
            let run = &udp[k..end];
            if run.len() > 1 && self.gso && self.send_segmented(bytes, transmits, run) {
                for i in run {
                    if let Some(c) = &transmits[*i].credit {
                        c.bill();
                    }
                }
            } else {
                for i in run {
                    list.push((&bytes[transmits[*i].span.clone()], transmits[*i].to));
                    which.push(*i);
                }
            }
            k = end;
        }
        if !list.is_empty() {
            udp_batch::send_each(&self.listen, &list, |i, ok| {
                if let Some(c) = &transmits[which[i]].credit {
                    settle(c, ok, d);
                }
            });
        }
    }

    /// Sends `run` (same client, equal sizes but the last) as one
    /// segmented send; `false` if it did not go.
    fn send_segmented(&mut self, bytes: &[u8], transmits: &[Transmit], run: &[usize]) -> bool {
        let first = &transmits[run[0]];
        let segments: Vec<&[u8]> = run
            .iter()
            .map(|i| &bytes[transmits[*i].span.clone()])
            .collect();
        match udp_batch::send_segments(&self.listen, &segments, first.span.len() as u16, first.to) {
            Ok(()) => true,
            Err(e) => {
                // No GSO here (old kernel, a device without checksum
                // offload): never again. A full buffer: the caller's
                // batch waits for room.
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::info!(error = %e, "UDP segmentation offload unavailable; sending datagrams one by one");
                    self.gso = false;
                }
                false
            }
        }
    }

    /// Peers: a sendmmsg per stretch of one relay socket.
    fn send_to_peers(&self, bytes: &[u8], transmits: &[Transmit], d: &Discards) {
        let mut i = 0;
        while i < transmits.len() {
            let Via::Relay(key) = transmits[i].via else {
                i += 1;
                continue;
            };
            let end = i + transmits[i..]
                .iter()
                .take_while(|t| t.via == Via::Relay(key))
                .count();
            let group = &transmits[i..end];
            match self.relays.get(key).and_then(Option::as_ref) {
                Some((socket, _)) => {
                    let one;
                    let many: Vec<(&[u8], SocketAddr)>;
                    // A relay socket usually has one datagram a turn: no
                    // allocation for it.
                    let list = if let [t] = group {
                        one = [(&bytes[t.span.clone()], t.to)];
                        &one[..]
                    } else {
                        many = group
                            .iter()
                            .map(|t| (&bytes[t.span.clone()], t.to))
                            .collect();
                        &many[..]
                    };
                    udp_batch::send_each(socket, list, |j, ok| {
                        if let Some(c) = &group[j].credit {
                            settle(c, ok, d);
                        }
                    });
                }
                None => group
                    .iter()
                    .filter_map(|t| t.credit.as_ref())
                    .for_each(|c| d.lost(c, Undelivered::SendFailed)),
            }
            i = end;
        }
    }

    /// Stream clients (their writer queues) and other shards (one
    /// hand-over per shard).
    fn send_to_streams_and_shards(
        &self,
        bytes: &[u8],
        transmits: &mut [Transmit],
        peers: &Peers,
        d: &Discards,
    ) {
        // Per shard: the hand-over, and the credits it settles once queued.
        let mut handoffs: HashMap<usize, (Handoff, Vec<Credit>)> = HashMap::new();
        for t in transmits.iter_mut() {
            match t.via {
                Via::Client(Transport::Udp) | Via::Relay(_) => {}
                Via::Client(transport) => {
                    let credit = t.credit.take();
                    let sent = match self.streams.get(&(t.to, transport)) {
                        Some(tx) => tx
                            .try_send(Outbound {
                                bytes: Bytes::copy_from_slice(&bytes[t.span.clone()]),
                                credit,
                            })
                            .map_err(|e| match e {
                                mpsc::error::TrySendError::Full(o) => (o.credit, Undelivered::Slow),
                                mpsc::error::TrySendError::Closed(o) => {
                                    (o.credit, Undelivered::Gone)
                                }
                            }),
                        None => Err((credit, Undelivered::Gone)),
                    };
                    match sent {
                        Ok(()) => {}
                        Err((Some(c), why)) => d.lost(&c, why),
                        Err((None, _)) => d.answer_dropped.inc(),
                    }
                }
                Via::Shard { shard, from } => {
                    let (h, credits) = handoffs.entry(shard).or_default();
                    let start = h.bytes.len();
                    h.bytes.extend_from_slice(&bytes[t.span.clone()]);
                    h.items.push((from, t.to, start..h.bytes.len()));
                    credits.extend(t.credit.take());
                }
            }
        }
        for (shard, (h, credits)) in handoffs {
            let ok = peers
                .get()
                .and_then(|p| p.get(shard))
                .is_some_and(|p| p.try_data(Data::Handoff(h)));
            for c in &credits {
                settle(c, ok, d);
            }
        }
    }
}

/// Bills a datagram's relayed payload if the kernel (or the queue) took
/// it, else counts it as not sent.
fn settle(c: &Credit, ok: bool, d: &Discards) {
    if ok {
        c.bill();
    } else {
        d.lost(c, Undelivered::SendFailed);
    }
}

/// Largest payload of one segmented send.
const GSO_MAX: usize = 65_000;

/// How many of `order` (indices into `transmits`, grouped by
/// destination) can go as one segmented send: same destination, all the
/// size of the first but the last, which may be shorter.
fn segment_run(transmits: &[Transmit], order: &[usize]) -> usize {
    let first = &transmits[order[0]];
    let size = first.span.len();
    let mut total = size;
    let mut n = 1;
    for i in &order[1..] {
        let t = &transmits[*i];
        let len = t.span.len();
        if t.to != first.to || len > size || total + len > GSO_MAX || n == udp_batch::MAX_SEGMENTS {
            break;
        }
        total += len;
        n += 1;
        if len < size {
            break;
        }
    }
    n
}

/// Binds a relay socket (non-blocking) at `addr`.
fn bind_relay(addr: SocketAddr) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let socket = UdpSocket::bind(addr)?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// Every shard's handle, set once all are spawned.
type Peers = Arc<OnceLock<Vec<ShardHandle>>>;

/// A shard's core with what it acts through: its sockets, the other
/// shards, its metrics.
struct Engine {
    core: Core,
    io: Io,
    peers: Peers,
    shared: Arc<Shared>,
    discards: Discards,
}

impl Engine {
    /// Carries out the core's socket work.
    fn events(&mut self, now: Now) {
        self.io
            .events(&mut self.core, now, &self.peers, &self.discards);
    }

    /// Sends what the core left.
    fn flush(&mut self) {
        self.io.flush(&mut self.core, &self.peers, &self.discards);
    }

    /// Feeds one client datagram or frame, timing requests.
    fn client(&mut self, now: Now, from: SocketAddr, transport: Transport, data: &[u8]) {
        let input = Input::Client {
            from,
            transport,
            data,
        };
        // ChannelData (first two bits 01) is never a request: not timed.
        if data.first().is_some_and(|b| b & 0xC0 == 0x40) {
            self.core.handle(now, input);
            return;
        }
        let started = Instant::now();
        let method = self.core.handle(now, input);
        self.events(now);
        if let Some(method) = method {
            self.shared
                .metrics
                .request_seconds
                .with_label_values(&[method])
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

/// Counts a shard while it runs. Dropped when the shard ends: because
/// the pool stops, or else (a panic, a failed poll) the server lost a
/// part only a restart brings back, and liveness says so.
struct Lifeline {
    shard: usize,
    running: prometheus::IntGauge,
    alive: floe_common::Check,
    /// Set when the pool is asked to stop.
    stopping: Arc<AtomicBool>,
}

impl Lifeline {
    fn new(
        shard: usize,
        running: prometheus::IntGauge,
        alive: floe_common::Check,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        running.inc();
        Self {
            shard,
            running,
            alive,
            stopping,
        }
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        self.running.dec();
        if !self.stopping.load(Ordering::SeqCst) {
            self.alive.set(false);
            tracing::error!(
                shard = self.shard,
                "TURN shard stopped unasked: its share of UDP clients is no longer served; /healthz fails until a restart"
            );
        }
    }
}

/// One shard: its engine, receive buffers and inbox.
pub(crate) struct Shard {
    lifeline: Lifeline,
    e: Engine,
    control: std::sync::mpsc::Receiver<Control>,
    data: mpsc::Receiver<Data>,
    bell: Arc<Bell>,
    recv: RecvBatch,
    relay_recv: [RecvBatch; 2],
    /// Reads that filled a batch (a queue was building up) since the
    /// last [`Shard::take_full_reads`].
    full_reads: u64,
}

/// Starts one shard per UDP socket on a pool of threads; returns their
/// handles and the pool.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    sockets: Vec<std::net::UdpSocket>,
    discovery: Option<Arc<Discovery>>,
    secrets: Option<Arc<floe_proto::credential::TurnSecrets>>,
    policy: Option<Arc<Policy>>,
    alive: &floe_common::Check,
    packing: Packing,
) -> std::io::Result<(Vec<ShardHandle>, Pool)> {
    let peers: Peers = Arc::default();
    let stopping = Arc::new(AtomicBool::new(false));
    let (mut handles, mut shards) = (Vec::new(), Vec::new());
    let m = &shared.metrics;
    for (id, socket) in sockets.into_iter().enumerate() {
        socket.set_nonblocking(true)?;
        let mut listen = UdpSocket::from_std(socket);
        let local = listen.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listen, LISTEN, Interest::READABLE)?;
        let bell = Arc::new(Bell {
            waker: Waker::new(poll.registry(), BELL)?,
            rung: AtomicBool::new(false),
        });
        let (control_tx, control) = std::sync::mpsc::channel();
        let (data_tx, data) = mpsc::channel(INBOX);
        let any = |ip: std::net::IpAddr| SocketAddr::new(ip, 0);
        let shard = Shard {
            lifeline: Lifeline::new(
                id,
                m.shards_running.clone(),
                alive.clone(),
                stopping.clone(),
            ),
            e: Engine {
                core: Core::new(
                    id,
                    shared.clone(),
                    secrets.clone(),
                    policy.clone(),
                    Instant::now(),
                ),
                io: Io {
                    poll,
                    listen,
                    local,
                    discovery: discovery.clone(),
                    relays: Vec::new(),
                    opening: HashMap::new(),
                    streams: HashMap::new(),
                    gso: true,
                },
                peers: peers.clone(),
                shared: shared.clone(),
                discards: Discards {
                    send_failed: Discard::new(m, "send_failed"),
                    client_send_failed: Discard::new(m, Undelivered::SendFailed.reason()),
                    client_slow: Discard::new(m, Undelivered::Slow.reason()),
                    client_gone: Discard::new(m, Undelivered::Gone.reason()),
                    answer_dropped: m.discarded.with_label_values(&["answer_dropped"]),
                },
            },
            control,
            data,
            bell: bell.clone(),
            recv: RecvBatch::new(local, MAX_FRAME),
            relay_recv: [
                any(std::net::Ipv4Addr::UNSPECIFIED.into()),
                any(std::net::Ipv6Addr::UNSPECIFIED.into()),
            ]
            .map(|a| RecvBatch::new(a, RELAY_SLOT)),
            full_reads: 0,
        };
        shards.push(shard);
        handles.push(ShardHandle {
            control: control_tx,
            data: data_tx,
            bell,
        });
    }
    let _ = peers.set(
        handles
            .iter()
            .map(|h| ShardHandle {
                control: h.control.clone(),
                data: h.data.clone(),
                bell: h.bell.clone(),
            })
            .collect(),
    );
    let pool = workers::start(shards, &shared.metrics, stopping, packing)?;
    Ok((handles, pool))
}

impl Shard {
    pub fn id(&self) -> usize {
        self.lifeline.shard
    }

    /// Reads that filled a whole batch since the last call: a sign that
    /// the thread running the shard falls behind.
    pub fn take_full_reads(&mut self) -> u64 {
        std::mem::take(&mut self.full_reads)
    }

    /// When the shard wants a turn even if nothing arrives.
    pub fn timeout(&self) -> Instant {
        self.e.core.timeout()
    }

    /// The shard's poll, which is readable while something of the
    /// shard's is ready: how a thread running several shards waits.
    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.e.io.poll)
    }

    /// Serves everything ready now and what is due, without waiting;
    /// `false` if the shard cannot poll its sockets any more.
    pub fn turn(&mut self, events: &mut Events) -> bool {
        let now = Now::real();
        loop {
            if let Err(e) = self.e.io.poll.poll(events, Some(Duration::ZERO)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "TURN shard cannot poll its sockets; stopping");
                return false;
            }
            let mut ready = 0;
            for e in events.iter() {
                ready += 1;
                match e.token() {
                    BELL => {
                        self.bell.rung.store(false, Ordering::SeqCst);
                        self.inbox(now);
                    }
                    LISTEN => self.read_listen(now),
                    Token(t) => self.read_relay(t - RELAY, now),
                }
            }
            // A full buffer may have left events behind.
            if ready < events.capacity() {
                break;
            }
        }
        if now.at >= self.e.core.timeout() {
            self.e.core.handle(now, Input::Timer);
            self.e.events(now);
        }
        self.e.flush();
        true
    }

    /// Reads the listening socket until it is empty, sending after each
    /// full batch.
    fn read_listen(&mut self, now: Now) {
        loop {
            let n = match self.recv.try_recv(&self.e.io.listen) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; keep serving.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            for i in 0..n {
                let (buf, len, from) = self.recv.get_mut(i);
                let Some(from) = from else { continue };
                let data = &buf[..len];
                if let Some(d) = &self.e.io.discovery
                    && binding::is_binding_request(data)
                {
                    if let Some(reply) = behavior::answer(&d.addrs, data, self.e.io.local, from) {
                        self.e.core.count_binding_answer(Transport::Udp);
                        d.send(&reply);
                    }
                    continue;
                }
                self.e.client(now, from, Transport::Udp, data);
            }
            self.e.flush();
            // The kernel signals every datagram that arrives after this
            // read, so a short batch means the queue was empty.
            if n < udp_batch::BATCH {
                return;
            }
            self.full_reads += 1;
        }
    }

    /// Reads allocation `key`'s relay socket until it is empty.
    fn read_relay(&mut self, key: usize, now: Now) {
        loop {
            let Some((socket, v6)) = self.e.io.relays.get(key).and_then(Option::as_ref) else {
                return;
            };
            let batch = &mut self.relay_recv[usize::from(*v6)];
            let n = match batch.try_recv(socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // ICMP reports of earlier sends; keep relaying.
                Err(_) => continue,
            };
            for i in 0..n {
                if let (buf, len, Some(from)) = batch.get_mut(i) {
                    self.e.core.handle(
                        now,
                        Input::Peer {
                            relay: key,
                            from,
                            data: &buf[..len],
                        },
                    );
                }
            }
            if n < udp_batch::BATCH {
                return;
            }
            self.full_reads += 1;
            self.e.flush();
        }
    }

    /// Takes every queued order and stream chunk.
    fn inbox(&mut self, now: Now) {
        while let Ok(c) = self.control.try_recv() {
            let done = match c {
                Control::Policy(p) => {
                    self.e.core.handle(now, Input::Policy(p));
                    None
                }
                Control::Secrets(s) => {
                    self.e.core.handle(now, Input::Secrets(s));
                    None
                }
                Control::Collect(done) => {
                    self.e.core.handle(now, Input::Collect);
                    Some(done)
                }
                Control::CloseAll(done) => {
                    self.e.core.handle(now, Input::CloseAll);
                    Some(done)
                }
                #[cfg(test)]
                Control::Crash => panic!("shard {} crashed on purpose", self.lifeline.shard),
            };
            self.e.events(now);
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
        // Bounded, so one busy connection cannot keep UDP waiting.
        for _ in 0..INBOX {
            let Ok(d) = self.data.try_recv() else { break };
            match d {
                Data::Connected {
                    from,
                    transport,
                    writer,
                } => {
                    self.e.io.streams.insert((from, transport), writer);
                }
                Data::Frames {
                    from,
                    transport,
                    bytes,
                } => {
                    let mut at = 0;
                    while let Ok(Some(f)) = framing::next_frame(&bytes[at..], true) {
                        let len = match f {
                            Frame::Stun { len } | Frame::ChannelData { len, .. } => len,
                        };
                        self.e.client(now, from, transport, &bytes[at..at + len]);
                        at += len;
                    }
                }
                Data::Disconnected { from, transport } => {
                    self.e.io.streams.remove(&(from, transport));
                    self.e
                        .core
                        .handle(now, Input::Disconnected { from, transport });
                    self.e.events(now);
                }
                Data::Handoff(h) => {
                    for (from, to, span) in &h.items {
                        self.e.core.handle(
                            now,
                            Input::Hairpin {
                                from: *from,
                                to: *to,
                                data: &h.bytes[span.clone()],
                            },
                        );
                    }
                }
            }
        }
        if !self.data.is_empty() {
            // More next turn.
            self.bell.ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(to: &str, len: usize) -> Transmit {
        Transmit {
            via: Via::Client(Transport::Udp),
            to: to.parse().expect("addr"),
            span: 0..len,
            credit: None,
        }
    }

    /// Runs for a segmented send: one destination, equal sizes, a shorter
    /// last one allowed, at most MAX_SEGMENTS.
    #[test]
    fn segment_runs() {
        let a = "192.0.2.1:1";
        let t = vec![
            transmit(a, 100),
            transmit(a, 100),
            transmit(a, 40),
            transmit(a, 100),
            transmit("192.0.2.2:1", 100),
        ];
        assert_eq!(
            segment_run(&t, &[0, 1, 2, 3, 4]),
            3,
            "ends after the short one"
        );
        assert_eq!(segment_run(&t, &[3, 4]), 1, "another destination");
        assert_eq!(segment_run(&t, &[2, 3]), 1, "larger than the first");
        let many: Vec<Transmit> = (0..100).map(|_| transmit(a, 10)).collect();
        let order: Vec<usize> = (0..100).collect();
        assert_eq!(segment_run(&many, &order), udp_batch::MAX_SEGMENTS);
    }
}
