//! Configuration of `floe turn`: flags, each also read from a `FLOE_…`
//! environment variable.

use std::net::SocketAddr;

/// Flags of `floe turn`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address for STUN/TURN over UDP and TCP.
    #[arg(long = "listen", env = "FLOE_LISTEN", default_value = "0.0.0.0:3478")]
    pub listen: SocketAddr,

    /// Address of the ops HTTP endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "FLOE_HTTP_LISTEN", default_value = "0.0.0.0:9478")]
    pub http_listen: SocketAddr,

    /// UDP sockets (SO_REUSEPORT) serving the listen address; 0: one per core.
    #[arg(long, env = "FLOE_UDP_SOCKETS", default_value_t = 0)]
    pub udp_sockets: usize,

    /// Most concurrent TCP connections.
    #[arg(long, env = "FLOE_MAX_TCP_CONNECTIONS", default_value_t = 10_000)]
    pub max_tcp_connections: usize,
}

/// A configuration `floe turn` cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what} must be between {min} and {max}")]
    OutOfRange {
        what: &'static str,
        min: usize,
        max: usize,
    },
}

impl Config {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.udp_sockets > 64 {
            return Err(ConfigError::OutOfRange {
                what: "--udp-sockets",
                min: 0,
                max: 64,
            });
        }
        if self.max_tcp_connections == 0 {
            return Err(ConfigError::OutOfRange {
                what: "--max-tcp-connections",
                min: 1,
                max: usize::MAX,
            });
        }
        Ok(())
    }
}
