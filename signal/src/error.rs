//! Everything a signaling request or join can fail with, mapped once to an
//! HTTP status and a stable error code (used both in JSON error bodies and
//! in WebSocket `error` messages).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use floe_common::http::ApiError;
use floe_proto::token::TokenError;

use crate::bus::BusError;
use crate::control::Unavailable;
use crate::room::Refusal;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SignalError {
    #[error("join token invalid: {0}")]
    InvalidToken(String),
    #[error("join token has expired")]
    TokenExpired,
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{1}")]
    Forbidden(&'static str, String),
    #[error("the tenant is disabled")]
    TenantDisabled,
    #[error(
        "this client_id is connected already; reconnecting as it needs its reconnect_secret (or a join token)"
    )]
    PeerIdTaken,
    #[error("wrong room password")]
    WrongPassword,
    #[error("no such room (it may have expired)")]
    RoomNotFound,
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    #[error("the room is full")]
    RoomFull,
    #[error("this one-time room is already in use")]
    RoomSealed,
    #[error("the tenant has reached its limit of {} rooms", if *public { "public" } else { "token" })]
    RoomLimit { public: bool },
    #[error("a room with this id exists already")]
    RoomExists,
    #[error("too many requests; retry later")]
    RateLimited,
    #[error("too many connections from this address")]
    TooManyConnections,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl SignalError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidToken(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::TenantDisabled => (StatusCode::FORBIDDEN, "tenant_disabled"),
            Self::PeerIdTaken => (StatusCode::CONFLICT, "peer_id_taken"),
            Self::TokenExpired => (StatusCode::UNAUTHORIZED, "token_expired"),
            Self::Forbidden(code, _) => (StatusCode::FORBIDDEN, code),
            Self::WrongPassword => (StatusCode::FORBIDDEN, "wrong_password"),
            Self::RoomNotFound => (StatusCode::NOT_FOUND, "room_not_found"),
            Self::UnknownTenant(_) => (StatusCode::NOT_FOUND, "unknown_tenant"),
            Self::RoomFull => (StatusCode::CONFLICT, "room_full"),
            Self::RoomSealed => (StatusCode::CONFLICT, "room_sealed"),
            Self::RoomLimit { public: false } => (StatusCode::FORBIDDEN, "room_limit_reached"),
            Self::RoomLimit { public: true } => {
                (StatusCode::FORBIDDEN, "public_room_limit_reached")
            }
            Self::RoomExists => (StatusCode::CONFLICT, "room_exists"),
            Self::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::TooManyConnections => (StatusCode::TOO_MANY_REQUESTS, "too_many_connections"),
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }
}

impl From<TokenError> for SignalError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => Self::TokenExpired,
            other => Self::InvalidToken(other.to_string()),
        }
    }
}

impl From<Refusal> for SignalError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Full => Self::RoomFull,
            Refusal::Sealed => Self::RoomSealed,
            Refusal::Expired => Self::RoomNotFound,
            Refusal::PeerIdTaken => Self::PeerIdTaken,
        }
    }
}

impl From<BusError> for SignalError {
    fn from(e: BusError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

impl From<Unavailable> for SignalError {
    fn from(e: Unavailable) -> Self {
        Self::Unavailable(e.to_string())
    }
}

impl From<floe_proto::id::IdError> for SignalError {
    fn from(e: floe_proto::id::IdError) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl IntoResponse for SignalError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        ApiError::new(status, code, self.to_string()).into_response()
    }
}
