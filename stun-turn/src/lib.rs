//! floe STUN/TURN server: STUN Binding for everyone, TURN relay (RFC 8656)
//! for tenants whose plan allows it, metered per tenant and room.
//!
//! Protocol pieces are plain code fed with bytes ([`binding`],
//! [`framing`], `auth`, `allocation`, `policy`, `meter`); `core` is the
//! TURN state machine, fed inputs and the time, without I/O; `driver`
//! runs a core per shard on its sockets; `turn` is the server as the rest
//! of the process sees it; `server` and `report` are the socket and HTTP
//! edges. The
//! public API: [`Config`] / [`Settings`], [`start`] / [`run`] and the
//! running [`TurnServer`] handle.

mod allocation;
mod auth;
pub mod behavior;
pub mod binding;
mod config;
mod core;
pub mod data_dir;
pub mod discover;
mod driver;
pub mod framing;
mod meter;
mod metrics;
mod policy;
pub mod probe;
mod report;
mod secrets;
mod server;
mod tls;
mod turn;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use floe_common::{Health, Running, Shutdown};

pub use config::{Config, ConfigError, Settings, TlsSettings};
pub use meter::SpoolError;

/// Longest wait for unacknowledged usage at shutdown.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

/// Why the TURN server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    // Transparent: its message already names what failed, and a wrapper
    // that repeated it printed the cause twice in an error chain.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("HTTP client")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Discover(#[from] discover::DiscoverError),
}

/// A running TURN server. Dropping it starts a graceful stop.
pub struct TurnServer {
    listen: SocketAddr,
    discovery: Option<behavior::Addresses>,
    tls: Option<SocketAddr>,
    http: SocketAddr,
    server_id: String,
    running: Running,
}

impl TurnServer {
    /// Address of the STUN/TURN listener (UDP and TCP).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// NAT behaviour discovery's four addresses, when configured.
    pub fn discovery_addrs(&self) -> Option<behavior::Addresses> {
        self.discovery
    }

    /// Address of the TLS listener, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// Address of the ops HTTP endpoints.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The id this server's usage batches carry.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Drains (refuses new allocations, keeps relaying until they end or
    /// the drain deadline), flushes usage and stops.
    pub async fn stop(self) {
        self.running.stop().await;
    }

    /// Waits until the server has stopped (after shutdown fired).
    pub async fn wait(self) {
        self.running.wait().await;
    }
}

