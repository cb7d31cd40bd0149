//! The chaos run's stand-in for a Kubernetes Service in front of the
//! control-plane replicas: it forwards each request to the next replica
//! that answers. In the usage-fault phase it also mistreats TURN's usage
//! batches the way a network and a retrying client can: every batch is
//! sent twice, an earlier batch is replayed after a later one, and every
//! third is held past TURN's 5 s timeout before it goes on (so TURN
//! resends it while the original is still on its way).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::Mutex;

/// How long a held batch waits: past the TURN client's 5 s timeout.
const HOLD: Duration = Duration::from_secs(6);

/// What the usage faults did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageFaults {
    pub batches: u64,
    pub duplicated: u64,
    pub replayed: u64,
    pub held: u64,
}

struct State {
    replicas: Vec<String>,
    next: AtomicUsize,
    http: reqwest::Client,
    faulty: AtomicBool,
    /// A batch already forwarded, to replay after the next one.
    earlier: Mutex<Option<(HeaderMap, Bytes)>>,
    batches: AtomicU64,
    duplicated: AtomicU64,
    replayed: AtomicU64,
    held: AtomicU64,
}

/// A running balancer; it stops with the runtime.
pub(crate) struct Lb {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Lb {
    /// Listens on a free loopback port, forwarding to `replicas` (base URLs).
    pub async fn start(replicas: Vec<String>) -> std::io::Result<Self> {
        let state = Arc::new(State {
            replicas,
            next: AtomicUsize::new(0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(std::io::Error::other)?,
            faulty: AtomicBool::new(false),
            earlier: Mutex::new(None),
            batches: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            held: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().fallback({
            let state = state.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { state.handle(method, uri, headers, body).await }
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Turns the usage faults on or off.
    pub fn usage_faults(&self, on: bool) {
        self.state.faulty.store(on, Ordering::Relaxed);
    }

    /// What the usage faults did so far.
    pub fn faults(&self) -> UsageFaults {
        let s = &self.state;
        UsageFaults {
            batches: s.batches.load(Ordering::Relaxed),
            duplicated: s.duplicated.load(Ordering::Relaxed),
            replayed: s.replayed.load(Ordering::Relaxed),
            held: s.held.load(Ordering::Relaxed),
        }
    }
}

impl State {
    async fn handle(&self, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let usage = method == Method::POST && uri.path() == "/internal/v1/usage";
        if !(usage && self.faulty.load(Ordering::Relaxed)) {
            return self.forward(&method, &uri, &headers, body).await;
        }
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        if n % 3 == 2 {
            self.held.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(HOLD).await;
        }
        let _ = self.forward(&method, &uri, &headers, body.clone()).await;
        self.duplicated.fetch_add(1, Ordering::Relaxed);
        let answer = self.forward(&method, &uri, &headers, body.clone()).await;
        let earlier = self.earlier.lock().await.replace((headers, body));
        if let Some((h, b)) = earlier {
            self.replayed.fetch_add(1, Ordering::Relaxed);
            let _ = self.forward(&method, &uri, &h, b).await;
        }
        answer
    }

    /// Forwards to the replicas in turn until one answers.
    async fn forward(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..self.replicas.len() {
            let base = &self.replicas[(start + k) % self.replicas.len()];
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{uri}"))
                .body(body.clone());
            for name in ["authorization", "content-type"] {
                if let Some(v) = headers.get(name) {
                    req = req.header(name, v);
                }
            }
            let Ok(r) = req.send().await else { continue };
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = r.headers().get("content-type").cloned();
            let Ok(bytes) = r.bytes().await else { continue };
            let mut resp = (status, bytes).into_response();
            if let Some(ct) = content_type {
                resp.headers_mut().insert("content-type", ct);
            }
            return resp;
        }
        (
            StatusCode::BAD_GATEWAY,
            [("content-type", "application/json")],
            r#"{"code":"no_replica","message":"no control-plane replica answered"}"#,
        )
            .into_response()
    }
}
