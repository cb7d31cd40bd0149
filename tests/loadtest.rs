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