/// Starts serving; returns once every listener is bound.
pub async fn start(mut settings: Settings, shutdown: Shutdown) -> Result<TurnServer, StartError> {
    if let Some(server) = &settings.external_ip_stun {
        let local = settings
            .relay_ips
            .first()
            .copied()
            .unwrap_or(settings.listen.ip());
        let ip = discover::external_ip(local, server).await?;
        tracing::info!(%ip, relay = %local, stun = %server, "external address learned over STUN");
        settings.external_ip = Some(ip);
    }
    let shutdown = shutdown.child_token();
    let (lo, hi) = settings.relay_ports;
    let metrics = Arc::new(metrics::Metrics::new(
        settings.max_allocations,
        usize::from(hi.saturating_sub(lo)) + 1,
    ));
    let meter = Arc::new(meter::Meter::open(
        &settings.server_id,
        settings.data_dir.as_deref(),
    )?);
    let server_id = meter.server_id();
    let health = Health::new("turn");
    let serving = health.check("serving", true);
    let control = match (&settings.control_url, &settings.internal_token) {
        (Some(url), Some(token)) => Some(report::Control::new(
            url,
            token,
            settings.data_dir.as_deref(),
        )?),
        _ => None,
    };
    let control_ok = health.check("control_plane", control.is_none());
    let (udp, tcp) = server::bind_all(settings.listen, settings.udp_sockets).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot bind STUN/TURN (--listen) on {}: {e}",
                settings.listen
            ),
        )
    })?;
    let listen = tcp.local_addr()?;
    let discovery = match settings.alt {
        Some((ip, port)) => Some(server::Discovery::bind(listen, ip, port).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot bind NAT behaviour discovery (--alt-ip {ip}, --alt-port {port}): {e}"
                ),
            )
        })?),
        None => None,
    };
    let discovery_addrs = discovery.as_ref().map(|(a, _)| *a);
    let tls = match &settings.tls {
        Some(t) => {
            let acceptor = tls::acceptor(t)?;
            let listener =
                floe_common::http::bind("STUN/TURN over TLS (--tls-listen)", t.listen).await?;
            Some((listener, acceptor))
        }
        None => None,
    };
    let tls_addr = tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let http =
        floe_common::http::bind("TURN ops HTTP (--http-listen)", settings.http_listen).await?;
    let http_addr = http.local_addr()?;
    let drain = settings.drain;
    let shards_alive = health.vital("shards", true);
    let turn = Arc::new(turn::Turn::new(
        settings,
        metrics.clone(),
        meter,
        shards_alive,
    ));
    match &control {
        // Know who is cut off before the first allocation is served.
        Some(c) => report::prime(&turn, c, &control_ok).await,
        // No control plane: whoever the credentials admit.
        None => turn.apply_policy(policy::Policy::default()),
    }

    // Sockets and HTTP stop on `stop`, after the drain; the drain starts
    // on `shutdown`.
    let stop = Shutdown::new();
    let sockets = server::serve(turn.clone(), udp, tcp, tls, discovery, stop.clone())?;
    let router = floe_common::http::ops_router(metrics.registry.clone(), health)
        .fallback(floe_common::http::not_found);
    let http_task = floe_common::http::serve(http, router, stop.clone());
    if let Some(file) = turn.settings.secrets_file.clone() {
        tokio::spawn(secrets::reload(turn.clone(), file, stop.clone()));
    }
    let reporter_stop = Shutdown::new();
    let reporter = tokio::spawn(report::run(
        turn.clone(),
        control,
        control_ok,
        reporter_stop.clone(),
    ));
    tracing::info!(%listen, tls = ?tls_addr, http = %http_addr, server = %server_id, turn = turn.secrets().is_some(), discovery = ?discovery_addrs.map(|a| a.all()), "STUN/TURN server listening");

    let task = tokio::spawn({
        let (shutdown, turn) = (shutdown.clone(), turn.clone());
        async move {
            shutdown.cancelled().await;
            serving.set(false);
            turn.start_draining();
            let deadline = Instant::now() + drain;
            tracing::info!(
                allocations = turn.allocation_count(),
                ?drain,
                "draining: new allocations refused"
            );
            while turn.allocation_count() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            turn.close_all().await;
            reporter_stop.cancel();
            let _ = reporter.await;
            report::collect(&turn, floe_proto::time::unix_now()).await;
            final_flush(&turn).await;
            let (relayed_out, relayed_in) = turn.metrics.relayed_totals();
            tracing::info!(
                relayed_out,
                relayed_in,
                "stopped: relayed bytes metered since start"
            );
            stop.cancel();
            turn.stop().await;
            for t in sockets {
                let _ = t.await;
            }
            let _ = http_task.await;
        }
    });
    Ok(TurnServer {
        listen,
        discovery: discovery_addrs,
        tls: tls_addr,
        http: http_addr,
        server_id,
        running: Running::new(shutdown, task),
    })
}

/// Tries to deliver queued usage before exiting; what is left stays in
/// the spool (with a data folder) for the next start.
async fn final_flush(turn: &turn::Turn) {
    let (Some(url), Some(token)) = (&turn.settings.control_url, &turn.settings.internal_token)
    else {
        return;
    };
    let Ok(control) = report::Control::new(url, token, turn.settings.data_dir.as_deref()) else {
        return;
    };
    let deadline = Instant::now() + FINAL_FLUSH;
    while turn.meter.pending() > 0 && Instant::now() < deadline {
        if report::flush(turn, &control).await.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let left = turn.meter.pending();
    if left > 0 {
        if turn.settings.data_dir.is_some() {
            tracing::warn!(
                batches = left,
                "usage not acknowledged; kept in the spool for the next start"
            );
        } else {
            tracing::error!(
                batches = left,
                "usage not acknowledged and no --data-dir: it is lost"
            );
        }
    }
}

/// Runs until `shutdown` fires, then drains and stops.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    start(config.resolve()?, shutdown).await?.wait().await;
    tracing::info!("TURN server stopped");
    Ok(())
}
