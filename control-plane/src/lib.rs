//! floe control plane: tenants and plans, API keys, join tokens, TURN
//! credentials, the exactly-once usage ledger and quota enforcement.
//!
//! The public API is small: [`Config`] (flags), [`start`] / [`run`], the
//! running [`ControlPlane`] handle, and the operator [`cli`].

mod api;
pub mod cli;
mod config;
mod enforcement;
mod error;
mod metrics;
pub mod store;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use floe_common::{Health, Running, Shutdown};
use floe_proto::api::{CreatedApiKey, Plan, Tenant};

pub use config::{Config, ConfigError, Settings, StoreLocation};
pub use error::ControlError;

use api::App;
use store::{Store, StoreError};

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("store")]
    Store(#[from] StoreError),
    // Transparent: its message already names what failed, and a wrapper
    // that repeated it printed the cause twice in an error chain.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A running control plane. Dropping it shuts it down.
pub struct ControlPlane {
    addr: SocketAddr,
    app: Arc<App>,
    running: Running,
}

impl ControlPlane {
    /// Address of the HTTP API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL of the HTTP API (`http://addr`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the server has stopped (after shutdown fired).
    pub async fn wait(self) {
        self.running.wait().await;
    }

    /// Returns the tenant `id`, creating it with `plan` and one API key the
    /// first time. Used by `floe dev` to bootstrap a usable tenant.
    pub async fn ensure_tenant(
        &self,
        id: &str,
        name: &str,
        plan: Plan,
    ) -> Result<(Tenant, CreatedApiKey), ControlError> {
        let store = &self.app.store;
        let tenant = match store.get_tenant(id).await? {
            Some(t) => t,
            None => {
                let t = Tenant {
                    id: id.to_owned(),
                    name: name.to_owned(),
                    plan,
                    disabled: false,
                    webhook_url: None,
                    webhook_secret: None,
                    created_at: floe_proto::time::unix_now(),
                };
                store.create_tenant(&t).await?;
                self.app
                    .tenant_changed(id, floe_proto::time::unix_now())
                    .await?;
                t
            }
        };
        let key = match store.list_keys(id).await?.into_iter().find(|k| !k.revoked) {
            Some(k) => CreatedApiKey {
                id: k.id,
                tenant: k.tenant,
                secret: k.secret,
            },
            None => api::new_key(&self.app, id).await?,
        };
        Ok((tenant, key))
    }
}

/// Opens the store that `settings` names.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &settings.store {
        StoreLocation::Embedded(path) => Arc::new(store::embedded::EmbeddedStore::open(path)?),
        StoreLocation::Redis(redis) => {
            let replicas = settings
                .store_replicas
                .unwrap_or(u32::from(redis.is_sentinel()));
            Arc::new(
                store::redis::RedisStore::connect(redis, &settings.redis_prefix, replicas).await?,
            )
        }
    })
}

/// Starts serving; returns once the listener is bound.
pub async fn start(settings: Settings, shutdown: Shutdown) -> Result<ControlPlane, StartError> {
    let store = open_store(&settings).await?;
    let metrics = Arc::new(metrics::Metrics::new());
    let health = Health::new("control-plane");
    let store_ok = health.check("store", true);
    let listener = floe_common::http::bind("control-plane API (--listen)", settings.listen).await?;
    let addr = listener.local_addr()?;
    let app = Arc::new(App::new(settings, store.clone(), metrics.clone()));
    let router = api::router(app.clone())
        .merge(floe_common::http::ops_router(
            metrics.registry.clone(),
            health.clone(),
        ))
        .fallback(floe_common::http::not_found);
    let shutdown = shutdown.child_token();
    let server = floe_common::http::serve(listener, router, shutdown.clone());
    tokio::spawn(watch_store(
        store.clone(),
        metrics.clone(),
        store_ok,
        shutdown.clone(),
    ));
    tokio::spawn(api::refresh_policy(app.clone(), shutdown.clone()));
    tokio::spawn(webhooks::deliver(
        store,
        metrics,
        app.webhooks.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%addr, "control plane listening");
    Ok(ControlPlane {
        addr,
        app,
        running: Running::new(shutdown, server),
    })
}

/// Runs until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), StartError> {
    let cp = start(config.resolve()?, shutdown).await?;
    cp.wait().await;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Keeps the `store` readiness check and its switch count current.
async fn watch_store(
    store: Arc<dyn Store>,
    metrics: Arc<metrics::Metrics>,
    ok: floe_common::Check,
    shutdown: Shutdown,
) {
    loop {
        let (switches, counted) = (store.switches(), metrics.store_switches.get());
        if switches > counted {
            metrics.store_switches.inc_by(switches - counted);
        }
        let healthy = match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "store unreachable");
                false
            }
            Err(_) => {
                tracing::warn!("store ping timed out");
                false
            }
        };
        ok.set(healthy);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
