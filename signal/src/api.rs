//! The signaling REST API (create, get, delete rooms) and the WebSocket
//! entry point, with the checks every request goes through: origin, join
//! token or public-room rules, rate limits.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use floe_common::Shutdown;
use floe_common::http::{JsonBody, bearer};
use floe_common::ratelimit::RateLimiter;
use floe_proto::api::Tenant;
use floe_proto::signal::{CreateRoom, CreatedRoom, RoomInfo};
use floe_proto::time::unix_now;
use floe_proto::token::{self, JoinClaims};
use serde::Deserialize;

use crate::bus::{Bus, Creation};
use crate::config::Settings;
use crate::control::Control;
use crate::error::SignalError;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::room::{RoomRecord, Salted};

type Result<T> = std::result::Result<T, SignalError>;

/// Longest room password.
const MAX_PASSWORD: usize = 256;

/// Shared state of every handler and connection.
pub(crate) struct App {
    pub settings: Settings,
    pub bus: Arc<dyn Bus>,
    pub hub: Arc<Hub>,
    pub control: Control,
    pub metrics: Arc<Metrics>,
    /// Fires when the node starts draining.
    pub draining: Shutdown,
    create_limiter: Mutex<RateLimiter<IpAddr>>,
}

/// A verified join token and the tenant its key belongs to.
pub(crate) struct TokenHolder {
    pub claims: JoinClaims,
    pub tenant: String,
}

impl App {
    pub fn new(
        settings: Settings,
        bus: Arc<dyn Bus>,
        hub: Arc<Hub>,
        control: Control,
        metrics: Arc<Metrics>,
        draining: Shutdown,
    ) -> Self {
        let per_min = f64::from(settings.public_rooms_per_min.max(1));
        let create_limiter = Mutex::new(RateLimiter::new(
            per_min / 60.0,
            settings.public_rooms_per_min.max(1),
            100_000,
        ));
        Self {
            settings,
            bus,
            hub,
            control,
            metrics,
            draining,
            create_limiter,
        }
    }

    pub fn refuse(&self, e: SignalError) -> SignalError {
        self.metrics.refusals.with_label_values(&[e.code()]).inc();
        e
    }

    /// Verifies a join token with its API key (fetched from the control
    /// plane and cached).
    pub async fn verify_token(&self, token: &str) -> Result<TokenHolder> {
        let kid = token::key_id(token)?;
        let key = self
            .control
            .key(&kid)
            .await?
            .ok_or_else(|| SignalError::InvalidToken("unknown or revoked API key".into()))?;
        if key.tenant_disabled {
            return Err(SignalError::Forbidden(
                "tenant_disabled",
                "the tenant is disabled".into(),
            ));
        }
        let claims = token::verify(token, key.secret.as_bytes(), unix_now())?;
        Ok(TokenHolder {
            claims,
            tenant: key.tenant,
        })
    }

    /// The tenant `id`, enabled.
    pub async fn tenant(&self, id: &str) -> Result<Tenant> {
        let t = self
            .control
            .tenant(id)
            .await?
            .ok_or_else(|| SignalError::UnknownTenant(id.to_owned()))?;
        if t.disabled {
            return Err(SignalError::Forbidden(
                "tenant_disabled",
                "the tenant is disabled".into(),
            ));
        }
        Ok(t)
    }

    /// Whether a browser `Origin` may use the API.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.settings.allowed_origins.is_empty() {
            return true;
        }
        match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            // Non-browser clients send no Origin.
            None => true,
            Some(origin) => self.settings.allowed_origins.iter().any(|a| a == origin),
        }
    }

    pub async fn room_info(&self, record: &RoomRecord) -> Result<RoomInfo> {
        let mut peers: Vec<String> = self
            .bus
            .members(&record.id)
            .await?
            .into_iter()
            .map(|m| m.peer_id)
            .collect();
        peers.sort();
        Ok(RoomInfo {
            room_id: record.id.clone(),
            tenant: record.tenant.clone(),
            expires_at: record.expires_at,
            max_peers: record.max_peers,
            one_time: record.one_time,
            has_password: record.password.is_some(),
            peers,
        })
    }
}

