//! `floe loadtest chaos`: starts a multi-node deployment on loopback as
//! separate `floe` processes ([`cluster`]), keeps a transfer load and a
//! set of presence probes running, injects one fault per phase, and
//! checks after each that
//!
//! - **the ledger** holds exactly what the peers relayed (graceful
//!   faults), or, after a `kill -9` of TURN, never more than they sent and
//!   short by at most one usage interval of the killed server's traffic;
//! - **no ghosts**: 10 s after the fault every probe room lists exactly
//!   the probes connected to it, and once the load has left no room of
//!   its tenant lists anyone;
//! - **recovery**: from the fault's start, how long until every probe is
//!   back in its room and until every probe pair signals again, once the
//!   fault disturbed them (zero when it never did);
//! - **no unbounded growth**: the RSS of every process the fault left
//!   running, before and after.
//!
//! Every phase has a tenant of its own, so its ledger is its own.

mod cluster;
mod lb;
mod probes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::transfer::{TransferArgs, TurnTransport};
use cluster::{Cluster, Timing};
pub use lb::UsageFaults;
use probes::Probes;

/// Flags of `floe loadtest chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// `short`: every fault on a small load, a few minutes (the test
    /// suite runs it); `long`: the benchmark behind docs/reliability.md.
    #[arg(long, value_enum, default_value_t = Profile::Short)]
    pub profile: Profile,
    /// Run only this fault (repeatable); all of them by default.
    #[arg(long = "fault", value_enum)]
    pub faults: Vec<Fault>,
    /// The floe binary whose processes are started (default: this one).
    #[arg(long)]
    pub floe: Option<PathBuf>,
    /// The redis-server to start.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Where the processes keep data and logs (default: a temporary
    /// folder, removed after a run that passed).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// How much load and how long the faults last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Short,
    Long,
}

/// One fault, injected in a phase of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// `kill -9` of a signal node, restarted under the same node id.
    SignalKill,
    /// SIGTERM of a signal node (its drain), then a restart.
    SignalTerm,
    /// A signal node cut off from Redis while its clients stay connected,
    /// for longer than it takes to be declared dead.
    SignalCut,
    /// `kill -9` of a TURN server, restarted with the same data dir.
    TurnKill,
    /// SIGTERM of a TURN server (drain, final usage flush), then a restart.
    TurnTerm,
    /// `kill -9` of a control-plane replica, then a restart.
    ControlKill,
    /// SIGTERM of a control-plane replica, then a restart.
    ControlTerm,
    /// Both control-plane replicas down at once.
    ControlOutage,
    /// Redis stopped (SIGTERM) and started again.
    RedisRestart,
    /// Redis frozen (SIGSTOP), then continued.
    RedisStall,
    /// Usage batches duplicated, replayed out of order and held past
    /// TURN's timeout on their way to the control plane.
    UsageFaults,
}

const ALL_FAULTS: [Fault; 11] = [
    Fault::SignalKill,
    Fault::SignalTerm,
    Fault::SignalCut,
    Fault::TurnKill,
    Fault::TurnTerm,
    Fault::ControlKill,
    Fault::ControlTerm,
    Fault::ControlOutage,
    Fault::RedisRestart,
    Fault::RedisStall,
    Fault::UsageFaults,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::SignalKill => "signal kill -9",
            Self::SignalTerm => "signal SIGTERM",
            Self::SignalCut => "signal cut off Redis",
            Self::TurnKill => "TURN kill -9",
            Self::TurnTerm => "TURN SIGTERM",
            Self::ControlKill => "control kill -9",
            Self::ControlTerm => "control SIGTERM",
            Self::ControlOutage => "control plane down",
            Self::RedisRestart => "Redis restart",
            Self::RedisStall => "Redis stalled",
            Self::UsageFaults => "usage dup/replay/hold",
        }
    }
}

/// The knobs a profile sets.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    pairs: usize,
    bytes: usize,
    rate_kbps: u64,
    load_secs: u64,
    churn: f64,
    probe_rooms: usize,
    warmup: Duration,
    /// Both control-plane replicas down.
    outage: Duration,
    /// Redis frozen.
    stall: Duration,
    /// A signal node cut off from Redis.
    cut: Duration,
    timing: Timing,
}

