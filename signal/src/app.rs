//! The file-share web app (built from `web/share`, committed in
//! `web/share/dist`) embedded in the binary, so a node serves it with no
//! Node.js or CDN at run time. On with `--serve-app` (`floe dev` turns it
//! on); its rooms are public rooms of `--app-tenant`.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../../web/share/dist/index.html");
const APP_JS: &str = include_str!("../../web/share/dist/app.js");
const WORKER_JS: &str = include_str!("../../web/share/dist/hash-worker.js");
const APP_CSS: &str = include_str!("../../web/share/dist/app.css");

/// Only this origin's scripts and sockets; WebAssembly for the hashing
/// worker; blob: URLs for received files.
const CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; \
    connect-src 'self' ws: wss:; img-src 'self' blob: data:; style-src 'self'; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The app's routes; `tenant` owns the rooms it creates.
pub(crate) fn router(tenant: &str) -> Router {
    let config = serde_json::json!({ "tenant": tenant }).to_string();
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/hash-worker.js",
            get(|| async { asset("text/javascript; charset=utf-8", WORKER_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/app-config.json",
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    config,
                )
            }),
        )
}
