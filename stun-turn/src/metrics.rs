//! The TURN server's Prometheus metrics, built once and shared by `Arc`.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of the TURN server.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub stun_requests: IntCounterVec,
    pub discarded: IntCounterVec,
    pub tcp_connections: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            stun_requests: IntCounterVec::new(
                Opts::new(
                    "floe_turn_stun_requests_total",
                    "STUN requests answered, by method, transport and result",
                ),
                &["method", "transport", "result"],
            )
            .expect("valid metric"),
            discarded: IntCounterVec::new(
                Opts::new(
                    "floe_turn_discarded_total",
                    "Datagrams or stream frames discarded, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            tcp_connections: IntGauge::new(
                "floe_turn_tcp_connections",
                "Open client TCP connections",
            )
            .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.stun_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.discarded.clone()),
            Box::new(m.tcp_connections.clone()),
        ] {
            m.registry.register(c).expect("each metric registered once");
        }
        m
    }
}
