//! The load tester's full scenario against `floe dev`: 100 peers signal,
//! allocate with the credentials signaling gave them, relay 64 KiB each
//! way, and the ledger equals what went through TURN, byte for byte.

mod support;

#[tokio::test]
async fn hundred_peers_transfer_verified_and_the_ledger_reconciles() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_dev, ep) = support::start(data.path());
    let s = |k: &str| ep[k].as_str().expect("endpoint").to_owned();
    let report = floe_loadtest::transfer::run(floe_loadtest::transfer::TransferArgs {
        signal_urls: vec![s("signal_url")],
        control_url: s("control_url"),
        key_id: s("api_key_id"),
        key_secret: s("api_key_secret"),
        tenant: s("tenant"),
        pairs: 50,
        bytes: 64 * 1024,
        chunk: 1_000,
        window: 32,
        join_rate: 100.0,
        timeout_secs: 60,
    })
    .await;
    assert_eq!(report.transfers_failed, 0, "{report:?}");
    assert_eq!(report.transfers_verified, 100);
    assert_eq!(report.corrupt_chunks, 0);
    assert!(report.consistent, "{report:?}");
    assert!(report.relayed_bytes_sent >= 100 * 64 * 1024);
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

/// Every `floe_…` metric name the shipped Grafana dashboard and Prometheus
/// alerts use, after a workload has touched every component, is one that a
/// component exposes on `/metrics`.
#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_the_components_expose() {
    let data = tempfile::tempdir().expect("tempdir");
    let (_dev, ep) = support::start(data.path());
    let s = |k: &str| ep[k].as_str().expect("endpoint").to_owned();
    let report = floe_loadtest::transfer::run(floe_loadtest::transfer::TransferArgs {
        signal_urls: vec![s("signal_url")],
        control_url: s("control_url"),
        key_id: s("api_key_id"),
        key_secret: s("api_key_secret"),
        tenant: s("tenant"),
        pairs: 2,
        bytes: 4 * 1024,
        chunk: 1_000,
        window: 8,
        join_rate: 100.0,
        timeout_secs: 30,
    })
    .await;
    assert_eq!(report.transfers_verified, 4, "{report:?}");

    let mut exposed = std::collections::BTreeSet::new();
    for base in [s("signal_url"), s("control_url"), s("turn_ops_url")] {
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
