//! The threads that run the shards, and which shard runs on which.
//!
//! A shard is a poll of its own ([`crate::driver`]); a worker thread
//! waits on the polls of the shards it hosts and gives each a turn when
//! it is ready or due. A thread per shard suits a node near capacity,
//! but at media-like rates each of those threads wakes for one or two
//! datagrams and the wake-ups cost more than the work, while one thread
//! serving every shard batches what they would each have woken for. So
//! the pool starts with every shard on one thread, and a balancer
//! ([`Packer`], fed each period with how busy each shard kept its
//! thread and how often its reads found a queue) spreads them when a
//! thread gets busy or falls behind, and packs them again when the load
//! falls. A shard moves whole (core, sockets, inbox)
//! between two of its turns, so no datagram is lost or reordered.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::MAX_UDP_SOCKETS;
use crate::driver::Shard;
use crate::metrics::Metrics;

const ORDERS: Token = Token(0);
/// Shard `s`'s poll: `Token(SHARD + s)`.
const SHARD: usize = 1;
/// Events one shard's turn takes from its poll at a time.
const SHARD_EVENTS: usize = 1_024;

/// How the balancer packs shards onto threads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Packing {
    /// How often the balancer looks at the load.
    pub period: Duration,
    /// A thread with several shards that is busier than this (a fraction
    /// of its time)...
    pub split: f64,
    /// ...or whose reads filled a whole batch this many times in a
    /// period (bursts queue up in the kernel) gives about half its load
    /// to an idle thread.
    pub backlog: u64,
    /// A thread with several shards splits at once, without waiting for
    /// the period's end, when one turn reads this many full batches.
    pub behind: u64,
    /// The two least busy threads become one when together they are
    /// busy less than this, with no full read...
    pub merge: f64,
    /// ...for this many periods in a row.
    pub merge_after: u32,
}

impl Default for Packing {
    /// Splits at half a thread or a few full reads, packs again below a
    /// quarter for 2 s: a thread that packs is at most half busy after
    /// it, so load has to double before it splits again.
    fn default() -> Self {
        Self {
            period: Duration::from_millis(500),
            split: 0.5,
            backlog: 50,
            behind: 4,
            merge: 0.25,
            merge_after: 4,
        }
    }
}

/// What a shard did in one period.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Load {
    /// Fraction of the period its turns took.
    pub busy: f64,
    /// Reads that filled a whole batch.
    pub full_reads: u64,
}

/// One shard's move from thread `from` to thread `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Move {
    pub shard: usize,
    pub from: usize,
    pub to: usize,
}

/// Where each shard runs, decided from measured load: a plain state
/// machine, fed each period with each shard's [`Load`]. There are as
/// many threads as shards.
pub(crate) struct Packer {
    packing: Packing,
    /// The thread of each shard.
    on: Vec<usize>,
    /// Periods in a row the two least busy threads could have been one.
    calm: u32,
    /// Each shard's business in the last period.
    last: Vec<f64>,
}

impl Packer {
    /// Every shard starts on thread 0.
    pub fn new(shards: usize, packing: Packing) -> Self {
        Self {
            packing,
            on: vec![0; shards],
            calm: 0,
            last: vec![0.0; shards],
        }
    }

    /// Threads running at least one shard.
    pub fn threads(&self) -> usize {
        let mut used = vec![false; self.on.len()];
        for w in &self.on {
            used[*w] = true;
        }
        used.iter().filter(|u| **u).count()
    }

