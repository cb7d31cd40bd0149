//! The control plane's HTTP API: admin routes (bearer admin token), tenant
//! routes (API key, HTTP Basic `key_id:secret`), and internal routes for
//! signal and TURN (bearer internal token).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use floe_common::http::{JsonBody, basic, bearer, secret_eq};
use floe_common::ratelimit::RateLimiter;
use floe_proto::api::{
    ApiKey, Changes, CreateTenant, CreatedApiKey, IcePolicy, IceServers, KeyVerification,
    MintToken, MintedToken, Tenant, TurnCredentialsRequest, UpdateTenant,
};
use floe_proto::credential::IceSource;
use floe_proto::id;
use floe_proto::time::{Date, unix_now};
use floe_proto::token::{self, JoinClaims};
use floe_proto::usage::{Enforcement, MAX_BATCH_RECORDS, Revocation, UsageAck, UsageBatch};
use serde::Deserialize;

use crate::config::Settings;
use crate::enforcement::Snapshot;
use crate::error::ControlError;
use crate::metrics::Metrics;
use crate::store::{KeyRecord, Store, UsageReport};

type Result<T> = std::result::Result<T, ControlError>;

/// Body limit of ordinary requests.
const BODY_LIMIT: usize = 64 * 1024;
/// Body limit of usage batches.
const USAGE_BODY_LIMIT: usize = 4 * 1024 * 1024;
/// Longest TURN credential lifetime any plan may allow (a day, as with
/// join tokens: a revocation must outlive every credential it covers).
const MAX_CREDENTIAL_TTL_SECS: u64 = 86_400;
/// Longest usage report, in days.
const MAX_REPORT_DAYS: usize = 400;

/// Shared state of every handler.
pub(crate) struct App {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Wakes the webhook deliverer when events are queued.
    pub webhooks: Arc<tokio::sync::Notify>,
    limiter: Mutex<RateLimiter<IpAddr>>,
    /// What acks and credential requests read instead of the store.
    policy: Mutex<PolicyState>,
    /// One rebuild of `policy` at a time.
    rebuilding: tokio::sync::Mutex<()>,
}

impl App {
    pub fn new(settings: Settings, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        let burst = (settings.api_rate * 2.0).clamp(1.0, 10_000.0) as u32;
        let limiter = Mutex::new(RateLimiter::new(settings.api_rate, burst, 100_000));
        Self {
            settings,
            store,
            metrics,
            webhooks: Arc::new(tokio::sync::Notify::new()),
            limiter,
            policy: Mutex::default(),
            rebuilding: tokio::sync::Mutex::new(()),
        }
    }

    /// Times a store operation into `floe_control_store_seconds{op}`.
    async fn timed<T>(&self, op: &str, fut: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = fut.await;
        self.metrics
            .store_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        out
    }

    fn require_admin(&self, headers: &HeaderMap) -> Result<()> {
        match bearer(headers) {
            Some(t) if secret_eq(t, &self.settings.admin_token) => Ok(()),
            _ => Err(ControlError::Unauthorized),
        }
    }

    fn require_internal(&self, headers: &HeaderMap) -> Result<()> {
        match bearer(headers) {
            Some(t) if secret_eq(t, &self.settings.internal_token) => Ok(()),
            _ => Err(ControlError::Unauthorized),
        }
    }

    /// Puts a change that may take access away on the feed that signal
    /// nodes poll, so they act on it within a poll interval.
    async fn changed(&self, tenant: &str, key: Option<&str>) -> Result<()> {
        self.timed("record_change", self.store.record_change(tenant, key))
            .await?;
        if key.is_none() {
            self.tenant_changed(tenant, unix_now()).await?;
        }
        Ok(())
    }

    /// The live API key presented as HTTP Basic `key_id:secret`.
    async fn tenant_key(&self, headers: &HeaderMap) -> Result<KeyRecord> {
        let (kid, secret) = basic(headers).ok_or(ControlError::Unauthorized)?;
        id::validate("key id", &kid).map_err(|_| ControlError::Unauthorized)?;
        let key = self
            .timed("get_key", self.store.get_key(&kid))
            .await?
            .ok_or(ControlError::Unauthorized)?;
        if key.revoked || !secret_eq(&secret, &key.secret) {
            return Err(ControlError::Unauthorized);
        }
        Ok(key)
    }

