//! floe signaling: rooms, presence and offer/answer/candidate relay over
//! WebSocket, scaled out through a Redis room bus.
//!
//! Room rules live in [`room`] as plain functions; [`hub`] holds this
//! node's sockets; [`bus`] shares rooms between nodes; [`state`] is the
//! node's shared state and access checks; [`ws`] and [`api`] are the
//! network edges; [`revoke`] follows the control plane's change feed. The
//! public API: [`Config`] / [`Settings`], [`start`] / [`run`] and the
//! running [`Signal`] handle.

mod api;
mod app;
mod bus;
mod config;
mod control;
mod error;
mod hub;
mod ice;
mod metrics;
mod revoke;
mod room;
mod state;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Method, header};
use floe_common::{Check, Health, Running, Shutdown};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use config::{Config, ConfigError, Settings};

/// Longest wait for connections to close during a drain.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// Why the signal node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    // Transparent: its message already names what failed, and a wrapper
    // that repeated it printed the cause twice in an error chain.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("HTTP client")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Bus(String),
}

/// A running signal node. Dropping it shuts it down (draining first).
pub struct Signal {
    addr: SocketAddr,
    ops_addr: SocketAddr,
    node_id: String,
    running: Running,
}

impl Signal {
    /// Address of the HTTP/WebSocket API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Address of the ops endpoints (/metrics, /healthz, /readyz).
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// This node's id on the room bus.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Starts a graceful drain and waits until the node has stopped.
    pub async fn stop(self) {
        self.running.stop().await;
    }

    /// Waits until the node has stopped (after shutdown fired).
    pub async fn wait(self) {
        self.running.wait().await;
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600))
}

/// How old the ICE policy may grow (polls failing) before TURN is
/// withheld from new joins: a minute, or five polls if those are slower.
fn ice_policy_max_age(poll: std::time::Duration) -> std::time::Duration {
    (poll * 5).max(std::time::Duration::from_secs(60))
}

/// Starts serving; returns once the listener is bound.
pub async fn start(settings: Settings, shutdown: Shutdown) -> Result<Signal, StartError> {
    let shutdown = shutdown.child_token();
    // Stops the HTTP server and the bus tasks, after the drain.
    let stop = Shutdown::new();
    let draining = Shutdown::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let health = Health::new("signal");
    let serving = health.check("serving", true);
    let control_ok = health.check("control_plane", false);
    let hub = Arc::new(hub::Hub::new());
    let bus: Arc<dyn bus::Bus> = match &settings.redis {
        Some(redis) => bus::redis::RedisBus::start(
            &settings,
            redis,
            hub.clone(),
            metrics.clone(),
            &health,
            stop.clone(),
        )
        .await
        .map_err(|e| StartError::Bus(e.to_string()))?,
        None => Arc::new(bus::local::LocalBus::new(hub.clone())),
    };
    let control = control::Control::new(&settings.control_url, &settings.internal_token)?;
    let listener = floe_common::http::bind("signal API (--listen)", settings.listen).await?;
    let addr = listener.local_addr()?;
    let ops_listener =
        floe_common::http::bind("signal ops (--ops-listen)", settings.ops_listen).await?;
    let ops_addr = ops_listener.local_addr()?;
    let node_id = settings.node_id.clone();
    let per_min = f64::from(settings.public_rooms_per_min.max(1));
    let app = Arc::new(state::App {
        settings: settings.clone(),
        bus,
        hub: hub.clone(),
        control,
        ice: ice::Ice::new(ice_policy_max_age(settings.changes_poll)),
        metrics: metrics.clone(),
        draining: draining.clone(),
        create_limiter: std::sync::Mutex::new(floe_common::ratelimit::RateLimiter::new(
            per_min / 60.0,
            settings.public_rooms_per_min.max(1),
            100_000,
        )),
    });
    // The public port answers health checks (load balancers probe it) but
    // not /metrics, which names tenants.
    let mut public = api::router(app.clone())
        .layer(cors(&settings.allowed_origins))
        .merge(floe_common::http::probe_router(health.clone()));
    if let Some(tenant) = &settings.app_tenant {
        public = public.merge(app::router(tenant));
    }
    let router = floe_common::http::json_errors(public);
    let ops = floe_common::http::ops_router(metrics.registry.clone(), health);
    let server = floe_common::http::serve(listener, router, stop.clone());
    let ops_server = floe_common::http::serve(
        ops_listener,
        floe_common::http::json_errors(ops),
        stop.clone(),
    );
    tokio::spawn(watch_control_plane(
        settings.control_url.clone(),
        control_ok,
        stop.clone(),
    ));
    tokio::spawn(close_expired_rooms(app.clone(), stop.clone()));
    tokio::spawn(revoke::follow_changes(app.clone(), stop.clone()));
    tracing::info!(%addr, %ops_addr, node = %node_id, bus = if settings.redis.is_some() { "redis" } else { "local" }, "signal node listening");

    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("draining: closing connections so peers reconnect elsewhere");
            serving.set(false);
            draining.cancel();
            let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
            while hub.counts().1 > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Let departures reach the bus before it stops.
            while metrics.connections.get() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.cancel();
            let _ = server.await;
            let _ = ops_server.await;
        }
    });
    Ok(Signal {
        addr,
        ops_addr,
        node_id,
        running: Running::new(shutdown, task),
    })
}

/// Runs until `shutdown` fires, then drains.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    start(config.resolve()?, shutdown).await?.wait().await;
    tracing::info!("signal node stopped");
    Ok(())
}

/// Closes this node's connections in rooms whose time is up.
async fn close_expired_rooms(app: Arc<state::App>, stop: Shutdown) {
    let closed = bus::room_closed("expired");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for room in app.hub.expired(floe_proto::time::unix_now()) {
            app.hub.close_room(
                &room,
                Some(&closed),
                hub::close::ROOM_CLOSED,
                "room expired",
            );
        }
    }
}

/// Keeps the `control_plane` readiness check current.
async fn watch_control_plane(control_url: String, ok: Check, stop: Shutdown) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build an HTTP client");
            return;
        }
    };
    let url = format!("{control_url}/healthz");
    loop {
        let reachable = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
        if reachable != ok.get() {
            tracing::info!(reachable, "control plane reachability changed");
        }
        ok.set(reachable);
        let pause = if reachable { 5 } else { 1 };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
        }
    }
}