    /// The moves this period's load (`loads[s]` for shard `s`) calls for.
    pub fn step(&mut self, loads: &[Load]) -> Vec<Move> {
        let n = self.on.len();
        let busy: Vec<f64> = (0..n)
            .map(|s| loads.get(s).map_or(0.0, |l| l.busy))
            .collect();
        self.last.clone_from(&busy);
        let (mut load, mut full, mut count) = (vec![0.0; n], vec![0u64; n], vec![0usize; n]);
        for (s, w) in self.on.iter().enumerate() {
            load[*w] += busy[s];
            full[*w] += loads.get(s).map_or(0, |l| l.full_reads);
            count[*w] += 1;
        }
        let crowded = (0..n)
            .filter(|w| {
                count[*w] > 1 && (load[*w] > self.packing.split || full[*w] >= self.packing.backlog)
            })
            .max_by(|a, b| load[*a].total_cmp(&load[*b]));
        if let Some(from) = crowded {
            self.calm = 0;
            // A thread with two shards or more leaves one without any.
            let Some(to) = (0..n).find(|w| count[*w] == 0) else {
                return Vec::new();
            };
            return self.split(from, to, &busy);
        }
        let mut active: Vec<usize> = (0..n).filter(|w| count[*w] > 0).collect();
        active.sort_by(|a, b| load[*a].total_cmp(&load[*b]));
        let [from, to, ..] = active[..] else {
            return Vec::new();
        };
        if load[from] + load[to] >= self.packing.merge || full[from] + full[to] > 0 {
            self.calm = 0;
            return Vec::new();
        }
        self.calm += 1;
        if self.calm < self.packing.merge_after {
            return Vec::new();
        }
        self.calm = 0;
        self.move_all(|_, w| w == from, to)
    }

    /// Thread `w` fell behind within a turn: the moves that split it now,
    /// if it runs more than one shard.
    pub fn behind(&mut self, w: usize) -> Vec<Move> {
        let n = self.on.len();
        if self.on.iter().filter(|x| **x == w).count() < 2 {
            return Vec::new();
        }
        let Some(to) = (0..n).find(|t| !self.on.contains(t)) else {
            return Vec::new();
        };
        self.calm = 0;
        let busy = self.last.clone();
        self.split(w, to, &busy)
    }

    /// Sends about half of thread `from`'s load to idle thread `to`: the
    /// busiest shard stays, each next one goes to the lighter side.
    fn split(&mut self, from: usize, to: usize, busy: &[f64]) -> Vec<Move> {
        let load = |s: usize| busy[s];
        let mut mine: Vec<usize> = (0..self.on.len()).filter(|s| self.on[*s] == from).collect();
        mine.sort_by(|a, b| load(*b).total_cmp(&load(*a)));
        let (mut stay, mut go) = (0.0, 0.0);
        let mut leaving = vec![false; self.on.len()];
        for (i, s) in mine.into_iter().enumerate() {
            // Never all: the first stays; never none: the second goes.
            if i == 1 || (i > 1 && go < stay) {
                go += load(s);
                leaving[s] = true;
            } else {
                stay += load(s);
            }
        }
        self.move_all(|s, _| leaving[s], to)
    }

    /// Moves every shard `which` picks to thread `to`.
    fn move_all(&mut self, which: impl Fn(usize, usize) -> bool, to: usize) -> Vec<Move> {
        let mut moves = Vec::new();
        for (s, w) in self.on.iter_mut().enumerate() {
            if *w != to && which(s, *w) {
                moves.push(Move {
                    shard: s,
                    from: *w,
                    to,
                });
                *w = to;
            }
        }
        moves
    }
}

/// What a shard's turns did so far, counted by its threads.
#[derive(Default)]
struct Usage {
    busy_ns: AtomicU64,
    full_reads: AtomicU64,
}

/// What the balancer hears between its periods.
enum Nudge {
    /// Thread `w` found several batches queued on a shard in one turn.
    Behind(usize),
    Stop,
}

/// What a worker thread is told.
enum Order {
    /// Run this shard from now on.
    Host(Box<Shard>),
    /// Hand shard `shard` to thread `to`.
    Release {
        shard: usize,
        to: usize,
    },
    Stop,
}

/// How to reach a worker thread.
struct WorkerHandle {
    orders: mpsc::Sender<Order>,
    waker: Waker,
}

impl WorkerHandle {
    /// `false` if the thread is gone (the order, a shard too, is dropped).
    fn send(&self, order: Order) -> bool {
        let ok = self.orders.send(order).is_ok();
        if ok {
            let _ = self.waker.wake();
        }
        ok
    }
}

/// The shards' threads and their balancer.
pub(crate) struct Pool {
    workers: Arc<[WorkerHandle]>,
    threads: Vec<JoinHandle<()>>,
    balancer: Option<(mpsc::Sender<Nudge>, JoinHandle<()>)>,
    /// Tells the shards' lifelines that they end because they were asked.
    stopping: Arc<AtomicBool>,
}

