//! Runtime glue every floe component needs, written once: the operations
//! endpoints (`/healthz`, `/readyz`, `/metrics`), JSON error answers,
//! serving an axum router until shutdown, the shutdown signal, secrets from
//! configuration, rate limiting, and tracing set-up.

pub mod health;
pub mod http;
pub mod ratelimit;
pub mod secret;
pub mod shutdown;
pub mod telemetry;

pub use health::{Check, Health};
pub use shutdown::Shutdown;