    /// Admin, or an API key of `tenant`.
    async fn admin_or_tenant(&self, headers: &HeaderMap, tenant: &str) -> Result<()> {
        if self.require_admin(headers).is_ok() {
            return Ok(());
        }
        let key = self.tenant_key(headers).await?;
        if key.tenant != tenant {
            return Err(ControlError::Forbidden(
                "this API key belongs to another tenant".into(),
            ));
        }
        Ok(())
    }

    async fn tenant(&self, id: &str) -> Result<Tenant> {
        self.timed("get_tenant", self.store.get_tenant(id))
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("tenant {id}")))
    }

    /// Why (tenant, room, peer) gets no TURN credentials now, if it does not.
    async fn turn_refusal(
        &self,
        tenant: &str,
        room: &str,
        peer: &str,
        now: u64,
    ) -> Result<Option<&'static str>> {
        if self.settings.turn_urls.is_empty() || self.settings.turn_secrets.is_none() {
            return Ok(Some("turn_not_configured"));
        }
        self.enforcement(now).await?;
        let policy = lock(&self.policy);
        Ok(policy
            .snapshot
            .as_ref()
            .and_then(|s| s.refusal(tenant, room, peer)))
    }

    /// The enforcement state over every tenant, as of `now`: the in-memory
    /// snapshot, built from the store on first use and at a month's start.
    pub async fn enforcement(&self, now: u64) -> Result<Arc<Enforcement>> {
        let month = Date::from_unix(now).month_key();
        loop {
            if let Some(s) = lock(&self.policy)
                .snapshot
                .as_ref()
                .filter(|s| s.month == month)
            {
                return Ok(s.enforcement());
            }
            self.rebuild_policy(now).await?;
        }
    }

    /// Rebuilds the enforcement snapshot from the store (on a tick, so
    /// changes made through other replicas arrive). Edits made through
    /// this replica while it reads are kept.
    async fn rebuild_policy(&self, now: u64) -> Result<()> {
        let _one = self.rebuilding.lock().await;
        {
            let mut p = lock(&self.policy);
            p.rebuilding = true;
            p.touched.clear();
            p.revocations_touched = false;
        }
        let fresh = self.read_policy(now).await;
        let mut p = lock(&self.policy);
        p.rebuilding = false;
        let fresh = fresh?;
        let snapshot = match &p.snapshot {
            Some(old) => old.merge_rebuild(fresh, &p.touched, p.revocations_touched),
            None => fresh,
        };
        self.metrics
            .tenants_over_quota
            .set(snapshot.over_quota() as i64);
        p.snapshot = Some(snapshot);
        Ok(())
    }

    async fn read_policy(&self, now: u64) -> Result<Snapshot> {
        let month = Date::from_unix(now).month_key();
        let tenants = self
            .timed("list_tenants", self.store.list_tenants())
            .await?;
        let ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
        let bytes = self
            .timed(
                "month_bytes_many",
                self.store.month_bytes_many(&ids, &month),
            )
            .await?;
        let revocations = self
            .timed("revocations", self.store.revocations(now))
            .await?;
        Ok(Snapshot::new(
            month,
            tenants.into_iter().zip(bytes),
            revocations,
        ))
    }

    /// Applies an edit to the snapshot, if there is one yet, and marks it
    /// so that a rebuild in progress keeps it.
    fn edit_policy(&self, tenant: Option<&str>, edit: impl FnOnce(&mut Snapshot)) {
        let mut p = lock(&self.policy);
        let Some(snapshot) = p.snapshot.as_mut() else {
            return;
        };
        edit(snapshot);
        let over = snapshot.over_quota();
        if p.rebuilding {
            match tenant {
                Some(t) => p.touched.insert(t.to_owned()),
                None => std::mem::replace(&mut p.revocations_touched, true),
            };
        }
        self.metrics.tenants_over_quota.set(over as i64);
    }

    /// Re-reads one tenant into the snapshot after it changed here.
    pub(crate) async fn tenant_changed(&self, id: &str, now: u64) -> Result<()> {
        let month = Date::from_unix(now).month_key();
        let entry = match self.timed("get_tenant", self.store.get_tenant(id)).await? {
            Some(t) => {
                let bytes = self
                    .timed("month_bytes", self.store.month_bytes(id, &month))
                    .await?;
                Some((t, bytes))
            }
            None => None,
        };
        self.edit_policy(Some(id), |s| s.set_tenant(id, entry));
        Ok(())
    }

    /// Re-reads the month's bytes of tenants a usage batch just counted.
    /// Not marked for a rebuild in progress: bytes only grow within a
    /// month, and the merge keeps the larger count.
    async fn bytes_changed(&self, tenants: Vec<String>, now: u64) -> Result<()> {
        let month = Date::from_unix(now).month_key();
        let bytes = self
            .timed(
                "month_bytes_many",
                self.store.month_bytes_many(&tenants, &month),
            )
            .await?;
        let mut p = lock(&self.policy);
        if let Some(s) = p.snapshot.as_mut().filter(|s| s.month == month) {
            s.set_bytes(tenants.into_iter().zip(bytes));
            self.metrics.tenants_over_quota.set(s.over_quota() as i64);
        }
        Ok(())
    }

    /// Re-reads the revocations after one was added here.
    async fn revocations_changed(&self, now: u64) -> Result<()> {
        let revocations = self
            .timed("revocations", self.store.revocations(now))
            .await?;
        self.edit_policy(None, |s| s.set_revocations(revocations));
        Ok(())
    }
}

