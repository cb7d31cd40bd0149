//! The signaling REST API (create, list, get, delete rooms) and the
//! WebSocket entry point. Who may do what is decided in [`crate::state`];
//! this module maps requests to it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use floe_common::http::{ApiError, JsonBody};
use floe_proto::signal::{CreateRoom, CreatedRoom, RoomInfo, RoomList};
use floe_proto::time::unix_now;
use serde::Deserialize;

use crate::bus::Creation;
use crate::error::SignalError;
use crate::hub::Hub;
use crate::room::{RoomRecord, Salted};
use crate::state::{App, Caller};
use crate::ws::JoinQuery;

type Result<T> = std::result::Result<T, SignalError>;

/// Longest room password.
const MAX_PASSWORD: usize = 256;
/// Largest request body.
pub(crate) const BODY_LIMIT: usize = 16 * 1024;
/// Tries to find a free random room id before giving up.
const ID_ATTEMPTS: usize = 4;

/// A short, unguessable room id: 96 random bits, base64url.
fn new_room_id() -> String {
    let mut raw = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// The routes of the signaling API (without the ops routes).
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/v1/rooms",
            axum::routing::post(create_room).get(list_rooms),
        )
        .route("/v1/rooms/{id}", get(get_room).delete(delete_room))
        .route("/v1/rooms/{id}/ws", get(websocket))
        .route("/v1/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
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
    let ip = app.settings.trusted_proxies.client_ip(client, &headers);
    create(&app, ip, &headers, req)
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
    let (tenant, creator, named) = match app.caller(headers).await? {
        Caller::Token(holder) => {
            if !holder.claims.grants.create {
                return Err(SignalError::Forbidden(
                    "grant_missing",
                    "the join token does not allow creating rooms".into(),
                ));
            }
            let tenant = app.tenant(&holder.tenant).await?;
            (tenant, Some(holder.claims.sub), holder.claims.room)
        }
        Caller::Anonymous => {
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
            (tenant, None, None)
        }
        Caller::ApiKey { .. } | Caller::OwnerKey(_) => {
            return Err(SignalError::InvalidToken(
                "creating a room takes a join token (Bearer) or none".into(),
            ));
        }
    };
    let public = creator.is_none();
    let s = &app.settings;
    // Over the caps is capped, as documented; the answer shows the values used.
    let ttl = req
        .ttl_secs
        .unwrap_or(s.room_ttl_secs)
        .min(s.max_room_ttl_secs);
    if ttl == 0 {
        return Err(SignalError::Invalid("ttl_secs must be at least 1".into()));
    }
    let cap = tenant.plan.max_peers_per_room.unwrap_or(1_000);
    let max_peers = req.max_peers.unwrap_or(s.default_max_peers).min(cap);
    if max_peers < 2 {
        return Err(SignalError::Invalid(format!(
            "max_peers must be at least 2 (this tenant's cap is {cap})"
        )));
    }
    if let Some(p) = &req.password
        && (p.is_empty() || p.len() > MAX_PASSWORD)
    {
        return Err(SignalError::Invalid(format!(
            "password must be 1 to {MAX_PASSWORD} bytes"
        )));
    }
    let limit = if public {
        tenant.plan.max_public_rooms
    } else {
        tenant.plan.max_rooms
    };
    let owner_key = floe_common::secret::random_token(24);
    let mut record = RoomRecord {
        id: named.clone().unwrap_or_else(new_room_id),
        tenant: tenant.id.clone(),
        created_at: now,
        expires_at: now + ttl,
        max_peers,
        one_time: req.one_time,
        public,
        named: named.is_some(),
        password: req.password.as_deref().map(Salted::new),
        owner: Salted::new(&owner_key),
        creator,
    };
    let mut attempts = 0;
    loop {
        match app.bus.create_room(&record, limit, now).await? {
            Creation::Done => break,
            Creation::TenantFull => return Err(SignalError::RoomLimit { public }),
            Creation::Exists if record.named => return Err(SignalError::RoomExists),
            Creation::Exists => {
                attempts += 1;
                if attempts >= ID_ATTEMPTS {
                    return Err(SignalError::RoomExists);
                }
                record.id = new_room_id();
            }
        }
    }
    app.metrics
        .rooms_created
        .with_label_values(&[tenant.id.as_str()])
        .inc();
    tracing::info!(tenant = %tenant.id, public, ttl, max_peers, one_time = req.one_time, "room created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedRoom {
            room: app.room_info(&record, true).await?,
            owner_key,
        }),
    ))
}

