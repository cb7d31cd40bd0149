//! Runtime glue every floe component needs, written once: the operations
//! endpoints (`/healthz`, `/readyz`, `/metrics`), JSON error answers,
//! serving an axum router until shutdown, the shutdown signal, secrets from
//! configuration, rate limiting, tracing set-up, batched UDP I/O, the
//! client's address behind trusted proxies, connections to Redis (one
//! server or a Sentinel set), and a TCP forwarder that can
//! cut its path (fault injection).

pub mod config;
pub mod health;
pub mod http;
pub mod netfault;
pub mod proxy;
pub mod ratelimit;
pub mod redis_link;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod udp_batch;

pub use health::{Check, Health};

/// This machine's host name, reduced to letters, digits, '-' and '.' (at
/// most 40 characters); `fallback` when it cannot be read. Used in node
/// and server ids.
pub fn host_name(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                .take(40)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_owned())
}
pub use shutdown::{Running, Shutdown};