/// The enforcement snapshot and what a rebuild in progress must keep.
#[derive(Default)]
struct PolicyState {
    snapshot: Option<Snapshot>,
    rebuilding: bool,
    /// Tenants edited since the rebuild in progress started.
    touched: HashSet<String>,
    revocations_touched: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rebuilds the enforcement snapshot every `--enforcement-refresh-ms`.
pub(crate) async fn refresh_policy(app: Arc<App>, stop: floe_common::Shutdown) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(app.settings.enforcement_refresh) => {}
        }
        if let Err(e) = app.rebuild_policy(unix_now()).await {
            tracing::warn!(error = %e, "cannot rebuild the enforcement state; keeping the last one");
        }
    }
}

/// The public routes, each path once: the OpenAPI document
/// (`openapi.json`, served at `/v1/openapi.json`) describes exactly these
/// and the ops routes, which a test keeps true.
fn public_routes() -> Vec<(&'static str, MethodRouter<Arc<App>>)> {
    vec![
        ("/v1/tenants", post(create_tenant).get(list_tenants)),
        (
            "/v1/tenants/{id}",
            get(get_tenant).patch(update_tenant).delete(delete_tenant),
        ),
        ("/v1/tenants/{id}/keys", post(create_key).get(list_keys)),
        ("/v1/tenants/{id}/keys/{kid}", delete(revoke_key)),
        ("/v1/tenants/{id}/usage", get(usage)),
        ("/v1/revocations", post(revoke)),
        ("/v1/tokens", post(mint_token)),
        ("/v1/ice-servers", post(ice_servers)),
        ("/v1/openapi.json", get(openapi)),
    ]
}

/// The OpenAPI 3.1 document of the public API.
const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The routes of the control plane (without the ops routes).
pub(crate) fn router(app: Arc<App>) -> Router {
    let public = public_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods))
        .layer(middleware::from_fn_with_state(app.clone(), rate_limit))
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    let internal = Router::new()
        .route("/internal/v1/keys/{kid}", get(key_for_verification))
        .route("/internal/v1/tenants/{id}", get(tenant_for_service))
        .route("/internal/v1/ice-policy", get(ice_policy))
        .route("/internal/v1/enforcement", get(get_enforcement))
        .route("/internal/v1/changes", get(changes))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .route(
            "/internal/v1/usage",
            post(apply_usage).layer(DefaultBodyLimit::max(USAGE_BODY_LIMIT)),
        );
    public.merge(internal).with_state(app)
}

