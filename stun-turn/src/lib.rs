//! floe STUN/TURN server.
//!
//! Protocol logic is plain code fed with bytes and addresses
//! ([`binding`], [`framing`]); the drivers in [`server`] own the sockets.
//! The public API: [`Config`], [`start`] / [`run`] and the running [`Turn`]
//! handle.

pub mod binding;
mod config;
pub mod framing;
mod metrics;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use floe_common::{Health, Shutdown};

pub use config::{Config, ConfigError};

/// Why the TURN server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running TURN server. Dropping it shuts it down.
pub struct Turn {
    listen: SocketAddr,
    http: SocketAddr,
    shutdown: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Turn {
    /// Address of the STUN/TURN listener (UDP and TCP).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Address of the ops HTTP endpoints.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// Waits until every task has stopped (after shutdown fired).
    pub async fn wait(mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts serving; returns once every listener is bound.
pub async fn start(config: Config, shutdown: Shutdown) -> Result<Turn, StartError> {
    config.validate()?;
    let shutdown = shutdown.child_token();
    let metrics = Arc::new(metrics::Metrics::new());
    let health = Health::new();
    let (listen, mut tasks) = server::bind_and_serve(&config, metrics.clone(), shutdown.clone())?;
    let http = floe_common::http::bind("TURN ops HTTP", config.http_listen).await?;
    let http_addr = http.local_addr()?;
    let router = floe_common::http::ops_router(metrics.registry.clone(), health)
        .fallback(floe_common::http::not_found);
    tasks.push(floe_common::http::serve(http, router, shutdown.clone()));
    tracing::info!(%listen, http = %http_addr, "TURN server listening (UDP, TCP)");
    Ok(Turn {
        listen,
        http: http_addr,
        shutdown,
        tasks,
    })
}

/// Runs until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    start(config, shutdown).await?.wait().await;
    tracing::info!("TURN server stopped");
    Ok(())
}
