//! A real control plane, real signal nodes on loopback, and a WebSocket
//! client that speaks the signaling protocol.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use floe_common::Shutdown;
use floe_control::{ControlPlane, Settings as CpSettings, StoreLocation};
use floe_proto::api::CreatedApiKey;
use floe_proto::credential::TurnSecrets;
use floe_proto::token::{Grants, JoinClaims};
use floe_signal::{Settings, Signal};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const ADMIN: &str = "admin-token-for-tests-0123";
pub const INTERNAL: &str = "internal-token-for-tests-0123";

pub struct Stack {
    pub cp: ControlPlane,
    pub http: reqwest::Client,
    /// API key of tenant "t1" (public rooms on, TURN on).
    pub key: CreatedApiKey,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = floe_control::start(
            CpSettings {
                listen: "127.0.0.1:0".parse().expect("addr"),
                store: StoreLocation::Embedded(dir.path().join("cp.redb")),
                redis_prefix: "unused:".into(),
                admin_token: ADMIN.into(),
                internal_token: INTERNAL.into(),
                turn_secrets: Some(
                    TurnSecrets::parse("k1=turn-secret-0123456789").expect("secrets"),
                ),
                stun_urls: vec!["stun:127.0.0.1:3478".into()],
                turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
                credential_ttl_secs: 60,
                max_token_ttl_secs: 86_400,
                api_rate: 10_000.0,
                trusted_proxies: Default::default(),
                enforcement_refresh: std::time::Duration::from_secs(2),
                store_replicas: None,
            },
            Shutdown::new(),
        )
        .await
        .expect("control plane");
        let http = reqwest::Client::new();
        let key = tenant_with_key(
            &http,
            &cp.url(),
            "t1",
            json!({"turn": true, "public_rooms": true, "max_peers_per_room": 10, "max_rooms": 20}),
        )
        .await;
        for (id, plan) in [
            ("private", json!({"turn": false, "public_rooms": false})),
            ("tiny", json!({"public_rooms": true, "max_public_rooms": 1})),
        ] {
            tenant_with_key(&http, &cp.url(), id, plan).await;
        }
        Self {
            cp,
            http,
            key,
            _dir: dir,
        }
    }

    pub fn settings(&self) -> Settings {
        let mut s = Settings::new(
            "127.0.0.1:0".parse().expect("addr"),
            &self.cp.url(),
            INTERNAL,
        );
        s.heartbeat_secs = 5;
        s
    }

    pub async fn node(&self, settings: Settings) -> Signal {
        floe_signal::start(settings, Shutdown::new())
            .await
            .expect("signal node")
    }

    /// A join token of tenant t1 for `peer`.
    pub fn token(&self, peer: &str, room: Option<&str>, create: bool, exp_in: i64) -> String {
        let now = floe_proto::time::unix_now();
        floe_proto::token::mint(
            &JoinClaims {
                iss: self.key.id.clone(),
                sub: peer.into(),
                room: room.map(str::to_owned),
                grants: Grants { create, join: true },
                exp: (now as i64 + exp_in) as u64,
                iat: now,
                nbf: None,
            },
            self.key.secret.as_bytes(),
        )
        .expect("mint")
    }
}

