//! The control plane's error type and its one mapping to HTTP answers.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use floe_common::http::ApiError;

use crate::store::StoreError;

/// Everything a control-plane request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("the tenant is disabled")]
    TenantDisabled,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("too many requests; retry later")]
    RateLimited,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<floe_proto::id::IdError> for ControlError {
    fn from(e: floe_proto::id::IdError) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::TenantDisabled => (StatusCode::FORBIDDEN, "tenant_disabled"),
            Self::NotFound(_) | Self::Store(StoreError::NotFound(_)) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            Self::Conflict(_) | Self::Store(StoreError::Conflict(_)) => {
                (StatusCode::CONFLICT, "conflict")
            }
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Store(StoreError::Backend(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            Self::Store(StoreError::Overflow(_)) => (StatusCode::BAD_REQUEST, "ledger_overflow"),
            Self::Store(StoreError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt")
            }
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        ApiError::new(status, code, self.to_string()).into_response()
    }
}