impl Profile {
    fn knobs(self) -> Knobs {
        let timing = Timing {
            usage_interval_secs: 1,
            node_beat_ms: 250,
            node_dead_after_ms: 2_000,
        };
        match self {
            Self::Short => Knobs {
                pairs: 4,
                bytes: 32_768,
                rate_kbps: 256,
                load_secs: 10,
                churn: 0.25,
                probe_rooms: 2,
                warmup: Duration::from_secs(3),
                outage: Duration::from_secs(6),
                stall: Duration::from_secs(4),
                cut: Duration::from_secs(4),
                timing,
            },
            Self::Long => Knobs {
                pairs: 30,
                bytes: 262_144,
                rate_kbps: 512,
                load_secs: 60,
                churn: 0.2,
                probe_rooms: 10,
                warmup: Duration::from_secs(15),
                outage: Duration::from_secs(30),
                stall: Duration::from_secs(10),
                cut: Duration::from_secs(10),
                timing,
            },
        }
    }
}

/// Resident memory of one process around a phase.
#[derive(Debug, Clone, Serialize)]
pub struct Rss {
    pub process: String,
    pub before_bytes: u64,
    pub after_bytes: u64,
}

/// What one phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub fault: Fault,
    /// The whole phase: load, fault, checks.
    pub seconds: f64,
    /// When the load finished (its ledger settled), from the phase start.
    pub load_seconds: f64,
    /// How long injecting the fault took (including its restart).
    pub fault_seconds: f64,
    pub pairs: usize,
    pub transfers_failed: u64,
    /// Bytes the peers handed to TURN, and received from it.
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// What the TURN processes metered in the phase (their metrics, and
    /// the totals a stopped one logged), each way.
    pub relayed_out_bytes: u64,
    pub relayed_in_bytes: u64,
    /// What the ledger billed the phase's tenant, each way.
    pub billed_out_bytes: u64,
    pub billed_in_bytes: u64,
    /// Metered bytes the ledger lacks (after `kill -9` of TURN: what the
    /// killed server metered before its last usage batch was durable).
    pub unbilled_bytes: u64,
    /// The most the killed TURN server relayed in one usage interval
    /// before it died: the bound on `unbilled_bytes`.
    pub unbilled_bound_bytes: Option<u64>,
    /// From the fault's start until every probe was back in its room,
    /// and until every probe pair signalled both ways, after the fault
    /// first disturbed them (0: it never did).
    pub back_in_rooms_ms: Option<u64>,
    pub signalling_again_ms: Option<u64>,
    /// Probe rooms whose listing differed from who was connected, 10 s
    /// after the fault.
    pub ghosts: Vec<String>,
    /// Rooms of the load still listing peers after it left.
    pub rooms_not_empty: usize,
    pub rss: Vec<Rss>,
    pub usage_faults: Option<UsageFaults>,
    /// Every broken invariant, in words; empty when the phase passed.
    pub failures: Vec<String>,
}

/// What a chaos run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub profile: Profile,
    pub phases: Vec<PhaseReport>,
    pub passed: bool,
    pub seconds: f64,
    /// Where the processes' logs are (kept when the run failed).
    pub work_dir: Option<String>,
}