async fn rate_limit(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let now = Instant::now();
    let (allowed, retry) = {
        let mut limiter = app.limiter.lock().unwrap_or_else(|e| e.into_inner());
        let ip = app.settings.trusted_proxies.client_ip(peer, req.headers());
        let allowed = limiter.allow(&ip, now);
        (allowed, limiter.retry_after(&ip, now))
    };
    if allowed {
        return next.run(req).await;
    }
    let mut resp = ControlError::RateLimited.into_response();
    if let Ok(v) = header::HeaderValue::from_str(&retry.as_secs().max(1).to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn validate_plan(plan: &floe_proto::api::Plan) -> Result<()> {
    if plan
        .max_credential_ttl_secs
        .is_some_and(|t| !(60..=MAX_CREDENTIAL_TTL_SECS).contains(&t))
    {
        return Err(ControlError::Invalid(format!(
            "plan.max_credential_ttl_secs must be between 60 and {MAX_CREDENTIAL_TTL_SECS}"
        )));
    }
    if plan.max_peers_per_room == Some(0) || plan.max_peers_per_room.is_some_and(|p| p > 1_000) {
        return Err(ControlError::Invalid(
            "plan.max_peers_per_room must be between 1 and 1000".into(),
        ));
    }
    if plan.max_bitrate_bps.is_some_and(|b| b < 8_000) {
        return Err(ControlError::Invalid(
            "plan.max_bitrate_bps must be at least 8000".into(),
        ));
    }
    Ok(())
}

fn validate_webhook(url: &str) -> Result<()> {
    if (url.starts_with("http://") || url.starts_with("https://")) && url.len() <= 2048 {
        Ok(())
    } else {
        Err(ControlError::Invalid(
            "webhook_url must be an http(s) URL of at most 2048 characters".into(),
        ))
    }
}

fn validate_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 200 {
        return Err(ControlError::Invalid(
            "name must be 1 to 200 characters".into(),
        ));
    }
    Ok(())
}

async fn create_tenant(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>)> {
    app.require_admin(&headers)?;
    let id = match req.id {
        Some(id) => id,
        None => format!("t_{}", floe_common::secret::random_token(6)),
    };
    id::validate("tenant id", &id)?;
    validate_name(&req.name)?;
    validate_plan(&req.plan)?;
    if let Some(url) = &req.webhook_url {
        validate_webhook(url)?;
    }
    let tenant = Tenant {
        id,
        name: req.name,
        plan: req.plan,
        disabled: false,
        webhook_secret: req
            .webhook_url
            .as_ref()
            .map(|_| floe_common::secret::random_token(32)),
        webhook_url: req.webhook_url,
        created_at: unix_now(),
    };
    app.timed("create_tenant", app.store.create_tenant(&tenant))
        .await?;
    app.tenant_changed(&tenant.id, unix_now()).await?;
    tracing::info!(tenant = %tenant.id, "tenant created");
    Ok((StatusCode::CREATED, Json(tenant)))
}

async fn list_tenants(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Vec<Tenant>>> {
    app.require_admin(&headers)?;
    let mut tenants = app.timed("list_tenants", app.store.list_tenants()).await?;
    tenants.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(tenants))
}

async fn get_tenant(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Tenant>> {
    app.admin_or_tenant(&headers, &id).await?;
    Ok(Json(app.tenant(&id).await?))
}

async fn update_tenant(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateTenant>,
) -> Result<Json<Tenant>> {
    app.require_admin(&headers)?;
    let mut tenant = app.tenant(&id).await?;
    if let Some(name) = req.name {
        validate_name(&name)?;
        tenant.name = name;
    }
    if let Some(plan) = req.plan {
        validate_plan(&plan)?;
        tenant.plan = plan;
    }
    if let Some(disabled) = req.disabled {
        tenant.disabled = disabled;
    }
    match req.webhook_url.as_deref() {
        Some("") => {
            tenant.webhook_url = None;
            tenant.webhook_secret = None;
        }
        Some(url) => {
            validate_webhook(url)?;
            tenant.webhook_url = Some(url.to_owned());
            tenant
                .webhook_secret
                .get_or_insert_with(|| floe_common::secret::random_token(32));
        }
        None => {}
    }
    app.timed("put_tenant", app.store.put_tenant(&tenant))
        .await?;
    app.changed(&tenant.id, None).await?;
    tracing::info!(tenant = %tenant.id, disabled = tenant.disabled, "tenant updated");
    Ok(Json(tenant))
}

async fn delete_tenant(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.require_admin(&headers)?;
    if app
        .timed("delete_tenant", app.store.delete_tenant(&id))
        .await?
    {
        app.changed(&id, None).await?;
        tracing::info!(tenant = %id, "tenant deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ControlError::NotFound(format!("tenant {id}")))
    }
}

/// Creates an API key for `tenant`; the secret is in the answer only.
pub(crate) async fn new_key(app: &App, tenant: &str) -> Result<CreatedApiKey> {
    let key = KeyRecord {
        id: format!("k_{}", floe_common::secret::random_token(8)),
        tenant: tenant.to_owned(),
        secret: floe_common::secret::random_token(32),
        created_at: unix_now(),
        revoked: false,
    };
    app.timed("create_key", app.store.create_key(&key)).await?;
    tracing::info!(tenant = %tenant, key = %key.id, "API key created");
    Ok(CreatedApiKey {
        id: key.id,
        tenant: key.tenant,
        secret: key.secret,
    })
}

async fn create_key(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<CreatedApiKey>)> {
    app.require_admin(&headers)?;
    app.tenant(&id).await?;
    Ok((StatusCode::CREATED, Json(new_key(&app, &id).await?)))
}

async fn list_keys(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Vec<ApiKey>>> {
    app.require_admin(&headers)?;
    app.tenant(&id).await?;
    let keys = app.timed("list_keys", app.store.list_keys(&id)).await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| ApiKey {
                id: k.id,
                tenant: k.tenant,
                created_at: k.created_at,
                revoked: k.revoked,
            })
            .collect(),
    ))
}

async fn revoke_key(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, kid)): Path<(String, String)>,
) -> Result<StatusCode> {
    app.require_admin(&headers)?;
    match app.timed("get_key", app.store.get_key(&kid)).await? {
        Some(k) if k.tenant == id => {
            app.timed("revoke_key", app.store.revoke_key(&kid)).await?;
            app.changed(&id, Some(&kid)).await?;
            tracing::info!(tenant = %id, key = %kid, "API key revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(ControlError::NotFound(format!("key {kid} of tenant {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn usage(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<UsageReport>> {
    app.admin_or_tenant(&headers, &id).await?;
    let today = Date::from_unix(unix_now());
    let parse = |s: Option<String>, default: Date| -> Result<Date> {
        match s {
            None => Ok(default),
            Some(s) => Date::parse_day(&s)
                .ok_or_else(|| ControlError::Invalid(format!("{s:?} is not a YYYY-MM-DD date"))),
        }
    };
    let from = parse(q.from, Date { day: 1, ..today })?;
    let to = parse(q.to, today)?;
    if to < from {
        return Err(ControlError::Invalid("`to` is before `from`".into()));
    }
    if from.days_through(&to, MAX_REPORT_DAYS + 1).len() > MAX_REPORT_DAYS {
        return Err(ControlError::Invalid(format!(
            "a report spans at most {MAX_REPORT_DAYS} days"
        )));
    }
    let report = app
        .timed(
            "usage",
            app.store.usage(&id, &from.day_key(), &to.day_key()),
        )
        .await?;
    Ok(Json(report))
}

/// Body of `POST /v1/revocations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    tenant: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    peer: Option<String>,
}

async fn revoke(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<RevokeRequest>,
) -> Result<(StatusCode, Json<Revocation>)> {
    id::validate("tenant", &req.tenant)?;
    app.admin_or_tenant(&headers, &req.tenant).await?;
    if let Some(room) = &req.room {
        id::validate("room", room)?;
    }
    if let Some(peer) = &req.peer {
        id::validate("peer", peer)?;
    }
    // Every credential issued before now expires within the longest
    // lifetime any plan allows (plans may change, so not the current
    // plan's), so the revocation need not outlive that.
    let revocation = Revocation {
        tenant: req.tenant,
        room: req.room,
        peer: req.peer,
        until: unix_now() + MAX_CREDENTIAL_TTL_SECS,
    };
    app.timed("add_revocation", app.store.add_revocation(&revocation))
        .await?;
    app.revocations_changed(unix_now()).await?;
    tracing::info!(tenant = %revocation.tenant, room = ?revocation.room, peer = ?revocation.peer, "TURN access revoked");
    Ok((StatusCode::CREATED, Json(revocation)))
}

async fn mint_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<MintToken>,
) -> Result<Json<MintedToken>> {
    let key = app.tenant_key(&headers).await?;
    if app.tenant(&key.tenant).await?.disabled {
        return Err(ControlError::TenantDisabled);
    }
    id::validate("peer", &req.peer)?;
    if let Some(room) = &req.room {
        id::validate("room", room)?;
    }
    if !req.grants.create && !req.grants.join {
        return Err(ControlError::Invalid(
            "grants must allow create, join or both".into(),
        ));
    }
    let now = unix_now();
    let ttl = req.ttl_secs.unwrap_or(3_600);
    if ttl == 0 || ttl > app.settings.max_token_ttl_secs {
        return Err(ControlError::Invalid(format!(
            "ttl_secs must be between 1 and {}",
            app.settings.max_token_ttl_secs
        )));
    }
    let claims = JoinClaims {
        iss: key.id.clone(),
        sub: req.peer,
        room: req.room,
        grants: req.grants,
        exp: now + ttl,
        iat: now,
        nbf: None,
    };
    let token = token::mint(&claims, key.secret.as_bytes())
        .map_err(|e| ControlError::Invalid(e.to_string()))?;
    Ok(Json(MintedToken {
        token,
        expires: claims.exp,
    }))
}

async fn key_for_verification(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(kid): Path<String>,
) -> Result<Json<KeyVerification>> {
    app.require_internal(&headers)?;
    let key = app
        .timed("get_key", app.store.get_key(&kid))
        .await?
        .filter(|k| !k.revoked)
        .ok_or_else(|| ControlError::NotFound(format!("key {kid}")))?;
    let tenant = app.tenant(&key.tenant).await?;
    Ok(Json(KeyVerification {
        key_id: key.id,
        tenant: key.tenant,
        secret: key.secret,
        plan: tenant.plan,
        tenant_disabled: tenant.disabled,
    }))
}

#[derive(Debug, Deserialize)]
struct ChangesQuery {
    #[serde(default)]
    after: u64,
}

/// Most change-feed entries one answer carries.
const CHANGES_PAGE: usize = 1_000;

/// The change feed signal nodes poll to drop cached tenants and keys.
async fn changes(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<ChangesQuery>,
) -> Result<Json<Changes>> {
    app.require_internal(&headers)?;
    let feed = app
        .timed(
            "changes_after",
            app.store.changes_after(q.after, CHANGES_PAGE),
        )
        .await?;
    Ok(Json(feed))
}

/// A tenant as signal needs it: plan and status, without secrets.
async fn tenant_for_service(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Tenant>> {
    app.require_internal(&headers)?;
    let mut tenant = app.tenant(&id).await?;
    tenant.webhook_secret = None;
    tenant.webhook_url = None;
    Ok(Json(tenant))
}

/// What signal nodes mint ICE servers from, polled (see [`IcePolicy`]).
async fn ice_policy(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<IcePolicy>> {
    app.require_internal(&headers)?;
    let e = app.enforcement(unix_now()).await?;
    let s = &app.settings;
    let turn_secret = match &s.turn_secrets {
        Some(secrets) if !s.turn_urls.is_empty() => Some(secrets.active_entry()),
        _ => None,
    };
    Ok(Json(IcePolicy {
        stun_urls: s.stun_urls.clone(),
        turn_urls: s.turn_urls.clone(),
        credential_ttl_secs: s.credential_ttl_secs,
        turn_secret,
        cut_off: e.cut_off.clone(),
        revocations: e.revocations.clone(),
    }))
}

/// Room label of public ICE-server requests that name none.
const DEFAULT_ROOM_LABEL: &str = "default";

/// `POST /v1/ice-servers`: TURN for tenants with signaling of their own.
/// The API key's tenant gets ICE servers for an optional (room, peer)
/// label and lifetime, with everything the internal path enforces.
async fn ice_servers(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<TurnCredentialsRequest>,
) -> Result<Json<IceServers>> {
    let key = app.tenant_key(&headers).await?;
    // A disabled tenant, like one without TURN or over quota, gets STUN
    // only and the reason (`turn_refused`), not an error.
    let tenant = app.tenant(&key.tenant).await?;
    let room = req.room.unwrap_or_else(|| DEFAULT_ROOM_LABEL.to_owned());
    id::validate("room", &room)?;
    let peer = match req.peer {
        Some(p) => p,
        None => format!("p_{}", floe_common::secret::random_token(6)),
    };
    id::validate("peer", &peer)?;
    let cap = app.max_credential_ttl(&tenant);
    let ttl = match req.ttl_secs {
        None => cap,
        Some(0) => {
            return Err(ControlError::Invalid(format!(
                "ttl_secs must be between 1 and {cap}"
            )));
        }
        Some(t) => t.min(cap),
    };
    Ok(Json(
        app.issue(&tenant.id, &room, &peer, ttl, unix_now()).await?,
    ))
}

impl App {
    /// The longest credential lifetime `tenant` may ask for.
    fn max_credential_ttl(&self, tenant: &Tenant) -> u64 {
        tenant
            .plan
            .max_credential_ttl_secs
            .unwrap_or(self.settings.credential_ttl_secs)
            .min(MAX_CREDENTIAL_TTL_SECS)
    }

    /// ICE servers for (tenant, room, peer): STUN always, TURN with
    /// credentials valid `ttl` seconds unless refused (and why).
    async fn issue(
        &self,
        tenant: &str,
        room: &str,
        peer: &str,
        ttl: u64,
        now: u64,
    ) -> Result<IceServers> {
        let refused = self.turn_refusal(tenant, room, peer, now).await?;
        let source = IceSource {
            stun_urls: &self.settings.stun_urls,
            turn_urls: &self.settings.turn_urls,
            secrets: self.settings.turn_secrets.as_ref(),
        };
        let ice = source.servers(tenant, room, peer, ttl, now, refused);
        if ice.expires != 0 {
            self.metrics
                .credentials_issued
                .with_label_values(&[tenant])
                .inc();
        } else {
            let reason = refused.unwrap_or("turn_not_configured");
            self.metrics
                .credentials_refused
                .with_label_values(&[tenant, reason])
                .inc();
        }
        Ok(ice)
    }
}

async fn get_enforcement(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Enforcement>> {
    app.require_internal(&headers)?;
    Ok(Json(Enforcement::clone(
        &*app.enforcement(unix_now()).await?,
    )))
}

fn validate_batch(batch: &UsageBatch) -> Result<()> {
    id::validate("server_id", &batch.server_id)?;
    if batch.seq == 0 {
        return Err(ControlError::Invalid("seq starts at 1".into()));
    }
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(ControlError::Invalid(format!(
            "a batch carries at most {MAX_BATCH_RECORDS} records"
        )));
    }
    for r in &batch.records {
        id::validate("tenant", &r.tenant)?;
        id::validate("room", &r.room)?;
    }
    Ok(())
}

async fn apply_usage(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    JsonBody(batch): JsonBody<UsageBatch>,
) -> Result<Json<UsageAck>> {
    app.require_internal(&headers)?;
    if let Err(e) = validate_batch(&batch) {
        app.metrics
            .usage_batches
            .with_label_values(&["rejected"])
            .inc();
        return Err(e);
    }
    let applied = app
        .timed("apply_batch", app.store.apply_batch(&batch))
        .await?;
    if applied {
        app.metrics
            .usage_batches
            .with_label_values(&["applied"])
            .inc();
        for r in &batch.records {
            app.metrics
                .ledger_bytes
                .with_label_values(&[r.tenant.as_str()])
                .inc_by(r.bytes());
        }
        tracing::debug!(server = %batch.server_id, seq = batch.seq, records = batch.records.len(), "usage batch applied");
        let tenants: std::collections::BTreeSet<String> =
            batch.records.iter().map(|r| r.tenant.clone()).collect();
        app.bytes_changed(tenants.iter().cloned().collect(), unix_now())
            .await?;
        match crate::webhooks::raise_alerts(app.store.as_ref(), &tenants, unix_now()).await {
            Ok(0) => {}
            Ok(_) => app.webhooks.notify_one(),
            // The batch stands; the next one for these tenants checks again.
            Err(e) => tracing::warn!(error = %e, "cannot raise usage alerts"),
        }
    } else {
        app.metrics
            .usage_batches
            .with_label_values(&["duplicate"])
            .inc();
        tracing::debug!(server = %batch.server_id, seq = batch.seq, "duplicate usage batch");
    }
    Ok(Json(UsageAck {
        server_id: batch.server_id,
        seq: batch.seq,
        applied,
        enforcement: Enforcement::clone(&*app.enforcement(unix_now()).await?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The ops routes every component serves beside its API.
    const OPS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

    fn documented() -> serde_json::Map<String, serde_json::Value> {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"], "3.1.0");
        doc["paths"].as_object().expect("paths").clone()
    }

    #[test]
    fn the_document_describes_every_public_route_and_no_other() {
        let served: BTreeSet<&str> = public_routes().iter().map(|(p, _)| *p).chain(OPS).collect();
        let documented: BTreeSet<String> = documented().keys().cloned().collect();
        let documented: BTreeSet<&str> = documented.iter().map(String::as_str).collect();
        assert_eq!(served, documented);
    }

    /// Each path's methods, as the server answers them (the `Allow` header
    /// of a 405), equal the document's.
    #[tokio::test]
    async fn the_document_lists_the_methods_each_route_serves() {
        let dir = std::env::temp_dir().join(format!(
            "floe-openapi-{}",
            floe_common::secret::random_token(4)
        ));
        let settings = crate::Settings {
            listen: "127.0.0.1:0".parse().expect("addr"),
            store: crate::StoreLocation::Embedded(dir.join("cp.redb")),
            redis_prefix: String::new(),
            admin_token: "admin-token-0123456789".into(),
            internal_token: "internal-token-0123456789".into(),
            turn_secrets: None,
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            credential_ttl_secs: 600,
            max_token_ttl_secs: 3600,
            api_rate: 10_000.0,
            trusted_proxies: Default::default(),
            enforcement_refresh: std::time::Duration::from_secs(2),
            store_replicas: None,
        };
        let cp = crate::start(settings, floe_common::Shutdown::new())
            .await
            .expect("start");
        let http = reqwest::Client::new();
        for (path, item) in documented() {
            let want: BTreeSet<String> = item
                .as_object()
                .expect("path item")
                .keys()
                .filter(|k| k.as_str() != "parameters")
                .map(|m| m.to_uppercase())
                .collect();
            let url = format!("{}{}", cp.url(), path.replace('{', "x").replace('}', ""));
            let r = http
                .request(reqwest::Method::TRACE, &url)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 405, "{path}");
            let allow = r
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let served: BTreeSet<String> = allow
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty() && m != "HEAD")
                .collect();
            assert_eq!(served, want, "{path}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
