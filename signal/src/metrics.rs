//! The signal node's Prometheus metrics, built once and shared by `Arc`.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of a signal node.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub rooms: IntGauge,
    /// Client messages by type, resolved once (the hot path skips the
    /// label lookup).
    messages: [IntCounter; 5],
    pub refusals: IntCounterVec,
    pub relay_latency: Histogram,
    pub redis_errors: IntCounter,
    pub redis_master_switches: IntCounter,
    pub reported_bytes: IntCounterVec,
    pub rooms_created: IntCounterVec,
    pub turn_credentials: IntCounterVec,
    pub presence_repairs: IntCounterVec,
    pub bus_undelivered: IntCounterVec,
}

impl Metrics {
    /// The counter of client messages of `msg`'s type.
    pub fn message(&self, msg: &floe_proto::signal::ClientMessage) -> &IntCounter {
        use floe_proto::signal::ClientMessage as M;
        &self.messages[match msg {
            M::Signal { .. } => 0,
            M::Broadcast { .. } => 1,
            M::Leave => 2,
            M::Stats { .. } => 3,
            M::Ping => 4,
        }]
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            connections: IntGauge::new(
                "floe_signal_connections",
                "Open WebSocket connections on this node",
            )
            .expect("valid metric"),
            rooms: IntGauge::new(
                "floe_signal_rooms",
                "Rooms with at least one peer connected to this node",
            )
            .expect("valid metric"),
            messages: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "floe_signal_messages_total",
                        "Client messages received, by type",
                    ),
                    &["type"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(v.clone()))
                    .expect("registered once");
                ["signal", "broadcast", "leave", "stats", "ping"].map(|t| v.with_label_values(&[t]))
            },
            refusals: IntCounterVec::new(
                Opts::new(
                    "floe_signal_refusals_total",
                    "Requests, joins and messages refused, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            relay_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "floe_signal_relay_latency_seconds",
                    "Time from a message entering one node to its delivery on another",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                ]),
            )
            .expect("valid metric"),
            redis_errors: IntCounter::new(
                "floe_signal_redis_errors_total",
                "Failed Redis commands and lost Redis connections",
            )
            .expect("valid metric"),
            redis_master_switches: IntCounter::new(
                "floe_signal_redis_master_switches_total",
                "Times the room bus moved to a new Redis master (Sentinel failover)",
            )
            .expect("valid metric"),
            reported_bytes: IntCounterVec::new(
                Opts::new(
                    "floe_signal_reported_bytes_total",
                    "Bytes peers reported moving, by tenant and path (direct, relayed)",
                ),
                &["tenant", "path"],
            )
            .expect("valid metric"),
            rooms_created: IntCounterVec::new(
                Opts::new(
                    "floe_signal_rooms_created_total",
                    "Rooms created, by tenant",
                ),
                &["tenant"],
            )
            .expect("valid metric"),
            turn_credentials: IntCounterVec::new(
                Opts::new(
                    "floe_signal_turn_credentials_total",
                    "ICE server sets handed to peers, by outcome (issued, or why TURN was left out)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            presence_repairs: IntCounterVec::new(
                Opts::new(
                    "floe_signal_presence_repairs_total",
                    "Differences between this node's connections and the shared room state, repaired, by action",
                ),
                &["action"],
            )
            .expect("valid metric"),
            bus_undelivered: IntCounterVec::new(
                Opts::new(
                    "floe_signal_bus_undelivered_total",
                    "Room bus envelopes that reached no node or could not be handled, by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            registry,
        };
        // The limits operators alert on start at zero, so rates see them
        // before the first refusal.
        for reason in [
            "rate_limited",
            "too_many_connections",
            "room_full",
            "room_limit_reached",
            "message_too_large",
            "unavailable",
        ] {
            m.refusals.with_label_values(&[reason]);
        }
        for c in [
            Box::new(m.connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.rooms.clone()),
            Box::new(m.refusals.clone()),
            Box::new(m.relay_latency.clone()),
            Box::new(m.redis_errors.clone()),
            Box::new(m.redis_master_switches.clone()),
            Box::new(m.reported_bytes.clone()),
            Box::new(m.rooms_created.clone()),
            Box::new(m.turn_credentials.clone()),
            Box::new(m.presence_repairs.clone()),
            Box::new(m.bus_undelivered.clone()),
        ] {
            m.registry.register(c).expect("each metric registered once");
        }
        m
    }
}