/// A short, unguessable room id: 96 random bits, base64url.
fn new_room_id() -> String {
    let mut raw = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// The routes of the signaling API (without the ops routes).
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/rooms", axum::routing::post(create_room))
        .route("/v1/rooms/{id}", get(get_room).delete(delete_room))
        .route("/v1/rooms/{id}/ws", get(websocket))
        .route("/v1/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(app)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
        .into_response()
}

async fn create_room(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateRoom>,
) -> Result<(StatusCode, Json<CreatedRoom>)> {
    create(&app, client.ip(), &headers, req)
        .await
        .map_err(|e| app.refuse(e))
}

async fn create(
    app: &App,
    ip: IpAddr,
    headers: &HeaderMap,
    req: CreateRoom,
) -> Result<(StatusCode, Json<CreatedRoom>)> {
    if !app.origin_allowed(headers) {
        return Err(SignalError::Forbidden(
            "origin_not_allowed",
            "origin not allowed".into(),
        ));
    }
    let now = unix_now();
    let (tenant, creator, room_id) = match bearer(headers) {
        Some(t) => {
            let holder = app.verify_token(t).await?;
            if !holder.claims.grants.create {
                return Err(SignalError::Forbidden(
                    "grant_missing",
                    "the join token does not allow creating rooms".into(),
                ));
            }
            let tenant = app.tenant(&holder.tenant).await?;
            let id = holder.claims.room.clone().unwrap_or_else(new_room_id);
            (tenant, Some(holder.claims.sub), id)
        }
        None => {
            let id = req.tenant.as_deref().ok_or_else(|| {
                SignalError::Invalid("give a join token, or the tenant of a public room".into())
            })?;
            floe_proto::id::validate("tenant", id)?;
            let tenant = app.tenant(id).await?;
            if !tenant.plan.public_rooms {
                return Err(SignalError::Forbidden(
                    "public_rooms_disabled",
                    "this tenant does not allow rooms without a join token".into(),
                ));
            }
            let allowed = app
                .create_limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow(&ip, Instant::now());
            if !allowed {
                return Err(SignalError::RateLimited);
            }
            (tenant, None, new_room_id())
        }
    };
    floe_proto::id::validate("room", &room_id)?;
    let s = &app.settings;
    let ttl = req.ttl_secs.unwrap_or(s.room_ttl_secs);
    if ttl == 0 || ttl > s.max_room_ttl_secs {
        return Err(SignalError::Invalid(format!(
            "ttl_secs must be between 1 and {}",
            s.max_room_ttl_secs
        )));
    }
    let cap = tenant.plan.max_peers_per_room.unwrap_or(1_000);
    let max_peers = req.max_peers.unwrap_or(s.default_max_peers.min(cap));
    if max_peers < 2 || max_peers > cap {
        return Err(SignalError::Invalid(format!(
            "max_peers must be between 2 and {cap}"
        )));
    }
    if let Some(p) = &req.password
        && (p.is_empty() || p.len() > MAX_PASSWORD)
    {
        return Err(SignalError::Invalid(format!(
            "password must be 1 to {MAX_PASSWORD} bytes"
        )));
    }
    let owner_key = floe_common::secret::random_token(24);
    let record = RoomRecord {
        id: room_id,
        tenant: tenant.id.clone(),
        created_at: now,
        expires_at: now + ttl,
        max_peers,
        one_time: req.one_time,
        password: req.password.as_deref().map(Salted::new),
        owner: Salted::new(&owner_key),
        creator,
    };
    match app
        .bus
        .create_room(&record, tenant.plan.max_rooms, now)
        .await?
    {
        Creation::Done => {}
        Creation::TenantFull => return Err(SignalError::RoomLimit),
        Creation::Exists => return Err(SignalError::RoomExists),
    }
    app.metrics
        .rooms_created
        .with_label_values(&[tenant.id.as_str()])
        .inc();
    tracing::info!(tenant = %tenant.id, ttl, max_peers, one_time = req.one_time, "room created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedRoom {
            room: app.room_info(&record).await?,
            owner_key,
        }),
    ))
}

