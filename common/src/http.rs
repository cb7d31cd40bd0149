//! HTTP plumbing shared by every component: the JSON error answer, the
//! operations routes, and serving a router until shutdown.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use floe_proto::ErrorBody;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{Health, Shutdown};

/// A JSON `{code, message}` answer with a status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A JSON request body whose rejection (bad JSON, wrong type, too large)
/// is answered as a JSON `{code, message}` 4xx like every other error.
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                let (status, code) = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => {
                        (rejection.status(), "unsupported_media_type")
                    }
                    JsonRejection::BytesRejection(_) => (rejection.status(), "body_too_large"),
                    // Syntax and shape alike are a bad request (axum says
                    // 422 for a wrong shape; the API documents 400).
                    _ => (StatusCode::BAD_REQUEST, "invalid_json"),
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// `(user, password)` of an `Authorization: Basic …` header (an API key's
/// id and secret), if there is a well-formed one.
pub fn basic(headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Constant-time equality of two secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Answer for routes nobody serves.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Makes every error answer of `router` a JSON `{code, message}`, with
/// [`not_found`] for unknown routes. axum's own refusals (a method not
/// allowed, a missing WebSocket upgrade, a malformed path or query)
/// answer plain text or nothing otherwise.
pub fn json_errors(router: Router) -> Router {
    router
        .fallback(not_found)
        .layer(axum::middleware::map_response(to_json_error))
}

async fn to_json_error(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

#[derive(Clone)]
struct Ops {
    registry: Registry,
    health: Health,
}

/// `/healthz`, `/readyz` and `/metrics` for a component.
pub fn ops_router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Ops {
            registry,
            health: health.clone(),
        })
        .merge(probe_router(health))
}

/// `/healthz` and `/readyz` alone: for a public port that load balancers
/// probe, where metrics (which name tenants) do not belong.
pub fn probe_router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// 200 `{"status": "ok"}` while the process is alive; 503
/// `{"status": "dead", "failed": [...]}` once a vital part of it died.
async fn healthz(State(health): State<Health>) -> Response {
    let dead = health.dead();
    if dead.is_empty() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "dead", "failed": dead})),
        )
            .into_response()
    }
}

async fn readyz(State(health): State<Health>) -> Response {
    let checks = health.snapshot();
    let ready = checks.values().all(|ok| *ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"ready": ready, "checks": checks})),
    )
        .into_response()
}

async fn metrics(State(ops): State<Ops>) -> Response {
    let mut families = ops.registry.gather();
    families.extend(health_families(&ops.health));
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&families, &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics_encoding",
            e.to_string(),
        )
        .into_response(),
    }
}

/// `floe_health_check{component, check}`: each readiness check as 1
/// (passing) or 0, so an alert can say which dependency keeps a node out of
/// its Service.
fn health_families(health: &Health) -> Vec<prometheus::proto::MetricFamily> {
    use prometheus::core::Collector as _;
    let gauge = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "floe_health_check",
            "Readiness checks of this component: 1 while passing, 0 while failing",
        ),
        &["component", "check"],
    )
    .expect("valid metric");
    for (check, ok) in health.snapshot() {
        gauge
            .with_label_values(&[health.component(), check])
            .set(i64::from(ok));
    }
    gauge.collect()
}

/// Binds `addr` for HTTP, with a clear error naming what failed.
pub async fn bind(what: &'static str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind {what} on {addr}: {e}")))
}

/// Serves `router` on `listener` until `shutdown` fires, then lets requests
/// in flight finish (WebSocket handlers watch `shutdown` themselves).
pub fn serve(listener: TcpListener, router: Router, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ops_endpoints_answer_over_tcp() {
        let registry = Registry::new();
        let counter =
            prometheus::IntCounter::new("floe_test_things_total", "things").expect("valid metric");
        registry
            .register(Box::new(counter.clone()))
            .expect("register once");
        counter.inc_by(3);
        let health = Health::new("test");
        let dep = health.check("dependency", false);
        let health_vital = health.vital("worker", true);
        let listener = bind("test", "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let task = serve(
            listener,
            ops_router(registry, health).fallback(not_found),
            shutdown.clone(),
        );
        let client = reqwest::Client::new();
        let get = async |path: &str| {
            client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .expect("HTTP answer")
        };

        assert_eq!(get("/healthz").await.status(), 200);
        assert_eq!(get("/readyz").await.status(), 503);
        dep.set(true);
        assert_eq!(get("/readyz").await.status(), 200);
        let body = get("/metrics").await.text().await.expect("text");
        assert!(body.contains("floe_test_things_total 3"), "{body}");
        assert!(
            body.contains("floe_health_check{check=\"dependency\",component=\"test\"} 1"),
            "{body}"
        );
        // A vital part dies: not alive any more, whatever the rest says.
        health_vital.set(false);
        let r = get("/healthz").await;
        assert_eq!(r.status(), 503);
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["failed"], serde_json::json!(["worker"]));
        let r = get("/nope").await;
        assert_eq!(r.status(), 404);
        let err: ErrorBody = r.json().await.expect("json error");
        assert_eq!(err.code, "not_found");

        shutdown.cancel();
        task.await.expect("server task ends");
    }
}
