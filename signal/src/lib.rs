//! floe signaling: rooms, presence and offer/answer relay over WebSocket.
//!
//! The public API: [`Config`], [`start`] / [`run`] and the running
//! [`Signal`] handle.

mod config;

use std::net::SocketAddr;
use std::time::Duration;

use floe_common::{Check, Health, Shutdown};
use prometheus::Registry;

pub use config::{Config, ConfigError, Settings};

/// Why the signal node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// A running signal node. Dropping it shuts it down.
pub struct Signal {
    addr: SocketAddr,
    shutdown: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Signal {
    /// Address of the HTTP/WebSocket API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the node has stopped (after shutdown fired).
    pub async fn wait(mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts serving; returns once the listener is bound.
pub async fn start(settings: Settings, shutdown: Shutdown) -> Result<Signal, StartError> {
    let shutdown = shutdown.child_token();
    let registry = Registry::new();
    let health = Health::new();
    let control_ok = health.check("control_plane", false);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let listener = floe_common::http::bind("signal API", settings.listen).await?;
    let addr = listener.local_addr()?;
    let router =
        floe_common::http::ops_router(registry, health).fallback(floe_common::http::not_found);
    let tasks = vec![
        floe_common::http::serve(listener, router, shutdown.clone()),
        tokio::spawn(watch_control_plane(
            http,
            settings.control_url.clone(),
            control_ok,
            shutdown.clone(),
        )),
    ];
    tracing::info!(%addr, "signal node listening");
    Ok(Signal {
        addr,
        shutdown,
        tasks,
    })
}

/// Runs until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    start(config.resolve()?, shutdown).await?.wait().await;
    tracing::info!("signal node stopped");
    Ok(())
}

/// Keeps the `control_plane` readiness check current.
async fn watch_control_plane(
    http: reqwest::Client,
    control_url: String,
    ok: Check,
    shutdown: Shutdown,
) {
    let url = format!("{control_url}/healthz");
    loop {
        let reachable = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
        if reachable != ok.get() {
            tracing::info!(reachable, "control plane reachability changed");
        }
        ok.set(reachable);
        let pause = if reachable { 5 } else { 1 };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
        }
    }
}
