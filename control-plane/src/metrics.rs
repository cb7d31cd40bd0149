//! The control plane's Prometheus metrics, built once and shared by `Arc`.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric of the control plane.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub credentials_issued: IntCounterVec,
    pub credentials_refused: IntCounterVec,
    pub usage_batches: IntCounterVec,
    pub ledger_bytes: IntCounterVec,
    pub tenants_over_quota: IntGauge,
    pub store_seconds: HistogramVec,
    pub store_switches: IntCounter,
    pub webhooks: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            credentials_issued: IntCounterVec::new(
                Opts::new(
                    "floe_control_credentials_issued_total",
                    "TURN credentials issued, by tenant",
                ),
                &["tenant"],
            )
            .expect("valid metric"),
            credentials_refused: IntCounterVec::new(
                Opts::new(
                    "floe_control_credentials_refused_total",
                    "TURN credentials refused (STUN only), by tenant and reason",
                ),
                &["tenant", "reason"],
            )
            .expect("valid metric"),
            usage_batches: IntCounterVec::new(
                Opts::new(
                    "floe_control_usage_batches_total",
                    "Usage batches received, by result (applied, duplicate, rejected)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            ledger_bytes: IntCounterVec::new(
                Opts::new(
                    "floe_control_ledger_bytes_total",
                    "Relayed bytes entered into the ledger, by tenant",
                ),
                &["tenant"],
            )
            .expect("valid metric"),
            tenants_over_quota: IntGauge::new(
                "floe_control_tenants_over_quota",
                "Tenants over their monthly relay quota at the last enforcement pass",
            )
            .expect("valid metric"),
            store_switches: IntCounter::new(
                "floe_control_store_switches_total",
                "Times the Redis store moved to a new master (Sentinel failover)",
            )
            .expect("valid metric"),
            store_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "floe_control_store_seconds",
                    "Latency of store operations, by operation",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
                &["op"],
            )
            .expect("valid metric"),
            webhooks: IntCounterVec::new(
                Opts::new(
                    "floe_control_webhooks_total",
                    "Usage-alert webhook attempts, by result (delivered, failed)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            registry,
        };
        // Known label values start at zero, so rates and alerts see them
        // before the first event.
        for result in ["applied", "duplicate", "rejected"] {
            m.usage_batches.with_label_values(&[result]);
        }
        for result in ["delivered", "failed"] {
            m.webhooks.with_label_values(&[result]);
        }
        for c in [
            Box::new(m.credentials_issued.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.credentials_refused.clone()),
            Box::new(m.usage_batches.clone()),
            Box::new(m.ledger_bytes.clone()),
            Box::new(m.tenants_over_quota.clone()),
            Box::new(m.store_seconds.clone()),
            Box::new(m.store_switches.clone()),
            Box::new(m.webhooks.clone()),
        ] {
            m.registry.register(c).expect("each metric registered once");
        }
        m
    }
}