/// Runs the configured phases; `Err` only when the deployment could not
/// be started.
pub async fn run(args: ChaosArgs) -> Result<ChaosReport, String> {
    let started = Instant::now();
    let knobs = args.profile.knobs();
    let floe = match &args.floe {
        Some(f) => f.clone(),
        None => std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
    };
    let (dir, temp) = match &args.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("floe-chaos-")
                .tempdir()
                .map_err(|e| e.to_string())?;
            (t.path().to_owned(), Some(t))
        }
    };
    eprintln!("chaos: starting the deployment in {}", dir.display());
    let setup = async {
        let cluster = Cluster::start(&floe, &args.redis_server, &dir, knobs.timing).await?;
        let probe_key = cluster.tenant("chaos-probes").await?;
        let probes = Probes::start(&cluster.signal_urls, probe_key, knobs.probe_rooms).await?;
        if probes
            .all_connected(Duration::from_secs(30))
            .await
            .is_none()
        {
            return Err("the probes never all joined their rooms".to_owned());
        }
        Ok((cluster, probes))
    };
    let (mut cluster, probes) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            // The logs say why: keep them.
            let kept = temp.map_or(dir.clone(), tempfile::TempDir::keep);
            return Err(format!("{e} (logs in {})", kept.display()));
        }
    };
    let faults = if args.faults.is_empty() {
        ALL_FAULTS.to_vec()
    } else {
        args.faults.clone()
    };
    let mut phases = Vec::new();
    for (n, fault) in faults.iter().enumerate() {
        eprintln!("chaos: [{}/{}] {} …", n + 1, faults.len(), fault.name());
        let report = phase(&mut cluster, &probes, *fault, &knobs, n).await;
        eprintln!(
            "chaos: [{}/{}] {} ({:.0} s, load {:.0} s): {}",
            n + 1,
            faults.len(),
            fault.name(),
            report.seconds,
            report.load_seconds,
            if report.failures.is_empty() {
                "ok".to_owned()
            } else {
                report.failures.join("; ")
            }
        );
        phases.push(report);
    }
    drop(probes);
    drop(cluster);
    let passed = phases.iter().all(|p| p.failures.is_empty());
    // A failed run keeps its logs for whoever reads the report.
    let work_dir = match temp {
        Some(t) if !passed => Some(t.keep().display().to_string()),
        Some(_) => None,
        None => Some(dir.display().to_string()),
    };
    Ok(ChaosReport {
        profile: args.profile,
        phases,
        passed,
        seconds: started.elapsed().as_secs_f64(),
        work_dir,
    })
}

/// Resident memory of every running process, by name and pid.
fn rss_of(cluster: &Cluster) -> BTreeMap<String, (u32, u64)> {
    cluster
        .procs()
        .filter_map(|p| {
            let pid = p.pid()?;
            let s = crate::procstat::sample(Some(pid))?;
            Some((p.name.clone(), (pid, s.rss)))
        })
        .collect()
}

/// Samples TURN server 0's metered totals (out, in) every 250 ms until
/// cancelled.
fn sample_turn0(
    url: Option<String>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<(Instant, (u64, u64))>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let Some(url) = url else {
            return samples;
        };
        let http = reqwest::Client::new();
        while !stop.is_cancelled() {
            if let Ok(r) = http.get(&url).send().await
                && let Ok(page) = r.text().await
            {
                samples.push((Instant::now(), cluster::relayed_totals(&page)));
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        samples
    })
}

/// The most bytes counted within any stretch of `window` (plus one
/// sampling period) among `samples`.
fn most_in_window(samples: &[(Instant, (u64, u64))], window: Duration) -> Option<u64> {
    let span = window + Duration::from_millis(250);
    let mut most = None;
    for (i, (t0, b0)) in samples.iter().enumerate() {
        for (t1, b1) in &samples[i + 1..] {
            if t1.duration_since(*t0) > span {
                break;
            }
            let bytes = (b1.0 + b1.1).saturating_sub(b0.0 + b0.1);
            most = Some(most.unwrap_or(0).max(bytes));
        }
    }
    most
}

/// Injects `fault` and undoes it (restart, reconnect, continue).
async fn inject(c: &mut Cluster, fault: Fault, k: &Knobs) -> Result<(), String> {
    let pause = Duration::from_secs(1);
    let graceful = Duration::from_secs(30);
    match fault {
        Fault::SignalKill => c.signals[0].kill_and_restart(pause).await?,
        Fault::SignalTerm => c.signals[1].terminate_and_restart(graceful).await?,
        Fault::SignalCut => {
            c.redis_path.cut();
            tokio::time::sleep(k.cut).await;
            c.redis_path.restore();
        }
        Fault::TurnKill => c.turns[0].kill_and_restart(pause).await?,
        Fault::TurnTerm => c.turns[1].terminate_and_restart(graceful).await?,
        Fault::ControlKill => c.controls[0].kill_and_restart(pause).await?,
        Fault::ControlTerm => c.controls[1].terminate_and_restart(graceful).await?,
        Fault::ControlOutage => {
            for p in &mut c.controls {
                p.kill();
            }
            tokio::time::sleep(k.outage).await;
            for p in &mut c.controls {
                p.start().await?;
            }
        }
        Fault::RedisRestart => c.redis.terminate_and_restart(graceful).await?,
        Fault::RedisStall => {
            c.redis.pause(true);
            tokio::time::sleep(k.stall).await;
            c.redis.pause(false);
        }
        Fault::UsageFaults => c.lb.usage_faults(true),
    }
    for p in c.procs() {
        p.wait_ready(graceful).await?;
    }
    Ok(())
}