/// Query of `GET`/`DELETE /v1/rooms/{id}`.
#[derive(Debug, Deserialize)]
struct RoomQuery {
    /// The tenant, for a room id its tenant chose (a join token's `room`
    /// claim) addressed with an owner key.
    tenant: Option<String>,
}

/// The room `id` as `caller` (or the query's tenant) names it.
async fn room_for(app: &App, caller: &Caller, id: &str, q: &RoomQuery) -> Result<RoomRecord> {
    let tenant = caller.tenant().or(q.tenant.as_deref());
    app.find_room(id, tenant).await
}

fn query<T>(q: std::result::Result<Query<T>, QueryRejection>) -> Result<T> {
    q.map(|Query(q)| q)
        .map_err(|e| SignalError::Invalid(e.body_text()))
}

async fn get_room(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: std::result::Result<Query<RoomQuery>, QueryRejection>,
) -> Result<Json<RoomInfo>> {
    let q = query(q)?;
    let caller = app.caller(&headers).await?;
    let record = room_for(&app, &caller, &id, &q).await?;
    let owns = caller.owns(&record);
    Ok(Json(app.room_info(&record, owns).await?))
}

/// A tenant's live rooms, with their peers; for its API keys.
async fn list_rooms(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<RoomList>> {
    let Caller::ApiKey { tenant } = app.caller(&headers).await? else {
        return Err(app.refuse(SignalError::Unauthorized));
    };
    let mut rooms = Vec::new();
    for record in app.bus.rooms(&tenant, unix_now()).await? {
        rooms.push(app.room_info(&record, true).await?);
    }
    Ok(Json(RoomList { rooms }))
}

/// Deletes a room: with its owner key, a join token of its creator, or an
/// API key (HTTP Basic) of its tenant. Credentials are checked before the
/// room is looked up, so an anonymous caller learns nothing.
async fn delete_room(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: std::result::Result<Query<RoomQuery>, QueryRejection>,
) -> Result<StatusCode> {
    let q = query(q)?;
    let caller = app.caller(&headers).await?;
    if matches!(caller, Caller::Anonymous) {
        return Err(app.refuse(SignalError::Unauthorized));
    }
    let record = room_for(&app, &caller, &id, &q).await?;
    if !caller.owns(&record) {
        return Err(app.refuse(SignalError::Forbidden(
            "not_owner",
            "only the room's owner key, its creator or its tenant may delete it".into(),
        )));
    }
    app.bus.delete_room(&record, "deleted").await?;
    tracing::info!(tenant = %record.tenant, "room deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Opens a peer's WebSocket. Every refusal (origin, draining, too many
/// connections, then room and credentials) is told after the upgrade as
/// an `error` message and a close code, which a browser can read; only a
/// request that is not a WebSocket upgrade gets an HTTP error.
async fn websocket(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(room): Path<String>,
    q: std::result::Result<Query<JoinQuery>, QueryRejection>,
    upgrade: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                format!("this endpoint is a WebSocket: {}", e.body_text()),
            )
            .into_response();
        }
    };
    let refusal = if !app.origin_allowed(&headers) {
        Some(SignalError::Forbidden(
            "origin_not_allowed",
            "origin not allowed".into(),
        ))
    } else if app.draining.is_cancelled() {
        Some(SignalError::Unavailable(
            "node draining; connect to another".into(),
        ))
    } else {
        None
    };
    let slot = IpSlot::acquire(
        &app,
        app.settings.trusted_proxies.client_ip(client, &headers),
    );
    let refusal = refusal.or_else(|| slot.is_none().then_some(SignalError::TooManyConnections));
    let max = app.settings.max_message_bytes;
    upgrade
        .read_buffer_size(1024)
        .write_buffer_size(0)
        // Exactly the limit: a larger message is refused by the WebSocket
        // layer, and answered below with `message_too_large` and 1009.
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let query = query(q);
            match (refusal, query) {
                (Some(e), _) | (None, Err(e)) => crate::ws::refuse(&app, socket, e).await,
                (None, Ok(query)) => crate::ws::serve(app, socket, room, query).await,
            }
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