/// Creates tenant `id` with `plan` (as the admin) and an API key for it.
pub async fn tenant_with_key(
    http: &reqwest::Client,
    cp_url: &str,
    id: &str,
    plan: Value,
) -> CreatedApiKey {
    let r = http
        .post(format!("{cp_url}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": id, "name": id, "plan": plan}))
        .send()
        .await
        .expect("create tenant");
    assert_eq!(r.status(), 201);
    http.post(format!("{cp_url}/v1/tenants/{id}/keys"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("create key")
        .json()
        .await
        .expect("key")
}

/// `GET /v1/rooms/{id}` on `node` as the room's owner (so with its peers).
pub async fn room_as_owner(
    http: &reqwest::Client,
    node: &impl Node,
    id: &str,
    owner_key: &str,
) -> Value {
    http.get(format!("http://{}/v1/rooms/{id}", node.addr()))
        .bearer_auth(owner_key)
        .send()
        .await
        .expect("get room")
        .json()
        .await
        .expect("room JSON")
}

/// Anything with a signal API address: an in-process node or a process.
pub trait Node {
    fn addr(&self) -> SocketAddr;
}

impl Node for Signal {
    fn addr(&self) -> SocketAddr {
        Signal::addr(self)
    }
}

impl Node for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

/// Creates a public room of tenant t1 on `node`.
pub async fn public_room(http: &reqwest::Client, node: &impl Node, body: Value) -> Value {
    let mut body = body;
    body["tenant"] = json!("t1");
    let r = http
        .post(format!("http://{}/v1/rooms", node.addr()))
        .json(&body)
        .send()
        .await
        .expect("create room");
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    r.json().await.expect("room")
}

pub struct Client {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub welcome: Value,
}

impl Client {
    /// Connects and returns the first message (welcome or error).
    pub async fn connect_raw(node: &impl Node, room: &str, query: &str) -> (Self, Value) {
        let url = format!("ws://{}/v1/rooms/{room}/ws?{query}", node.addr());
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        let mut c = Self {
            ws,
            welcome: Value::Null,
        };
        let first = c.next().await;
        (c, first)
    }

    /// Connects and expects a welcome.
    pub async fn join(node: &impl Node, room: &str, query: &str) -> Self {
        let (mut c, first) = Self::connect_raw(node, room, query).await;
        assert_eq!(first["type"], "welcome", "{first}");
        c.welcome = first;
        c
    }

    pub fn peer_id(&self) -> String {
        self.welcome["peer_id"]
            .as_str()
            .expect("peer id")
            .to_owned()
    }

    /// The query that reconnects as this client: its peer id as
    /// `client_id` and the `reconnect_secret` its welcome gave.
    pub fn reconnect_query(&self) -> String {
        format!(
            "client_id={}&reconnect_secret={}",
            self.peer_id(),
            self.welcome["reconnect_secret"].as_str().expect("secret")
        )
    }

    pub fn session_id(&self) -> String {
        self.welcome["session_id"]
            .as_str()
            .expect("session id")
            .to_owned()
    }

    /// The next JSON message (5 s at most); `{"type":"closed","code":…}`
    /// when the server closed.
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("a message within 5 s");
            match msg {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON"),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return json!({"type": "closed", "code": code, "reason": reason});
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    return json!({"type": "closed", "code": 1006, "reason": e.to_string()});
                }
                None => return json!({"type": "closed", "code": 1006, "reason": "eof"}),
            }
        }
    }

    /// The next JSON message, or `None` if none arrives within `wait`.
    pub async fn next_or_timeout(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(&t).expect("JSON"));
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    return Some(json!({"type": "closed"}));
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next message of type `kind` within `wait`, skipping others.
    pub async fn expect_within(&mut self, kind: &str, wait: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self
                .next_or_timeout(left)
                .await
                .unwrap_or_else(|| panic!("no {kind} within {wait:?}"));
            if m["type"] == kind {
                return m;
            }
            assert_ne!(m["type"], "closed", "closed while waiting for {kind}: {m}");
        }
    }

    /// The next message of type `kind`, skipping others (bounded).
    pub async fn expect(&mut self, kind: &str) -> Value {
        for _ in 0..50 {
            let m = self.next().await;
            if m["type"] == kind {
                return m;
            }
            assert_ne!(m["type"], "closed", "closed while waiting for {kind}: {m}");
        }
        panic!("no {kind} message among the next 50");
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn signal(&mut self, to: &str, sid: Option<&str>, payload: Value) {
        let mut m = json!({"type": "signal", "to": to, "payload": payload});
        if let Some(s) = sid {
            m["sid"] = json!(s);
        }
        self.send(m).await;
    }
}

/// The metrics page of a node, from its ops listener.
pub async fn metrics(node: &Signal) -> String {
    reqwest::get(format!("http://{}/metrics", node.ops_addr()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}