async fn phase(c: &mut Cluster, probes: &Probes, fault: Fault, k: &Knobs, n: usize) -> PhaseReport {
    let mut failures = Vec::new();
    let phase_start = Instant::now();
    let tenant = format!("chaos-{n}");
    let key = c.tenant(&tenant).await.unwrap_or_else(|e| {
        // The load then fails at once, and the phase with it.
        failures.push(format!("tenant {tenant}: {e}"));
        (String::new(), String::new())
    });
    let rss_before = rss_of(c);
    let interval = Duration::from_secs(k.timing.usage_interval_secs);
    // What each TURN process metered before the phase; for one the fault
    // replaces, what the old process metered during the phase.
    let start = [c.turn_totals(0).await, c.turn_totals(1).await];
    let mut gone = [None::<(u64, u64)>; 2];
    let load = TransferArgs {
        signal_urls: c.signal_urls.to_vec(),
        control_url: c.control_url.clone(),
        key_id: key.0.clone(),
        key_secret: key.1.clone(),
        tenant: tenant.clone(),
        pairs: k.pairs,
        bytes: k.bytes,
        chunk: 1_000,
        window: 16,
        rate_kbps: k.rate_kbps,
        join_rate: 20.0,
        duration_secs: k.load_secs,
        churn: k.churn,
        turn_transport: TurnTransport::Udp,
        turn_secret: None,
        turn_kid: "k1".into(),
        turn_server: "127.0.0.1:3478".parse().expect("literal"),
        timeout_secs: 15,
        room_ttl_secs: 3_600,
        // The runner settles the ledger itself, against TURN's own count.
        settle_secs: 0,
    };
    let transfer = tokio::spawn(crate::transfer::run(load, &[]));
    let sampling = tokio_util::sync::CancellationToken::new();
    let samples = sample_turn0(
        (fault == Fault::TurnKill)
            .then(|| c.turns[0].metrics_url.clone())
            .flatten(),
        sampling.clone(),
    );
    tokio::time::sleep(k.warmup).await;

    let t_fault = Instant::now();
    if fault == Fault::TurnKill {
        sampling.cancel();
    }
    let injected = tokio_util::sync::CancellationToken::new();
    let (injection, (back, signalling)) = tokio::join!(
        async {
            let r = inject(c, fault, k).await;
            injected.cancel();
            (r, Instant::now())
        },
        probes.watch(t_fault, &injected),
    );
    let (injection, t_recovered) = injection;
    if let Err(e) = injection {
        failures.push(format!("recovery: {e}"));
    }
    sampling.cancel();
    let fault_seconds = t_recovered.duration_since(t_fault).as_secs_f64();
    let minus = |a: (u64, u64), b: (u64, u64)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1));
    let samples = samples.await.unwrap_or_default();
    match fault {
        Fault::TurnKill => gone[0] = samples.last().zip(start[0]).map(|((_, s), b)| minus(*s, b)),
        Fault::TurnTerm => {
            gone[1] = c.turns[1]
                .exit_totals()
                .zip(start[1])
                .map(|(e, b)| minus(e, b));
            if gone[1].is_none() {
                failures.push("the stopped TURN server logged no totals".into());
            }
        }
        _ => {}
    }
    let back_in_rooms_ms = back.map(|d| d.as_millis() as u64);
    let signalling_again_ms = signalling.map(|d| d.as_millis() as u64);
    if back_in_rooms_ms.is_none() {
        failures.push("probes not all back in their rooms within 60 s of the fault's end".into());
    }
    if signalling_again_ms.is_none() {
        failures.push("probe pairs not all signalling within 60 s of the fault's end".into());
    }

    // No ghosts 10 s after the fault.
    tokio::time::sleep_until((t_recovered + Duration::from_secs(10)).into()).await;
    let mut ghosts = Vec::new();
    for attempt in 0..2 {
        ghosts.clear();
        for node in 0..2 {
            match probes.mismatches(node).await {
                Ok(bad) => ghosts.extend(bad.into_iter().map(|(room, listed, connected)| {
                    format!("signal-{node}: {room} lists {listed:?}, connected {connected:?}")
                })),
                Err(e) => ghosts.push(format!("signal-{node}: {e}")),
            }
        }
        if ghosts.is_empty() || attempt == 1 {
            break;
        }
        // A probe mid-reconnect may be listed a moment longer.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !ghosts.is_empty() {
        failures.push(format!("ghosts: {}", ghosts.join(", ")));
    }

    let report = transfer.await.unwrap_or_default();
    let load_seconds = phase_start.elapsed().as_secs_f64();
    if fault == Fault::UsageFaults {
        c.lb.usage_faults(false);
    }
    let usage_faults = (fault == Fault::UsageFaults).then(|| c.lb.faults());
    let rooms_not_empty = rooms_with_peers(c, &key).await.unwrap_or_else(|e| {
        failures.push(e);
        0
    });
    if rooms_not_empty > 0 {
        failures.push(format!(
            "{rooms_not_empty} rooms of the load list peers after it left"
        ));
    }

    // The ledger, against what TURN metered: exact unless a TURN server
    // was killed, and then short by at most one usage interval of it.
    let killed = fault == Fault::TurnKill;
    let bound = killed.then(|| most_in_window(&samples, interval)).flatten();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut relayed, mut billed) = ((0, 0), (0, 0));
    let mut settled = false;
    while Instant::now() < deadline {
        let mut truth = Some((0, 0));
        for i in 0..2 {
            let now = c.turn_totals(i).await;
            let part = match gone[i] {
                // A new process: all it metered is this phase's.
                Some(g) => now.map(|n| (g.0 + n.0, g.1 + n.1)),
                None => now.zip(start[i]).map(|(n, b)| minus(n, b)),
            };
            truth = truth.zip(part).map(|(t, p)| (t.0 + p.0, t.1 + p.1));
        }
        let pending = c.turn_pending(0).await.zip(c.turn_pending(1).await);
        if let (Some(t), Some(l)) = (truth, c.ledger(&tenant).await) {
            let stable = l == billed;
            (relayed, billed) = (t, l);
            if pending == Some((0, 0)) && (billed == relayed || (killed && stable)) {
                settled = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (sent, received) = (report.relayed_bytes_sent, report.relayed_bytes_received);
    let unbilled = (relayed.0 + relayed.1).saturating_sub(billed.0 + billed.1);
    if billed.0 > sent || billed.1 > billed.0 {
        failures.push(format!(
            "billed {} out / {} in for {sent} sent by the peers",
            billed.0, billed.1
        ));
    }
    if killed {
        match bound {
            Some(b) if billed.0 + billed.1 > relayed.0 + relayed.1 + b => failures.push(format!(
                "billed {} B, more than the {} B TURN metered",
                billed.0 + billed.1,
                relayed.0 + relayed.1
            )),
            Some(b) if unbilled <= b => {}
            Some(b) => failures.push(format!(
                "unbilled {unbilled} B exceeds one usage interval of the killed server ({b} B)"
            )),
            None => failures.push("no traffic samples of the killed TURN server".into()),
        }
    } else if !settled || billed != relayed {
        failures.push(format!(
            "ledger {} out / {} in, TURN metered {} out / {} in",
            billed.0, billed.1, relayed.0, relayed.1
        ));
    }
    if sent == 0 {
        failures.push("the load relayed nothing".into());
    }

    // Memory of the processes the fault left running.
    let rss_after = rss_of(c);
    let mut rss = Vec::new();
    for (name, (pid, before)) in &rss_before {
        if let Some((pid_after, after)) = rss_after.get(name)
            && pid_after == pid
        {
            rss.push(Rss {
                process: name.clone(),
                before_bytes: *before,
                after_bytes: *after,
            });
            if *after > 2 * before + (64 << 20) {
                failures.push(format!("{name} grew from {before} B to {after} B"));
            }
        }
    }
    PhaseReport {
        fault,
        seconds: phase_start.elapsed().as_secs_f64(),
        load_seconds,
        fault_seconds,
        pairs: k.pairs,
        transfers_failed: report.transfers_failed,
        sent_bytes: sent,
        received_bytes: received,
        relayed_out_bytes: relayed.0,
        relayed_in_bytes: relayed.1,
        billed_out_bytes: billed.0,
        billed_in_bytes: billed.1,
        unbilled_bytes: unbilled,
        unbilled_bound_bytes: bound,
        back_in_rooms_ms,
        signalling_again_ms,
        ghosts,
        rooms_not_empty,
        rss,
        usage_faults,
        failures,
    }
}

/// How many rooms of the key's tenant list peers.
async fn rooms_with_peers(c: &Cluster, key: &(String, String)) -> Result<usize, String> {
    let v = probes::list_rooms(&reqwest::Client::new(), &c.signal_urls[0], key).await?;
    Ok(v["rooms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["peer_count"].as_u64().unwrap_or(0) > 0)
        .count())
}

/// The human summary of a run.
pub fn render(r: &ChaosReport) -> String {
    let mut out = format!(
        "chaos ({:?} profile): {} phases in {:.0} s: {}\n",
        r.profile,
        r.phases.len(),
        r.seconds,
        if r.passed {
            "all invariants held"
        } else {
            "FAILED"
        }
    );
    out.push_str("  fault                   | TURN metered out/in = billed out/in | unbilled (bound) | back / signalling | ghosts | max RSS growth\n");
    for p in &r.phases {
        let growth = p
            .rss
            .iter()
            .map(|s| s.after_bytes as i64 - s.before_bytes as i64)
            .max()
            .unwrap_or(0);
        let ms =
            |v: Option<u64>| v.map_or("–".to_owned(), |v| format!("{:.1} s", v as f64 / 1e3));
        out.push_str(&format!(
            "  {:<23} | {}/{} = {}/{} B | {} B{} | {} / {} | {} | {:+.1} MiB\n",
            p.fault.name(),
            p.relayed_out_bytes,
            p.relayed_in_bytes,
            p.billed_out_bytes,
            p.billed_in_bytes,
            p.unbilled_bytes,
            p.unbilled_bound_bytes
                .map_or(String::new(), |b| format!(" (≤ {b})")),
            ms(p.back_in_rooms_ms),
            ms(p.signalling_again_ms),
            p.ghosts.len() + p.rooms_not_empty,
            growth as f64 / (1u64 << 20) as f64,
        ));
        for f in &p.failures {
            out.push_str(&format!("      ✗ {f}\n"));
        }
    }
    if let Some(d) = &r.work_dir {
        out.push_str(&format!("  logs: {d}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_the_most_metered_in_one_interval() {
        let t0 = Instant::now();
        let at = |ms: u64, out: u64| (t0 + Duration::from_millis(ms), (out, out / 2));
        // 0.25 s apart; a burst of 900 (+450 in) between 500 and 750 ms.
        let samples = [
            at(0, 0),
            at(250, 100),
            at(500, 200),
            at(750, 1_100),
            at(1_000, 1_200),
            at(1_250, 1_300),
        ];
        // Windows of at most 1.25 s: 0→1250 holds everything.
        assert_eq!(
            most_in_window(&samples, Duration::from_secs(1)),
            Some(1_300 + 650)
        );
        // Windows of at most 0.5 s: 500→1000 and 250→750 are the largest.
        assert_eq!(
            most_in_window(&samples, Duration::from_millis(250)),
            Some(1_000 + 500)
        );
        assert_eq!(most_in_window(&samples[..1], Duration::from_secs(1)), None);
    }

    #[test]
    fn profiles_cover_every_fault_within_bounds() {
        for p in [Profile::Short, Profile::Long] {
            let k = p.knobs();
            assert!(
                k.warmup < Duration::from_secs(k.load_secs),
                "{p:?}: faults land during the load"
            );
            assert!(
                k.cut > Duration::from_millis(k.timing.node_dead_after_ms),
                "{p:?}: a cut node is declared dead"
            );
        }
        assert_eq!(ALL_FAULTS.len(), 11);
    }
}
