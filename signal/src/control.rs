//! The control plane as signal sees it: API keys (to verify join tokens
//! locally), tenant plans, the change feed, and the policy ICE servers are
//! minted from ([`crate::ice`]).
//! Keys and plans are cached briefly so joins do not each cost a round trip;
//! the change feed ([`Control::changes`]) tells which entries to drop
//! early, so a disable or a revocation does not wait for the cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use floe_proto::api::{Changes, IcePolicy, KeyVerification, Tenant};

/// How long a fetched key or tenant is trusted.
const FRESH: Duration = Duration::from_secs(30);
/// How long a "not found" is trusted.
const NEGATIVE: Duration = Duration::from_secs(5);
/// Most cached entries of each kind.
const MAX_ENTRIES: usize = 100_000;

/// The control plane could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("control plane unavailable: {0}")]
pub(crate) struct Unavailable(pub String);

type Cache<T> = Mutex<HashMap<String, (Instant, Option<T>)>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Client of the control plane's internal API.
pub(crate) struct Control {
    http: reqwest::Client,
    base: String,
    token: String,
    keys: Cache<KeyVerification>,
    tenants: Cache<Tenant>,
}

impl Control {
    pub fn new(base: &str, token: &str) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                // A join burst opens a connection per concurrent request;
                // without a cap every one of them stayed pooled, idle,
                // with its buffers (about 0.8 KiB each).
                .pool_max_idle_per_host(32)
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            keys: Mutex::default(),
            tenants: Mutex::default(),
        })
    }

    async fn cached<T: serde::de::DeserializeOwned + Clone>(
        &self,
        cache: &Cache<T>,
        id: &str,
        path: String,
    ) -> Result<Option<T>, Unavailable> {
        if let Some((at, v)) = lock(cache).get(id) {
            let ttl = if v.is_some() { FRESH } else { NEGATIVE };
            if at.elapsed() < ttl {
                return Ok(v.clone());
            }
        }
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        let value = match resp.status().as_u16() {
            200 => Some(
                resp.json::<T>()
                    .await
                    .map_err(|e| Unavailable(e.to_string()))?,
            ),
            404 => None,
            s => return Err(Unavailable(format!("answered {s}"))),
        };
        let mut c = lock(cache);
        if c.len() >= MAX_ENTRIES {
            c.retain(|_, (at, _)| at.elapsed() < FRESH);
        }
        c.insert(id.to_owned(), (Instant::now(), value.clone()));
        Ok(value)
    }

    /// Drops the cached tenant `id` and every cached key of it.
    pub fn forget_tenant(&self, id: &str) {
        lock(&self.tenants).remove(id);
        lock(&self.keys).retain(|_, (_, k)| k.as_ref().is_some_and(|k| k.tenant != id));
    }

    /// Drops the cached key `kid`.
    pub fn forget_key(&self, kid: &str) {
        lock(&self.keys).remove(kid);
    }

    /// Drops every cached tenant and key.
    pub fn forget_all(&self) {
        lock(&self.tenants).clear();
        lock(&self.keys).clear();
    }

    /// The control plane's change feed after `after`.
    pub async fn changes(&self, after: u64) -> Result<Changes, Unavailable> {
        let url = format!("{}/internal/v1/changes?after={after}", self.base);
        self.answer("changes", self.http.get(url)).await
    }

    /// Sends an internal request; its JSON answer, or why there is none.
    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, Unavailable> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(Unavailable(format!("{what}: answered {}", resp.status())));
        }
        resp.json().await.map_err(|e| Unavailable(e.to_string()))
    }

    /// The API key `kid`, with its tenant's plan; `None` if unknown or revoked.
    pub async fn key(&self, kid: &str) -> Result<Option<KeyVerification>, Unavailable> {
        self.cached(&self.keys, kid, format!("/internal/v1/keys/{kid}"))
            .await
    }

    /// The tenant `id`; `None` if unknown.
    pub async fn tenant(&self, id: &str) -> Result<Option<Tenant>, Unavailable> {
        self.cached(&self.tenants, id, format!("/internal/v1/tenants/{id}"))
            .await
    }

    /// What this node mints ICE servers from.
    pub async fn ice_policy(&self) -> Result<IcePolicy, Unavailable> {
        let url = format!("{}/internal/v1/ice-policy", self.base);
        self.answer("ICE policy", self.http.get(url)).await
    }
}