async fn room_or_404(app: &App, id: &str) -> Result<RoomRecord> {
    if floe_proto::id::validate("room", id).is_err() {
        return Err(SignalError::RoomNotFound);
    }
    match app.bus.room(id).await? {
        Some(r) if r.expires_at > unix_now() => Ok(r),
        _ => Err(SignalError::RoomNotFound),
    }
}

async fn get_room(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<RoomInfo>> {
    let record = room_or_404(&app, &id).await?;
    Ok(Json(app.room_info(&record).await?))
}

/// Deletes a room: with its owner key, a join token of its creator, or an
/// API key (HTTP Basic) of its tenant.
async fn delete_room(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let record = room_or_404(&app, &id).await?;
    if !may_delete(&app, &record, &headers).await? {
        return Err(app.refuse(SignalError::Forbidden(
            "not_owner",
            "only the room's owner key, its creator or its tenant may delete it".into(),
        )));
    }
    app.bus.delete_room(&id, "deleted").await?;
    tracing::info!(tenant = %record.tenant, "room deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn may_delete(app: &App, record: &RoomRecord, headers: &HeaderMap) -> Result<bool> {
    if let Some(b) = bearer(headers) {
        if record.owner.verify(b) {
            return Ok(true);
        }
        if let Ok(holder) = app.verify_token(b).await {
            return Ok(holder.tenant == record.tenant
                && record.creator.as_deref() == Some(holder.claims.sub.as_str()));
        }
        return Ok(false);
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .and_then(|v| String::from_utf8(v).ok());
    if let Some((kid, secret)) = basic.as_deref().and_then(|s| s.split_once(':'))
        && let Some(key) = app.control.key(kid).await?
    {
        return Ok(key.tenant == record.tenant && floe_common::http::secret_eq(secret, &key.secret));
    }
    Ok(false)
}

/// Query of the WebSocket URL.
#[derive(Debug, Deserialize)]
pub(crate) struct JoinQuery {
    /// Join token (browsers cannot set headers on WebSockets).
    pub token: Option<String>,
    /// Room password, for public rooms that have one.
    pub password: Option<String>,
    /// Stable id of this client: a reconnect with the same id replaces its
    /// previous connection.
    pub client_id: Option<String>,
}

async fn websocket(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(room): Path<String>,
    Query(query): Query<JoinQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !app.origin_allowed(&headers) {
        return app
            .refuse(SignalError::Forbidden(
                "origin_not_allowed",
                "origin not allowed".into(),
            ))
            .into_response();
    }
    if app.draining.is_cancelled() {
        return SignalError::Unavailable("node draining; connect to another".into())
            .into_response();
    }
    let Some(slot) = IpSlot::acquire(&app, client.ip()) else {
        return app.refuse(SignalError::TooManyConnections).into_response();
    };
    // Room and auth are checked after the upgrade so a browser sees the
    // reason as an `error` message, not as an opaque failed handshake.
    let max = app.settings.max_message_bytes;
    upgrade
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(2 * max)
        .max_frame_size(2 * max)
        .on_upgrade(move |socket| async move {
            crate::ws::serve(app, socket, room, query).await;
            drop(slot);
        })
}

/// One counted connection from an IP; released when dropped, also when
/// the upgrade never completes.
struct IpSlot {
    hub: Arc<Hub>,
    ip: IpAddr,
}

impl IpSlot {
    fn acquire(app: &App, ip: IpAddr) -> Option<Self> {
        app.hub
            .acquire_ip(ip, app.settings.max_connections_per_ip)
            .then(|| Self {
                hub: app.hub.clone(),
                ip,
            })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.hub.release_ip(self.ip);
    }
}