impl Pool {
    /// Stops the balancer and the threads (dropping the shards they run)
    /// and waits for them.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some((nudge, thread)) = self.balancer.take() {
            let _ = nudge.send(Nudge::Stop);
            let _ = thread.join();
        }
        for w in self.workers.iter() {
            w.send(Order::Stop);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts one thread per shard, every shard on the first, and (with
/// more than one shard) the balancer that spreads them.
pub(crate) fn start(
    shards: Vec<Shard>,
    metrics: &Arc<Metrics>,
    stopping: Arc<AtomicBool>,
    packing: Packing,
) -> std::io::Result<Pool> {
    let n = shards.len();
    let usage: Arc<[Usage]> = (0..n).map(|_| Usage::default()).collect();
    let (mut handles, mut parts) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), ORDERS)?;
        let (tx, rx) = mpsc::channel();
        handles.push(WorkerHandle { orders: tx, waker });
        parts.push((poll, rx));
    }
    let workers: Arc<[WorkerHandle]> = handles.into();
    for shard in shards {
        workers[0].send(Order::Host(Box::new(shard)));
    }
    metrics.shard_threads.set(i64::from(n > 0));
    let (nudge, nudges) = mpsc::channel();
    let mut threads = Vec::new();
    for (id, (poll, orders)) in parts.into_iter().enumerate() {
        let worker = Worker {
            id,
            nudge: (n > 1).then(|| nudge.clone()),
            behind: packing.behind,
            nudged: None,
            poll,
            orders,
            workers: workers.clone(),
            hosted: Vec::new(),
            early: Vec::new(),
            usage: usage.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("turn-worker-{id}"))
                .spawn(move || worker.run())?,
        );
    }
    let balancer = if n > 1 {
        let (workers, metrics) = (workers.clone(), metrics.clone());
        let packer = Packer::new(n, packing);
        let thread = std::thread::Builder::new()
            .name("turn-balancer".into())
            .spawn(move || balance(packer, &usage, &workers, &nudges, &metrics))?;
        Some((nudge, thread))
    } else {
        None
    };
    Ok(Pool {
        workers,
        threads,
        balancer,
        stopping,
    })
}

/// Every period: each shard's load, and the moves the packer makes of
/// it; between periods, the splits of threads that fell behind; until
/// the pool stops.
fn balance(
    mut packer: Packer,
    usage: &[Usage],
    workers: &[WorkerHandle],
    nudges: &mpsc::Receiver<Nudge>,
    metrics: &Metrics,
) {
    let carry_out = |packer: &Packer, moves: Vec<Move>, why: &str| {
        for m in moves {
            tracing::debug!(
                shard = m.shard,
                from = m.from,
                to = m.to,
                why,
                "moving a TURN shard"
            );
            metrics.shard_moves.inc();
            workers[m.from].send(Order::Release {
                shard: m.shard,
                to: m.to,
            });
        }
        metrics
            .shard_threads
            .set(i64::try_from(packer.threads()).unwrap_or(i64::MAX));
    };
    let mut seen = vec![(0u64, 0u64); usage.len()];
    let mut at = Instant::now();
    loop {
        let next = at + packer.packing.period;
        match nudges.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Nudge::Behind(w)) => {
                let moves = packer.behind(w);
                carry_out(&packer, moves, "behind");
                continue;
            }
            Ok(Nudge::Stop) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let span = now.duration_since(at).as_nanos().max(1) as f64;
        at = now;
        let load: Vec<Load> = usage
            .iter()
            .zip(&mut seen)
            .map(|(u, (busy, full))| {
                let (was_busy, was_full) = (*busy, *full);
                *busy = u.busy_ns.load(Ordering::Relaxed);
                *full = u.full_reads.load(Ordering::Relaxed);
                Load {
                    busy: busy.saturating_sub(was_busy) as f64 / span,
                    full_reads: full.saturating_sub(was_full),
                }
            })
            .collect();
        tracing::trace!(?load, "TURN shard load");
        let moves = packer.step(&load);
        carry_out(&packer, moves, "load");
    }
}

