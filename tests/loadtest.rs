//! The load tester's full scenario against `floe dev`: 100 peers signal,
//! allocate with the credentials signaling gave them, relay 64 KiB each
//! way, and the ledger equals what went through TURN, byte for byte.

mod support;

use clap::Parser;
use floe_loadtest::transfer::{TransferArgs, TransferReport};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TransferArgs,
}

/// Runs the transfer scenario against `floe dev`'s endpoints with the
/// command-line flags `extra`, exactly as `floe loadtest transfer` would.
async fn run(ep: &Value, extra: &[&str]) -> TransferReport {
    let s = |k: &str| ep[k].as_str().expect("endpoint").to_owned();
    let mut argv = vec!["transfer".to_owned()];
    for (flag, key) in [
        ("--signal-url", "signal_url"),
        ("--control-url", "control_url"),
        ("--key-id", "api_key_id"),
        ("--key-secret", "api_key_secret"),
        ("--tenant", "tenant"),
    ] {
        argv.extend([flag.to_owned(), s(key)]);
    }
    argv.extend(["--join-rate", "100", "--timeout-secs", "60"].map(str::to_owned));
    argv.extend(extra.iter().map(|a| (*a).to_owned()));
    let report = floe_loadtest::transfer::run(Cli::parse_from(argv).args, &[]).await;
    println!("{}", floe_loadtest::transfer::render(&report));
    report
}

/// Every file verified and the ledger equal, byte for byte, to what the
/// peers put through TURN and took from it.
fn assert_verified_and_reconciled(report: &TransferReport) {
    assert_eq!(report.transfers_failed, 0, "{report:?}");
    assert_eq!(report.corrupt_chunks, 0);
    assert!(report.consistent, "{report:?}");
    assert!(
        report.reconciled,
        "ledger out {} in {} vs sent {} received {}",
        report.ledger_bytes_out,
        report.ledger_bytes_in,
        report.relayed_bytes_sent,
        report.relayed_bytes_received
    );
    assert_eq!(report.ledger_bytes_out, report.relayed_bytes_sent);
    assert_eq!(report.ledger_bytes_in, report.relayed_bytes_received);
}

#[tokio::test]
async fn hundred_peers_transfer_verified_and_the_ledger_reconciles() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_dev, ep) = support::start(data.path());
    let report = run(&ep, &["--pairs", "50", "--bytes", "65536"]).await;
    assert_verified_and_reconciled(&report);
    assert_eq!(report.transfers_verified, 100);
    assert_eq!(report.payload_bytes_verified, 100 * 64 * 1024);
    assert!(report.relayed_bytes_sent >= 100 * 64 * 1024);
    assert!(report.peak_transferring_peers >= 2);
}

/// The other knobs against the same kind of deployment: TURN over TCP,
/// half the pairs reconnecting their signaling mid-transfer, and pairs
/// sending file after file for a few seconds; then a TURN-only run with
/// credentials minted from the TURN secret. Everything verified, every
/// churned peer back and re-signalled, and the ledger still exact.
#[tokio::test]
async fn tcp_churn_duration_and_turn_only_runs_reconcile() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_dev, ep) = support::start(data.path());
    let report = run(
        &ep,
        &[
            "--pairs",
            "10",
            "--bytes",
            "262144",
            "--turn-transport",
            "tcp",
            "--churn",
            "0.5",
            "--duration-secs",
            "3",
        ],
    )
    .await;
    assert_verified_and_reconciled(&report);
    assert_eq!(report.churned_peers, 5, "{report:?}");
    assert_eq!(report.reconnect_ms.map(|s| s.count), Some(5));
    // Every pair ran at least one round; pairs that started early, more.
    assert!(report.rounds_completed > 10, "{report:?}");
    assert_eq!(report.transfers_verified, 2 * report.rounds_completed);
    assert_eq!(
        report.payload_bytes_verified,
        report.transfers_verified * 262_144
    );

    let secrets = std::fs::read_to_string(data.path().join("turn-secrets")).expect("secrets");
    let (kid, secret) = secrets.trim().split_once('=').expect("kid=secret");
    let turn = ep["turn_addr"].as_str().expect("turn address");
    let report = run(
        &ep,
        &[
            "--pairs",
            "5",
            "--bytes",
            "16384",
            "--turn-secret",
            secret,
            "--turn-kid",
            kid,
            "--turn-server",
            turn,
        ],
    )
    .await;
    assert_verified_and_reconciled(&report);
    assert!(report.turn_only);
    assert_eq!(report.transfers_verified, 10);
    assert_eq!(report.join_ms, None, "a TURN-only run does not signal");
}

/// Every `floe_…` metric name the shipped Grafana dashboard and Prometheus
/// alerts use, after a workload has touched every component, is one that a
/// component exposes on `/metrics`.
#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_the_components_expose() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_dev, ep) = support::start(data.path());
    let s = |k: &str| ep[k].as_str().expect("endpoint").to_owned();
    let report = run(&ep, &["--pairs", "2", "--bytes", "4096", "--window", "8"]).await;
    assert_eq!(report.transfers_verified, 4, "{report:?}");

    let mut exposed = std::collections::BTreeSet::new();
    for base in [s("signal_ops_url"), s("control_url"), s("turn_ops_url")] {
        let body = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        exposed.extend(
            body.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned),
        );
    }
    // Read at run time: a target directory shared between clones (the CI
    // cache) keeps a compile-time path of whichever clone built it first.
    let root = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let chart = std::path::Path::new(&root).join("helm/floe");
    let mut used = std::collections::BTreeSet::new();
    for file in ["dashboards/floe.json", "templates/prometheusrule.yaml"] {
        let text = std::fs::read_to_string(chart.join(file)).expect("chart file");
        used.extend(metric_names(&text));
    }
    assert!(used.len() > 20, "found only {used:?}");
    let missing: Vec<_> = used
        .iter()
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| exposed.contains(*base))
                .unwrap_or(name);
            !exposed.contains(family)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the chart uses metrics no component exposes: {missing:?}\nexposed: {exposed:?}"
    );
}

/// Every `floe_[a-z0-9_]+` token in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("floe_") {
        let token: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + token.len()..];
        names.push(token);
    }
    names
}
