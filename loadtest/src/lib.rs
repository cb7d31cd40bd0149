//! floe load tester: drives a floe deployment with simulated peers and
//! reports what it measured.
//!
//! Modes: signal-only (rooms of peers trading offers and answers), the
//! full transfer scenario (signal, relay files through TURN over UDP or
//! TCP, reconcile the ledger; or TURN-only), a TURN allocation storm, a
//! STUN Binding flood, timed usage acks against the control plane, a
//! signal-node failover, and a chaos run (a whole deployment of separate
//! processes on loopback, faults injected one at a time, invariants
//! checked after each). Every run is bounded in count and time, and
//! targets only loopback or explicitly allowed addresses.

pub mod acks;
pub mod chaos;
pub mod chunks;
pub mod failover;
mod join;
pub mod procstat;
pub mod signal;
pub mod stats;
pub mod stream_conn;
pub mod stun_flood;
pub mod target;
pub mod transfer;
pub mod turn_storm;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `floe loadtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// What to exercise.
    #[command(subcommand)]
    pub mode: Mode,

    /// Addresses other than loopback that may be targeted; repeatable.
    #[arg(
        long = "allow-target",
        env = "FLOE_ALLOW_TARGETS",
        value_delimiter = ',',
        global = true
    )]
    pub allow_targets: Vec<IpAddr>,

    /// Write every figure as JSON to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
}

/// Load test modes.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Mode {
    /// Signal-only: peers join rooms over WebSocket and trade
    /// offer/answer-sized messages through signaling.
    Signal(signal::SignalArgs),
    /// Failover: pairs join one signal node; once it goes away (kill it
    /// when --ready-file appears) they reconnect to another as floe's SDK
    /// does; reports how long until all are back and signalling.
    Failover(failover::FailoverArgs),
    /// The full scenario: pairs signal, allocate on TURN with the credentials
    /// signaling gave them, relay a file each way, and the ledger is
    /// reconciled with what they sent.
    Transfer(transfer::TransferArgs),
    /// Authenticated TURN Allocates, many at once, each a new 5-tuple.
    TurnAllocate(turn_storm::StormArgs),
    /// Usage acks: post usage batches as a TURN server does and time the
    /// control plane's acknowledgements, with many tenants present.
    UsageAcks(acks::AckArgs),
    /// Chaos: start Redis, two control-plane replicas, two signal nodes
    /// and two TURN servers as processes on loopback, keep a transfer load
    /// running, inject faults one at a time and check the ledger, presence,
    /// recovery and memory after each.
    Chaos(chaos::ChaosArgs),
    /// Flood a STUN server with Binding requests over UDP.
    StunBinding {
        /// STUN server address.
        #[arg(long, default_value = "127.0.0.1:3478")]
        target: SocketAddr,
        /// Requests to send.
        #[arg(long, default_value_t = 10_000)]
        requests: u64,
        /// Requests outstanding at once, over all sockets.
        #[arg(long, default_value_t = 100)]
        in_flight: usize,
        /// Client sockets (source ports) sharing the load.
        #[arg(long, default_value_t = 4)]
        sockets: usize,
        /// Give up on a request after this many milliseconds.
        #[arg(long, default_value_t = 1_000)]
        timeout_ms: u64,
    },
}

/// Why a load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Target(#[from] target::TargetRefused),
    #[error("I/O")]
    Io(#[from] std::io::Error),
    #[error("cannot write report")]
    Json(#[from] serde_json::Error),
    #[error("bad target URL {0}")]
    BadUrl(String),
    #[error(transparent)]
    Setup(#[from] acks::SetupError),
    #[error("chaos run could not start: {0}")]
    ChaosSetup(String),
    /// The run completed and an invariant broke; the summary says which.
    #[error("{0}")]
    ChaosFailed(String),
}

/// A progress bar for `len` steps, labelled `what`, with `tail` after the
/// count (indicatif template syntax).
pub(crate) fn progress_bar(len: u64, what: &str, tail: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg:>10}} [{{bar:40}}] {{pos}}/{{len}} {tail}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// Checks that `url`'s host is loopback or explicitly allowed.
fn check_url(url: &str, allowed: &[IpAddr]) -> Result<(), LoadError> {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', '?']).next())
        .ok_or_else(|| LoadError::BadUrl(url.to_owned()))?;
    let addr: SocketAddr = host
        .parse()
        .or_else(|_| format!("{host}:80").parse())
        .map_err(|_| LoadError::BadUrl(format!("{url} (give an IP address, not a name)")))?;
    target::check(addr.ip(), allowed)?;
    Ok(())
}

fn write_json(path: &Option<PathBuf>, report: &impl serde::Serialize) -> Result<(), LoadError> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    }
    Ok(())
}

/// Runs the configured load test and returns the human summary.
pub async fn run(config: Config) -> Result<String, LoadError> {
    match config.mode {
        Mode::Signal(args) => {
            for url in &args.signal_urls {
                check_url(url, &config.allow_targets)?;
            }
            let report = signal::run(args).await;
            write_json(&config.json, &report)?;
            Ok(signal::render(&report))
        }
        Mode::Transfer(args) => {
            for url in args.signal_urls.iter().chain([&args.control_url]) {
                check_url(url, &config.allow_targets)?;
            }
            target::check(args.turn_server.ip(), &config.allow_targets)?;
            let report = transfer::run(args, &config.allow_targets).await;
            write_json(&config.json, &report)?;
            Ok(transfer::render(&report))
        }
        Mode::Failover(args) => {
            for url in [&args.signal_url, &args.failover_url] {
                check_url(url, &config.allow_targets)?;
            }
            let report = failover::run(args).await?;
            write_json(&config.json, &report)?;
            Ok(failover::render(&report))
        }
        Mode::Chaos(args) => {
            let report = chaos::run(args).await.map_err(LoadError::ChaosSetup)?;
            write_json(&config.json, &report)?;
            let summary = chaos::render(&report);
            if report.passed {
                Ok(summary)
            } else {
                Err(LoadError::ChaosFailed(summary))
            }
        }
        Mode::UsageAcks(args) => {
            check_url(&args.control_url, &config.allow_targets)?;
            let report = acks::run(args).await?;
            write_json(&config.json, &report)?;
            Ok(acks::render(&report))
        }
        Mode::TurnAllocate(args) => {
            target::check(args.target.ip(), &config.allow_targets)?;
            let target = args.target;
            let report = turn_storm::run(args).await;
            write_json(&config.json, &report)?;
            let lat = stats::Summary::line_of(report.latency_ms, 2);
            let mut out = format!(
                "TURN allocation storm against {target}\n  allocated {} in {:.2} s: {:.0} allocations/s\n  latency {lat}\n",
                report.allocated, report.seconds, report.allocations_per_sec
            );
            for (why, n) in &report.failed {
                out.push_str(&format!("  failed ({why}): {n}\n"));
            }
            Ok(out)
        }
        Mode::StunBinding {
            target,
            requests,
            in_flight,
            sockets,
            timeout_ms,
        } => {
            target::check(target.ip(), &config.allow_targets)?;
            let report = stun_flood::run(
                target,
                stun_flood::Flood {
                    requests,
                    in_flight,
                    sockets,
                    timeout: Duration::from_millis(timeout_ms),
                },
            )
            .await?;
            write_json(&config.json, &report)?;
            let lat = stats::Summary::line_of(report.latency_ms, 3);
            Ok(format!(
                "STUN Binding flood against {target} from {} sockets\n  sent {}  answered {}  lost {}\n  {:.0} bindings/s over {:.2} s\n  latency {lat}\n",
                report.sockets,
                report.sent,
                report.answered,
                report.lost,
                report.bindings_per_sec,
                report.seconds
            ))
        }
    }
}