/// A thread running the shards it hosts.
struct Worker {
    id: usize,
    /// The balancer, when there is one.
    nudge: Option<mpsc::Sender<Nudge>>,
    /// Full reads in one turn that make this thread ask for a split.
    behind: u64,
    /// When it last asked.
    nudged: Option<Instant>,
    poll: Poll,
    orders: mpsc::Receiver<Order>,
    workers: Arc<[WorkerHandle]>,
    hosted: Vec<Shard>,
    /// Releases that came before their shard did: (shard, to).
    early: Vec<(usize, usize)>,
    /// What each shard's turns did, for the balancer.
    usage: Arc<[Usage]>,
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(MAX_UDP_SOCKETS + 1);
        let mut shard_events = Events::with_capacity(SHARD_EVENTS);
        let mut ready = Vec::new();
        loop {
            let wait = self
                .hosted
                .iter()
                .map(|s| s.timeout())
                .min()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, wait) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // The hosted shards end with this thread, and say so.
                tracing::error!(error = %e, "TURN worker cannot wait for its shards; stopping");
                return;
            }
            ready.clear();
            let mut orders = false;
            for e in events.iter() {
                match e.token() {
                    ORDERS => orders = true,
                    Token(t) => ready.push(t - SHARD),
                }
            }
            if orders && !self.take_orders() {
                return;
            }
            let now = Instant::now();
            let mut i = 0;
            while i < self.hosted.len() {
                let shard = &mut self.hosted[i];
                if !ready.contains(&shard.id()) && now < shard.timeout() {
                    i += 1;
                    continue;
                }
                let started = Instant::now();
                let running = shard.turn(&mut shard_events);
                let spent = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let full_reads = shard.take_full_reads();
                let usage = &self.usage[shard.id()];
                usage.busy_ns.fetch_add(spent, Ordering::Relaxed);
                usage.full_reads.fetch_add(full_reads, Ordering::Relaxed);
                if full_reads >= self.behind && self.hosted.len() > 1 {
                    self.fell_behind();
                }
                if running {
                    i += 1;
                } else {
                    let shard = self.hosted.swap_remove(i);
                    self.unwatch(shard.fd());
                }
            }
        }
    }

    /// Asks the balancer for a split, at most every 50 ms (a move takes
    /// it a moment to carry out).
    fn fell_behind(&mut self) {
        let now = Instant::now();
        if self
            .nudged
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(50))
        {
            return;
        }
        self.nudged = Some(now);
        if let Some(nudge) = &self.nudge {
            let _ = nudge.send(Nudge::Behind(self.id));
        }
    }

    /// Carries out the queued orders; `false` on Stop.
    fn take_orders(&mut self) -> bool {
        while let Ok(order) = self.orders.try_recv() {
            match order {
                Order::Host(shard) => self.host(shard),
                Order::Release { shard, to } => self.release(shard, to),
                Order::Stop => return false,
            }
        }
        true
    }

    fn host(&mut self, shard: Box<Shard>) {
        let id = shard.id();
        // Registering reports the shard's poll ready at once if something
        // arrived while it moved.
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&shard.fd()),
            Token(SHARD + id),
            Interest::READABLE,
        ) {
            // Dropped: its lifeline fails liveness.
            tracing::error!(shard = id, error = %e, "TURN worker cannot watch a shard");
            return;
        }
        self.hosted.push(*shard);
        if let Some(k) = self.early.iter().position(|(s, _)| *s == id) {
            let (_, to) = self.early.swap_remove(k);
            self.release(id, to);
        }
    }

    fn release(&mut self, id: usize, to: usize) {
        let Some(k) = self.hosted.iter().position(|s| s.id() == id) else {
            // Its Host order from the thread that had it is still coming.
            self.early.push((id, to));
            return;
        };
        let shard = self.hosted.swap_remove(k);
        self.unwatch(shard.fd());
        // A thread that is gone drops the shard, whose lifeline tells.
        if let Some(w) = self.workers.get(to) {
            w.send(Order::Host(Box::new(shard)));
        }
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packer(shards: usize) -> Packer {
        Packer::new(shards, Packing::default())
    }

    /// Loads of the given business, no full read.
    fn busy(busy: &[f64]) -> Vec<Load> {
        busy.iter()
            .map(|b| Load {
                busy: *b,
                full_reads: 0,
            })
            .collect()
    }

    #[test]
    fn starts_packed_and_stays_so_while_light() {
        let mut p = packer(4);
        assert_eq!(p.threads(), 1);
        for _ in 0..10 {
            assert!(p.step(&busy(&[0.1, 0.1, 0.1, 0.1])).is_empty());
        }
        assert_eq!(p.threads(), 1);
    }

    #[test]
    fn a_busy_thread_splits_its_load_in_halves() {
        let mut p = packer(4);
        let moves = p.step(&busy(&[0.3, 0.1, 0.2, 0.2]));
        // Shard 0 (0.3) stays; 2 (0.2) goes; 3 goes to the lighter side
        // (stay 0.3 > go 0.2), then 1 stays (stay 0.3 < go 0.4).
        let to = moves[0].to;
        assert_ne!(to, 0);
        assert_eq!(
            moves,
            vec![
                Move {
                    shard: 2,
                    from: 0,
                    to
                },
                Move {
                    shard: 3,
                    from: 0,
                    to
                }
            ]
        );
        assert_eq!(p.threads(), 2);
        // Each half busier than a split would fix: nothing more to do
        // until one thread alone passes the mark.
        assert!(p.step(&busy(&[0.3, 0.1, 0.2, 0.2])).is_empty());
        let moves = p.step(&busy(&[0.5, 0.1, 0.2, 0.2]));
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(p.threads(), 3);
    }

    #[test]
    fn a_lone_busy_shard_does_not_move() {
        let mut p = packer(2);
        assert_eq!(p.step(&busy(&[0.9, 0.0])).len(), 1, "0 stays, 1 goes");
        assert!(
            p.step(&busy(&[0.95, 0.0])).is_empty(),
            "one shard per thread"
        );
    }

    #[test]
    fn a_thread_falling_behind_splits_however_idle() {
        let mut p = packer(3);
        let mut loads = busy(&[0.05, 0.05, 0.05]);
        loads[2].full_reads = Packing::default().backlog - 1;
        assert!(p.step(&loads).is_empty(), "a few full reads are noise");
        loads[2].full_reads = Packing::default().backlog;
        assert_eq!(p.step(&loads).len(), 1);
        assert_eq!(p.threads(), 2);
        // The shard falling behind ends up alone, and idle shards are
        // never packed with it.
        for _ in 0..20 {
            p.step(&loads);
        }
        let alone = p.on.iter().filter(|w| **w == p.on[2]).count();
        assert_eq!(alone, 1, "{:?}", p.on);
    }

    #[test]
    fn a_thread_behind_in_one_turn_splits_at_once() {
        let mut p = packer(3);
        p.step(&busy(&[0.1, 0.3, 0.1]));
        let moves = p.behind(0);
        // Shard 1, the busiest last period, stays; 0 goes, 2 joins it.
        assert_eq!(
            moves.iter().map(|m| m.shard).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(p.threads(), 2);
        assert!(p.behind(moves[0].to).len() == 1, "two shards: one leaves");
        assert!(p.behind(1).is_empty(), "a lone shard stays");
        assert_eq!(p.threads(), 3);
    }

    #[test]
    fn calm_threads_pack_again_after_a_while_only() {
        let mut p = packer(2);
        p.step(&busy(&[0.4, 0.4]));
        assert_eq!(p.threads(), 2);
        let calm = busy(&[0.1, 0.1]);
        for _ in 1..Packing::default().merge_after {
            assert!(p.step(&calm).is_empty());
        }
        assert!(
            p.step(&busy(&[0.2, 0.1])).is_empty(),
            "a busier period restarts the count"
        );
        for _ in 1..Packing::default().merge_after {
            assert!(p.step(&calm).is_empty());
        }
        let moves = p.step(&calm);
        assert_eq!(moves.len(), 1);
        assert_eq!(p.threads(), 1);
        // Packed at 0.2 together: far from the split mark, no flapping.
        assert!(p.step(&calm).is_empty());
    }

    #[test]
    fn moves_name_where_a_shard_is() {
        // Whatever the load, each move starts where the packer last put
        // the shard and ends elsewhere.
        let mut p = packer(6);
        let mut on = vec![0; 6];
        let mut x = 7u64;
        for round in 0..2_000 {
            let loads: Vec<Load> = (0..6)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let scale = if round % 50 < 25 { 0.02 } else { 0.4 };
                    Load {
                        busy: (x >> 40) as f64 / f64::from(1u32 << 24) * scale,
                        full_reads: x % 3,
                    }
                })
                .collect();
            for m in p.step(&loads) {
                assert_eq!(on[m.shard], m.from, "round {round}: {m:?}");
                assert_ne!(m.from, m.to);
                on[m.shard] = m.to;
            }
            assert_eq!(on, p.on);
        }
    }
}
