//! The TURN server's Prometheus metrics, built once and shared by `Arc`.

use prometheus::core::Collector;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric of the TURN server.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub stun_requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub discarded: IntCounterVec,
    pub discarded_bytes: IntCounterVec,
    pub hairpinned: IntCounter,
    pub tcp_connections: IntGauge,
    pub allocations: IntGaugeVec,
    pub allocations_created: IntCounter,
    pub allocations_refused: IntCounterVec,
    pub allocations_closed: IntCounterVec,
    pub relayed_bytes: IntCounterVec,
    pub relayed_packets: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub denied_peers: IntCounter,
    pub usage_batches: IntCounterVec,
    pub usage_pending: IntGauge,
    pub max_allocations: IntGauge,
    pub relay_ports: IntGauge,
    pub shards_running: IntGauge,
    pub shard_threads: IntGauge,
    pub shard_moves: IntCounter,
    pub secrets_reloads: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Metrics {
    /// The metrics of a server allowed `max_allocations` at once, with
    /// `relay_ports` relay ports per address. Counters whose label values
    /// are known up front start at zero, so that rates and alerts see them
    /// before the first event.
    pub fn new(max_allocations: usize, relay_ports: usize) -> Self {
        let m = Self {
            registry: Registry::new(),
            stun_requests: counter_vec(
                "floe_turn_stun_requests_total",
                "STUN/TURN requests answered, by method, transport and result",
                &["method", "transport", "result"],
            ),
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "floe_turn_request_seconds",
                    "Time to answer TURN requests, by method",
                )
                .buckets(vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
                ]),
                &["method"],
            )
            .expect("valid metric"),
            discarded: counter_vec(
                "floe_turn_discarded_total",
                "Datagrams or frames not relayed or answered, by reason",
                &["reason"],
            ),
            discarded_bytes: counter_vec(
                "floe_turn_discarded_bytes_total",
                "Payload bytes of datagrams or frames not relayed, by reason",
                &["reason"],
            ),
            hairpinned: IntCounter::new(
                "floe_turn_hairpinned_packets_total",
                "Datagrams relayed from one of this server's allocations to another in memory",
            )
            .expect("valid metric"),
            tcp_connections: IntGauge::new(
                "floe_turn_tcp_connections",
                "Open client TCP connections",
            )
            .expect("valid metric"),
            allocations: IntGaugeVec::new(
                Opts::new("floe_turn_allocations", "Live allocations, by tenant"),
                &["tenant"],
            )
            .expect("valid metric"),
            allocations_created: IntCounter::new(
                "floe_turn_allocations_created_total",
                "Allocations created",
            )
            .expect("valid metric"),
            allocations_refused: counter_vec(
                "floe_turn_allocations_refused_total",
                "Allocate requests refused, by reason",
                &["reason"],
            ),
            allocations_closed: counter_vec(
                "floe_turn_allocations_closed_total",
                "Allocations ended, by reason (client, expired, policy, connection, shutdown)",
                &["reason"],
            ),
            relayed_bytes: counter_vec(
                "floe_turn_relayed_bytes_total",
                "Relayed payload bytes, by tenant and direction (out: client to peer, in: peer to client)",
                &["tenant", "direction"],
            ),
            relayed_packets: counter_vec(
                "floe_turn_relayed_packets_total",
                "Relayed datagrams, by tenant and direction",
                &["tenant", "direction"],
            ),
            auth_failures: counter_vec(
                "floe_turn_auth_failures_total",
                "Failed authentications, by reason",
                &["reason"],
            ),
            denied_peers: IntCounter::new(
                "floe_turn_denied_peers_total",
                "Permissions refused because the peer address is not allowed",
            )
            .expect("valid metric"),
            usage_batches: counter_vec(
                "floe_turn_usage_batches_total",
                "Usage batches, by result (sent, acked, failed, rejected)",
                &["result"],
            ),
            usage_pending: IntGauge::new(
                "floe_turn_usage_batches_pending",
                "Usage batches waiting for the control plane's acknowledgement",
            )
            .expect("valid metric"),
            max_allocations: IntGauge::new(
                "floe_turn_max_allocations",
                "Allocations this server accepts at once (--max-allocations)",
            )
            .expect("valid metric"),
            secrets_reloads: counter_vec(
                "floe_turn_secrets_reloads_total",
                "Changes of the TURN secrets file applied (ok) or refused (invalid)",
                &["result"],
            ),
            relay_ports: IntGauge::new(
                "floe_turn_relay_ports",
                "Relay ports per relay address (--relay-port-min..=--relay-port-max): each allocation holds one",
            )
            .expect("valid metric"),
            shards_running: IntGauge::new(
                "floe_turn_shards_running",
                "Shards serving UDP (one per --udp-sockets); fewer than started means one died",
            )
            .expect("valid metric"),
            shard_threads: IntGauge::new(
                "floe_turn_shard_threads",
                "Threads the shards run on now: fewer than shards while the load is light",
            )
            .expect("valid metric"),
            shard_moves: IntCounter::new(
                "floe_turn_shard_moves_total",
                "Shards moved from one thread to another as the load changed",
            )
            .expect("valid metric"),
        };
        m.max_allocations
            .set(i64::try_from(max_allocations).unwrap_or(i64::MAX));
        m.relay_ports
            .set(i64::try_from(relay_ports).unwrap_or(i64::MAX));
        for reason in [
            "bad_request",
            "bad_username",
            "unknown_kid",
            "bad_password",
            "expired",
            "rate_limited",
        ] {
            m.auth_failures.with_label_values(&[reason]);
        }
        for reason in [
            "capacity",
            "quota",
            "ports",
            "draining",
            "over_quota",
            "revoked",
            "no_policy",
        ] {
            m.allocations_refused.with_label_values(&[reason]);
        }
        for reason in [
            "no_permission",
            "bitrate",
            "send_failed",
            "client_send_failed",
            "client_slow",
            "client_gone",
        ] {
            m.discarded.with_label_values(&[reason]);
            m.discarded_bytes.with_label_values(&[reason]);
        }
        for result in ["ok", "invalid"] {
            m.secrets_reloads.with_label_values(&[result]);
        }
        for result in ["sent", "acked", "failed", "rejected"] {
            m.usage_batches.with_label_values(&[result]);
        }
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(m.stun_requests.clone()),
            Box::new(m.request_seconds.clone()),
            Box::new(m.discarded.clone()),
            Box::new(m.discarded_bytes.clone()),
            Box::new(m.hairpinned.clone()),
            Box::new(m.tcp_connections.clone()),
            Box::new(m.allocations.clone()),
            Box::new(m.allocations_created.clone()),
            Box::new(m.allocations_refused.clone()),
            Box::new(m.allocations_closed.clone()),
            Box::new(m.relayed_bytes.clone()),
            Box::new(m.relayed_packets.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.denied_peers.clone()),
            Box::new(m.usage_batches.clone()),
            Box::new(m.usage_pending.clone()),
            Box::new(m.max_allocations.clone()),
            Box::new(m.relay_ports.clone()),
            Box::new(m.shards_running.clone()),
            Box::new(m.shard_threads.clone()),
            Box::new(m.shard_moves.clone()),
            Box::new(m.secrets_reloads.clone()),
        ];
        for c in all {
            m.registry.register(c).expect("each metric registered once");
        }
        m
    }

    /// Relayed bytes metered since start over all tenants: (out, in).
    pub fn relayed_totals(&self) -> (u64, u64) {
        let mut totals = (0, 0);
        for family in self.relayed_bytes.collect() {
            for m in family.get_metric() {
                let value = m.get_counter().get_value() as u64;
                match m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "direction")
                    .map(|l| l.value())
                {
                    Some("out") => totals.0 += value,
                    Some("in") => totals.1 += value,
                    _ => {}
                }
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_totals_add_every_tenant_by_direction() {
        let m = Metrics::new(10, 10);
        m.relayed_bytes.with_label_values(&["a", "out"]).inc_by(5);
        m.relayed_bytes.with_label_values(&["b", "out"]).inc_by(7);
        m.relayed_bytes.with_label_values(&["a", "in"]).inc_by(3);
        assert_eq!(m.relayed_totals(), (12, 3));
    }
}
