//! `floe turn` with a real control plane, a real TURN client (webrtc-rs
//! `turn`) and raw STUN requests, over loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use floe_common::Shutdown;
use floe_control::{ControlPlane, Settings as CpSettings, StoreLocation};
use floe_proto::api::IceServers;
use floe_proto::credential::TurnSecrets;
use floe_turn::{Settings, TurnServer};
use serde_json::{Value, json};
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use webrtc_util::Conn;

const ADMIN: &str = "admin-token-for-tests-0123";
const INTERNAL: &str = "internal-token-for-tests-0123";
const SECRETS: &str = "k1=turn-secret-for-tests-0123";

struct Stack {
    cp: Option<ControlPlane>,
    cp_dir: tempfile::TempDir,
    cp_addr: SocketAddr,
    http: reqwest::Client,
    /// The internal token the control plane takes.
    internal: String,
}

fn cp_settings(dir: &std::path::Path, listen: SocketAddr, internal: &str) -> CpSettings {
    CpSettings {
        listen,
        store: StoreLocation::Embedded(dir.join("cp.redb")),
        redis_prefix: "unused:".into(),
        admin_token: ADMIN.into(),
        internal_token: internal.into(),
        turn_secrets: Some(TurnSecrets::parse(SECRETS).expect("secrets")),
        stun_urls: vec!["stun:127.0.0.1:3478".into()],
        turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
        credential_ttl_secs: 600,
        max_token_ttl_secs: 86_400,
        api_rate: 10_000.0,
        trusted_proxies: Default::default(),
        enforcement_refresh: std::time::Duration::from_secs(2),
        store_replicas: None,
    }
}

impl Stack {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = floe_control::start(
            cp_settings(dir.path(), "127.0.0.1:0".parse().expect("addr"), INTERNAL),
            Shutdown::new(),
        )
        .await
        .expect("control plane");
        let s = Self {
            cp_addr: cp.addr(),
            cp: Some(cp),
            cp_dir: dir,
            http: reqwest::Client::new(),
            internal: INTERNAL.into(),
        };
        for (id, plan) in [
            ("paid", json!({"turn": true})),
            ("free", json!({"turn": false})),
            ("one", json!({"turn": true, "max_allocations": 1})),
        ] {
            let r = s
                .http
                .post(format!("{}/v1/tenants", s.url()))
                .bearer_auth(ADMIN)
                .json(&json!({"id": id, "name": id, "plan": plan}))
                .send()
                .await
                .expect("tenant");
            assert_eq!(r.status(), 201);
        }
        s
    }

    fn url(&self) -> String {
        format!("http://{}", self.cp_addr)
    }

    async fn stop_control_plane(&mut self) {
        if let Some(cp) = self.cp.take() {
            drop(cp);
        }
        // The store file is released once the server task ends.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    async fn start_control_plane(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match floe_control::start(
                cp_settings(self.cp_dir.path(), self.cp_addr, &self.internal),
                Shutdown::new(),
            )
            .await
            {
                Ok(cp) => {
                    self.cp = Some(cp);
                    return;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "control plane restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn turn_settings(&self, data_dir: Option<&std::path::Path>) -> Settings {
        let mut s = Settings::new(
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        );
        s.secrets = Some(TurnSecrets::parse(SECRETS).expect("secrets"));
        s.control_url = Some(self.url());
        s.internal_token = Some(INTERNAL.into());
        s.allow_peers = vec!["127.0.0.0/8".parse().expect("net")];
        s.usage_interval = Duration::from_millis(500);
        s.drain = Duration::from_millis(200);
        s.server_id = "turn-test".into();
        s.data_dir = data_dir.map(|d| d.to_owned());
        s.udp_sockets = 1;
        s
    }

    async fn turn(&self, data_dir: Option<&std::path::Path>) -> TurnServer {
        floe_turn::start(self.turn_settings(data_dir), Shutdown::new())
            .await
            .expect("turn")
    }

    /// Credentials as the tenant's back end gets them (`POST
    /// /v1/ice-servers` with an API key of the tenant).
    async fn credentials(&self, tenant: &str, room: &str, peer: &str) -> (String, String) {
        let key: Value = self
            .http
            .post(format!("{}/v1/tenants/{tenant}/keys", self.url()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("key")
            .json()
            .await
            .expect("json");
        let ice: IceServers = self
            .http
            .post(format!("{}/v1/ice-servers", self.url()))
            .basic_auth(key["id"].as_str().expect("key id"), key["secret"].as_str())
            .json(&json!({"room": room, "peer": peer}))
            .send()
            .await
            .expect("ice servers")
            .json()
            .await
            .expect("json");
        let turn = ice
            .ice_servers
            .iter()
            .find(|s| s.username.is_some())
            .unwrap_or_else(|| panic!("no TURN credentials for {tenant}: {:?}", ice.turn_refused));
        (
            turn.username.clone().expect("username"),
            turn.credential.clone().expect("password"),
        )
    }

    /// Adds a revocation (admin), e.g. `{"tenant": "t", "room": "r"}`.
    async fn revoke(&self, scope: Value) {
        let r = self
            .http
            .post(format!("{}/v1/revocations", self.url()))
            .bearer_auth(ADMIN)
            .json(&scope)
            .send()
            .await
            .expect("revoke");
        assert_eq!(r.status(), 201);
    }

    async fn usage(&self, tenant: &str) -> Value {
        self.http
            .get(format!("{}/v1/tenants/{tenant}/usage", self.url()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("json")
    }

    /// Waits until the ledger shows `out`/`in` bytes for the tenant.
    async fn await_usage(&self, tenant: &str, out: u64, inb: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let u = self.usage(tenant).await;
            if u["total"]["bytes_out"] == out && u["total"]["bytes_in"] == inb {
                return u;
            }
            assert!(
                Instant::now() < deadline,
                "ledger {u} never reached out={out} in={inb}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A webrtc-rs TURN client with an allocation on `server`.
async fn client(
    server: SocketAddr,
    username: &str,
    password: &str,
) -> (turn::client::Client, impl Conn + use<>) {
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let c = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: username.to_owned(),
        password: password.to_owned(),
        realm: "floe".into(),
        software: "test".into(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .expect("client");
    c.listen().await.expect("listen");
    let relay = c.allocate().await.expect("allocate");
    (c, relay)
}

/// Relays `n` messages of `size` bytes each way between a TURN client
/// and a plain UDP peer; returns the payload bytes each way.
async fn exchange(relay: &impl Conn, peer: &UdpSocket, n: usize, size: usize) -> u64 {
    let relayed = relay.local_addr().expect("relayed address");
    let peer_addr = peer.local_addr().expect("peer address");
    let mut buf = vec![0u8; 2_048];
    for i in 0..n {
        let msg = vec![(i % 251) as u8; size];
        relay
            .send_to(&msg, peer_addr)
            .await
            .expect("send via relay");
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
            .await
            .expect("peer receives")
            .expect("recv");
        assert_eq!((len, from), (size, relayed));
        assert_eq!(&buf[..len], &msg[..], "payload {i} intact");
        peer.send_to(&msg, relayed).await.expect("peer replies");
        let (len, from) = tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
            .await
            .expect("client receives")
            .expect("recv");
        assert_eq!((len, from), (size, peer_addr));
    }
    (n * size) as u64
}

#[tokio::test]
async fn relays_both_ways_and_the_ledger_matches_exactly() {
    let stack = Stack::new().await;
    let turn = stack.turn(None).await;
    let (user, pass) = stack.credentials("paid", "room1", "alice").await;
    let (c, relay) = client(turn.listen_addr(), &user, &pass).await;
    assert!(relay.local_addr().expect("addr").ip().is_loopback());
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
    let bytes = exchange(&relay, &peer, 200, 1_000).await;
    // Channel data and Send indications were both exercised by the client.
    let usage = stack.await_usage("paid", bytes, bytes).await;
    assert_eq!(usage["rooms"]["room1"]["bytes_out"], bytes);
    assert_eq!(usage["total"]["packets_out"], 200);
    let metrics = metrics_page(&turn).await;
    assert!(
        metrics.contains(&format!(
            "floe_turn_relayed_bytes_total{{direction=\"out\",tenant=\"paid\"}} {bytes}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("floe_turn_allocations{tenant=\"paid\"} 1"));
    c.close().await.expect("close");
    turn.stop().await;
}

/// The server's Prometheus text page.
async fn metrics_page(turn: &TurnServer) -> String {
    reqwest::get(format!("http://{}/metrics", turn.http_addr()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The counter `name` (with its labels) in a Prometheus text page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn two_allocations_of_one_server_relay_to_each_other() {
    // In memory by default, through the kernel with --kernel-hairpin: the
    // same datagrams, sources, permissions and ledger either way.
    let stack = Stack::new().await;
    for kernel in [false, true] {
        let mut settings = stack.turn_settings(None);
        settings.kernel_hairpin = kernel;
        let turn = floe_turn::start(settings, Shutdown::new())
            .await
            .expect("turn");
        let room = format!("hairpin-{kernel}");
        let (user, pass) = stack.credentials("paid", &room, "alice").await;
        let (ca, a) = client(turn.listen_addr(), &user, &pass).await;
        let (user, pass) = stack.credentials("paid", &room, "bob").await;
        let (cb, b) = client(turn.listen_addr(), &user, &pass).await;
        let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        // Bob permits Alice; his probe reaches her relay before she
        // permits him, so it is billed out and dropped there.
        b.send_to(b"probe", a_addr).await.expect("probe");
        let no_permission = "floe_turn_discarded_total{reason=\"no_permission\"}";
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(&metrics_page(&turn).await, no_permission) < 1.0 {
            assert!(Instant::now() < deadline, "the probe was never dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut buf = vec![0u8; 2_048];
        let (n, size) = (100, 700);
        for i in 0..n {
            let msg = vec![(i % 251) as u8; size];
            for (from, to, to_addr, from_addr) in
                [(&a, &b, b_addr, a_addr), (&b, &a, a_addr, b_addr)]
            {
                from.send_to(&msg, to_addr).await.expect("send");
                let (len, src) =
                    tokio::time::timeout(Duration::from_secs(5), to.recv_from(&mut buf))
                        .await
                        .expect("relayed in time")
                        .expect("recv");
                assert_eq!((src, &buf[..len]), (from_addr, &msg[..]), "message {i}");
            }
        }
        let each_way = (n * size) as u64;
        let page = metrics_page(&turn).await;
        let hairpinned = metric(&page, "floe_turn_hairpinned_packets_total");
        assert_eq!(
            hairpinned,
            if kernel { 0.0 } else { (2 * n + 1) as f64 },
            "{page}"
        );
        assert_eq!(metric(&page, no_permission), 1.0, "{page}");
        let room_usage = |u: &Value| {
            (
                u["rooms"][&room]["bytes_out"].clone(),
                u["rooms"][&room]["bytes_in"].clone(),
            )
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let u = stack.usage("paid").await;
            if room_usage(&u) == (json!(2 * each_way + 5), json!(2 * each_way)) {
                break;
            }
            assert!(Instant::now() < deadline, "ledger for {room}: {u}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ca.close().await.expect("close");
        cb.close().await.expect("close");
        turn.stop().await;
    }
}

/// Sends a request and returns the decoded answer.
async fn roundtrip(sock: &UdpSocket, server: SocketAddr, setters: Vec<Box<dyn Setter>>) -> Message {
    let mut m = Message::new();
    m.build(&setters).expect("build");
    sock.send_to(&m.raw, server).await.expect("send");
    let mut buf = vec![0u8; 1_500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .expect("recv");
    let mut r = Message::new();
    r.raw = buf[..n].to_vec();
    r.decode().expect("decode");
    r
}

fn code(m: &Message) -> u16 {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).expect("ERROR-CODE");
    e.code.0
}

fn text(m: &Message, t: AttrType) -> String {
    String::from_utf8(m.get(t).expect("attribute")).expect("utf8")
}

/// An Allocate (UDP relay) without credentials: the first leg, answered
/// 401 with the realm and a nonce.
fn unsigned_allocate() -> Vec<Box<dyn Setter>> {
    vec![
        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
        Box::new(stun::agent::TransactionId::new()),
        Box::new(turn::proto::reqtrans::RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        }),
    ]
}

/// A request of `method` with `attrs`, authenticated with long-term
/// credentials (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY).
fn signed(
    method: Method,
    mut attrs: Vec<Box<dyn Setter>>,
    user: &str,
    pass: &str,
    nonce: &str,
) -> Vec<Box<dyn Setter>> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(MessageType::new(method, CLASS_REQUEST)),
        Box::new(stun::agent::TransactionId::new()),
    ];
    setters.append(&mut attrs);
    setters.push(Box::new(TextAttribute::new(ATTR_USERNAME, user.to_owned())));
    setters.push(Box::new(TextAttribute::new(ATTR_REALM, "floe".into())));
    setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.to_owned())));
    setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
        user.to_owned(),
        "floe".into(),
        pass.to_owned(),
    )));
    setters
}

/// A raw client that authenticates its requests.
struct Raw {
    sock: UdpSocket,
    server: SocketAddr,
    user: String,
    pass: String,
    nonce: String,
}

impl Raw {
    async fn new(server: SocketAddr, user: &str, pass: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // First leg: 401 with realm and nonce.
        let r = roundtrip(&sock, server, unsigned_allocate()).await;
        assert_eq!(code(&r), 401);
        assert_eq!(text(&r, ATTR_REALM), "floe");
        let nonce = text(&r, ATTR_NONCE);
        Self {
            sock,
            server,
            user: user.into(),
            pass: pass.into(),
            nonce,
        }
    }

    async fn request(&self, method: Method, attrs: Vec<Box<dyn Setter>>) -> Message {
        let setters = signed(method, attrs, &self.user, &self.pass, &self.nonce);
        roundtrip(&self.sock, self.server, setters).await
    }

    async fn allocate(&self, protocol: u8) -> Message {
        self.request(
            METHOD_ALLOCATE,
            vec![Box::new(turn::proto::reqtrans::RequestedTransport {
                protocol: turn::proto::Protocol(protocol),
            })],
        )
        .await
    }
}

#[tokio::test]
async fn every_refusal_has_its_stun_error() {
    let stack = Stack::new().await;
    let turn = stack.turn(None).await;
    let server = turn.listen_addr();
    let (user, pass) = stack.credentials("paid", "r", "p").await;

    // Wrong password.
    let raw = Raw::new(server, &user, "wrong").await;
    assert_eq!(code(&raw.allocate(17).await), 401);
    // Expired credential (correct HMAC).
    let secrets = TurnSecrets::parse(SECRETS).expect("secrets");
    let (old, old_pass) = secrets.issue(floe_proto::time::unix_now() - 10, "paid", "r", "p");
    let raw = Raw::new(server, &old.to_string(), &old_pass).await;
    assert_eq!(code(&raw.allocate(17).await), 401);
    // Unknown kid.
    let unknown = format!("{}:k9:paid:r:p", floe_proto::time::unix_now() + 60);
    let raw = Raw::new(server, &unknown, "x").await;
    assert_eq!(code(&raw.allocate(17).await), 401);
    // Stale (forged) nonce.
    let mut raw = Raw::new(server, &user, &pass).await;
    raw.nonce = "12345678-forged".into();
    let r = raw.allocate(17).await;
    assert_eq!(code(&r), 438);
    assert!(
        !text(&r, ATTR_NONCE).is_empty(),
        "438 carries a fresh nonce"
    );
    // Tenant without TURN (credentials forged with the secret).
    let (free, free_pass) = secrets.issue(floe_proto::time::unix_now() + 60, "free", "r", "p");
    let raw = Raw::new(server, &free.to_string(), &free_pass).await;
    assert_eq!(code(&raw.allocate(17).await), 403);
    // Unsupported transport, then a good allocation, then a mismatch.
    let raw = Raw::new(server, &user, &pass).await;
    assert_eq!(code(&raw.allocate(6).await), 442);
    let ok = raw.allocate(17).await;
    assert_eq!(
        ok.typ,
        MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE)
    );
    assert_eq!(code(&raw.allocate(17).await), 437);
    // Denied peer address.
    let denied = raw
        .request(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(turn::proto::peeraddr::PeerAddress {
                ip: "10.0.0.1".parse().expect("ip"),
                port: 9,
            })],
        )
        .await;
    assert_eq!(code(&denied), 403);
    let allowed = raw
        .request(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(turn::proto::peeraddr::PeerAddress {
                ip: "127.0.0.1".parse().expect("ip"),
                port: 9,
            })],
        )
        .await;
    assert_eq!(allowed.typ.class, CLASS_SUCCESS_RESPONSE);
    let bad_channel = raw
        .request(
            METHOD_CHANNEL_BIND,
            vec![
                Box::new(turn::proto::channum::ChannelNumber(0x3000)),
                Box::new(turn::proto::peeraddr::PeerAddress {
                    ip: "127.0.0.1".parse().expect("ip"),
                    port: 9,
                }),
            ],
        )
        .await;
    assert_eq!(code(&bad_channel), 400);
    // Refresh with lifetime 0 deletes; a second one finds nothing.
    let del = raw
        .request(
            METHOD_REFRESH,
            vec![Box::new(turn::proto::lifetime::Lifetime(Duration::ZERO))],
        )
        .await;
    assert_eq!(del.typ.class, CLASS_SUCCESS_RESPONSE);
    let again = raw
        .request(
            METHOD_REFRESH,
            vec![Box::new(turn::proto::lifetime::Lifetime(
                Duration::from_secs(60),
            ))],
        )
        .await;
    assert_eq!(code(&again), 437);

    // Allocation quota: tenant "one" may hold one allocation.
    let (u1, p1) = stack.credentials("one", "r", "a").await;
    let a = Raw::new(server, &u1, &p1).await;
    assert_eq!(a.allocate(17).await.typ.class, CLASS_SUCCESS_RESPONSE);
    let (u2, p2) = stack.credentials("one", "r", "b").await;
    let b = Raw::new(server, &u2, &p2).await;
    assert_eq!(code(&b.allocate(17).await), 486);

    let metrics = metrics_page(&turn).await;
    for needle in [
        "floe_turn_auth_failures_total{reason=\"bad_password\"} 1",
        "floe_turn_auth_failures_total{reason=\"expired\"} 1",
        "floe_turn_auth_failures_total{reason=\"unknown_kid\"} 1",
        "floe_turn_allocations_refused_total{reason=\"quota\"} 1",
        "floe_turn_allocations_refused_total{reason=\"turn_disabled\"} 1",
        "floe_turn_allocations_refused_total{reason=\"mismatch\"} 1",
        "floe_turn_denied_peers_total 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle}\n{metrics}");
    }
}

#[tokio::test]
async fn revocation_closes_live_allocations_within_five_seconds() {
    let stack = Stack::new().await;
    let turn = stack.turn(None).await;
    let (user, pass) = stack.credentials("paid", "room9", "mallory").await;
    let (_c, relay) = client(turn.listen_addr(), &user, &pass).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
    exchange(&relay, &peer, 3, 100).await;
    let revoked_at = Instant::now();
    stack
        .revoke(json!({"tenant": "paid", "room": "room9", "peer": "mallory"}))
        .await;
    let metrics_url = format!("http://{}/metrics", turn.http_addr());
    loop {
        let m = reqwest::get(&metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if m.contains("floe_turn_allocations{tenant=\"paid\"} 0") {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "allocation still open: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Data from the peer no longer reaches the client.
    peer.send_to(b"after", relay.local_addr().expect("addr"))
        .await
        .expect("send");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), relay.recv_from(&mut buf))
            .await
            .is_err()
    );
    // New allocations with the revoked scope are refused.
    let raw = Raw::new(turn.listen_addr(), &user, &pass).await;
    assert_eq!(code(&raw.allocate(17).await), 403);
}

#[tokio::test]
async fn usage_survives_a_control_plane_outage_and_a_turn_restart() {
    let mut stack = Stack::new().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let turn = stack.turn(Some(spool.path())).await;
    let (user, pass) = stack.credentials("paid", "r", "a").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");

    // Control plane down while bytes flow.
    stack.stop_control_plane().await;
    let (c, relay) = client(turn.listen_addr(), &user, &pass).await;
    let first = exchange(&relay, &peer, 50, 500).await;
    c.close().await.expect("close");
    // TURN stops gracefully while the control plane is still down: the
    // batches stay in the spool.
    turn.stop().await;

    stack.start_control_plane().await;
    let turn = stack.turn(Some(spool.path())).await;
    // A new id of its own for new batches; the spooled ones keep theirs.
    assert!(turn.server_id().starts_with("turn-test-"));
    // The restarted server re-sends the spooled batches.
    stack.await_usage("paid", first, first).await;

    // More traffic after the restart adds up exactly, never twice.
    let (user2, pass2) = stack.credentials("paid", "r", "b").await;
    let (_c2, relay2) = client(turn.listen_addr(), &user2, &pass2).await;
    let second = exchange(&relay2, &peer, 20, 300).await;
    stack
        .await_usage("paid", first + second, first + second)
        .await;
    turn.stop().await;
    let u = stack.usage("paid").await;
    assert_eq!(u["total"]["bytes_out"], first + second);
}

/// An internal-token rotation where TURN gets the new token first: the
/// control plane refuses its reports (401) until it has the token too, and
/// not a byte is lost (refused batches used to be dropped).
#[tokio::test]
async fn usage_refused_during_an_internal_token_rotation_is_kept_and_billed() {
    let mut stack = Stack::new().await;
    // This server ran before the rotation: it restarts with the saved
    // enforcement state, as it cannot fetch one with its new token.
    let spool = tempfile::tempdir().expect("spool dir");
    stack.turn(Some(spool.path())).await.stop().await;
    let mut settings = stack.turn_settings(Some(spool.path()));
    let rotated = "rotated-internal-token-0123";
    settings.internal_token = Some(rotated.into());
    let turn = floe_turn::start(settings, Shutdown::new())
        .await
        .expect("turn");
    let (user, pass) = stack.credentials("paid", "r", "a").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
    let (c, relay) = client(turn.listen_addr(), &user, &pass).await;
    let sent = exchange(&relay, &peer, 40, 400).await;
    c.close().await.expect("close");

    // Several usage intervals of refusals: kept, counted, not billed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &metrics_page(&turn).await,
        "floe_turn_usage_batches_total{result=\"rejected\"}",
    ) < 2.0
    {
        assert!(Instant::now() < deadline, "no refusal seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(
            &metrics_page(&turn).await,
            "floe_turn_usage_batches_pending"
        ) >= 1.0
    );
    assert_eq!(stack.usage("paid").await["total"]["bytes_out"], 0);

    // The control plane gets the new token: everything arrives, once.
    stack.stop_control_plane().await;
    stack.internal = rotated.into();
    stack.start_control_plane().await;
    stack.await_usage("paid", sent, sent).await;
    turn.stop().await;
}

/// A TURN server that starts while the control plane is away enforces
/// the state it saved before; one with nothing saved refuses allocations
/// (508, so clients try their next server) until the control plane
/// answers. Allowing everyone meanwhile let revoked and cut-off
/// credentials relay.
#[tokio::test]
async fn a_turn_started_without_its_control_plane_keeps_enforcing() {
    let mut stack = Stack::new().await;
    let spool = tempfile::tempdir().expect("spool dir");
    let turn = stack.turn(Some(spool.path())).await;
    let (ok_user, ok_pass) = stack.credentials("paid", "fine", "a").await;
    let (bad_user, bad_pass) = stack.credentials("paid", "banned", "b").await;
    stack
        .revoke(json!({"tenant": "paid", "room": "banned"}))
        .await;
    let saved = spool.path().join("enforcement.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&saved).is_ok_and(|s| s.contains("banned")) {
        assert!(Instant::now() < deadline, "the revocation was never saved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    turn.stop().await;
    stack.stop_control_plane().await;

    let restarted = stack.turn(Some(spool.path())).await;
    let bad = Raw::new(restarted.listen_addr(), &bad_user, &bad_pass).await;
    assert_eq!(code(&bad.allocate(17).await), 403);
    let ok = Raw::new(restarted.listen_addr(), &ok_user, &ok_pass).await;
    assert_eq!(ok.allocate(17).await.typ.class, CLASS_SUCCESS_RESPONSE);

    let fresh_dir = tempfile::tempdir().expect("fresh dir");
    let fresh = stack.turn(Some(fresh_dir.path())).await;
    let raw = Raw::new(fresh.listen_addr(), &ok_user, &ok_pass).await;
    let mut refused = ErrorCodeAttribute::default();
    refused
        .get_from(&raw.allocate(17).await)
        .expect("ERROR-CODE");
    assert_eq!(
        (
            refused.code.0,
            String::from_utf8_lossy(&refused.reason).as_ref()
        ),
        (508, "Control Plane Unavailable")
    );
    stack.start_control_plane().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let raw = Raw::new(fresh.listen_addr(), &ok_user, &ok_pass).await;
        if raw.allocate(17).await.typ.class == CLASS_SUCCESS_RESPONSE {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused with the control plane back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    restarted.stop().await;
    fresh.stop().await;
}

/// A proxy in front of the control plane that refuses every usage batch
/// (503) and passes everything else through; returns its address.
async fn refusing_usage(control: SocketAddr) -> SocketAddr {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    let http = reqwest::Client::new();
    let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let http = http.clone();
        async move {
            if uri.path() == "/internal/v1/usage" {
                return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
            }
            let mut req = http
                .request(method, format!("http://{control}{uri}"))
                .body(body);
            for name in ["authorization", "content-type"] {
                if let Some(v) = headers.get(name) {
                    req = req.header(name, v);
                }
            }
            let r = req.send().await.expect("control plane");
            let status = StatusCode::from_u16(r.status().as_u16()).expect("status");
            (status, r.bytes().await.expect("body").to_vec())
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(forward))
            .await
            .expect("proxy")
    });
    addr
}

/// While usage batches keep being refused, enforcement is still polled:
/// a revocation closes a live allocation as it does when batches land.
#[tokio::test]
async fn cut_offs_arrive_while_usage_batches_are_refused() {
    let stack = Stack::new().await;
    let mut settings = stack.turn_settings(None);
    settings.control_url = Some(format!("http://{}", refusing_usage(stack.cp_addr).await));
    let turn = floe_turn::start(settings, Shutdown::new())
        .await
        .expect("turn");
    let (user, pass) = stack.credentials("paid", "room7", "eve").await;
    let (_c, relay) = client(turn.listen_addr(), &user, &pass).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
    exchange(&relay, &peer, 3, 100).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &metrics_page(&turn).await,
        "floe_turn_usage_batches_pending",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no batch ever pending");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack
        .revoke(json!({"tenant": "paid", "room": "room7"}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics_page(&turn)
        .await
        .contains("floe_turn_allocations{tenant=\"paid\"} 0")
    {
        assert!(
            Instant::now() < deadline,
            "the revoked allocation stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(
            &metrics_page(&turn).await,
            "floe_turn_usage_batches_pending"
        ) >= 1.0
    );
    // No stop: its final flush would wait out its deadline on refusals.
}

#[tokio::test]
async fn rotated_secrets_keep_earlier_credentials_valid() {
    let stack = Stack::new().await;
    let mut s = stack.turn_settings(None);
    // k2 is the new active secret; k1 (the control plane's) is still live.
    let rotated = format!("k2=rotated-secret-0123456789,{SECRETS}");
    s.secrets = Some(TurnSecrets::parse(&rotated).expect("secrets"));
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let (old_user, old_pass) = stack.credentials("paid", "r", "before").await;
    assert!(old_user.contains(":k1:"));
    let raw = Raw::new(turn.listen_addr(), &old_user, &old_pass).await;
    assert_eq!(raw.allocate(17).await.typ.class, CLASS_SUCCESS_RESPONSE);
    let (new_user, new_pass) = TurnSecrets::parse(&rotated).expect("secrets").issue(
        floe_proto::time::unix_now() + 600,
        "paid",
        "r",
        "after",
    );
    assert!(new_user.to_string().contains(":k2:"));
    let raw = Raw::new(turn.listen_addr(), &new_user.to_string(), &new_pass).await;
    assert_eq!(raw.allocate(17).await.typ.class, CLASS_SUCCESS_RESPONSE);
}

/// A rotation without restarts: TURN reads its secrets file again (on a
/// timer, and at once on SIGHUP), so a new kid is accepted before the
/// control plane issues it; a broken file keeps the secrets in use.
#[tokio::test]
async fn turn_secrets_are_reloaded_from_their_file() {
    let stack = Stack::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("turn-secrets");
    std::fs::write(&file, format!("{SECRETS}\n")).expect("write");
    let mut s = stack.turn_settings(None);
    s.secrets_file = Some(file.clone());
    s.secrets_reload = Duration::from_millis(100);
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let rotated = "k2=the-next-secret-0123456789";
    let issue = |kid_secret: &str| {
        let (user, pass) = TurnSecrets::parse(kid_secret).expect("secrets").issue(
            floe_proto::time::unix_now() + 600,
            "paid",
            "r",
            "p",
        );
        (user.to_string(), pass)
    };
    let allocates = |creds: (String, String)| allocate_status(turn.listen_addr(), creds);
    assert_eq!(allocates(issue(rotated)).await, 401, "k2 is not known yet");
    // Step 1 of a rotation: the new secret second.
    std::fs::write(&file, format!("{SECRETS}\n{rotated}\n")).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while allocates(issue(rotated)).await != 200 {
        assert!(Instant::now() < deadline, "the new kid was never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(allocates(issue(SECRETS)).await, 200, "k1 still valid");
    // A broken file changes nothing.
    std::fs::write(&file, "not a secret line\n").expect("write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(allocates(issue(rotated)).await, 200);
    assert!(
        metric(
            &metrics_page(&turn).await,
            "floe_turn_secrets_reloads_total{result=\"invalid\"}"
        ) >= 1.0
    );
    turn.stop().await;

    // SIGHUP reads it at once: a server whose timer waits an hour.
    std::fs::write(&file, format!("{SECRETS}\n")).expect("write");
    let mut s = stack.turn_settings(None);
    s.secrets_file = Some(file.clone());
    s.secrets_reload = Duration::from_secs(3_600);
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let allocates = |creds: (String, String)| allocate_status(turn.listen_addr(), creds);
    assert_eq!(allocates(issue(SECRETS)).await, 200);
    std::fs::write(&file, format!("{rotated}\n")).expect("write");
    // Its handler is installed (the first server's was too): SIGHUP does
    // not end this process.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while allocates(issue(SECRETS)).await != 401 {
        assert!(Instant::now() < deadline, "k1 was never dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(allocates(issue(rotated)).await, 200);
    turn.stop().await;
}

/// `--external-ip-stun`: TURN asks a STUN server how it sees the relay
/// address and advertises that (on loopback the same address; behind a
/// cloud's 1:1 NAT the public one). No answer, no start.
#[tokio::test]
async fn the_external_address_is_learned_over_stun() {
    let stack = Stack::new().await;
    let stun_server = stack.turn(None).await;
    let mut s = stack.turn_settings(None);
    s.external_ip_stun = Some(stun_server.listen_addr().to_string());
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let (user, pass) = stack.credentials("paid", "r", "ext").await;
    let raw = Raw::new(turn.listen_addr(), &user, &pass).await;
    let ok = raw.allocate(17).await;
    let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
    relayed.get_from(&ok).expect("XOR-RELAYED-ADDRESS");
    assert_eq!(relayed.ip.to_string(), "127.0.0.1");

    let mut s = stack.turn_settings(None);
    s.external_ip_stun = Some("no-such-host.invalid:3478".into());
    let err = floe_turn::start(s, Shutdown::new())
        .await
        .err()
        .expect("no start");
    assert!(
        err.to_string().contains("cannot resolve STUN server"),
        "{err}"
    );
}

/// A UDP Allocate with `(user, pass)`: 200 when granted, else its error code.
async fn allocate_status(server: SocketAddr, (user, pass): (String, String)) -> u16 {
    let r = Raw::new(server, &user, &pass).await.allocate(17).await;
    if r.typ.class == CLASS_SUCCESS_RESPONSE {
        200
    } else {
        code(&r)
    }
}

/// Sends one STUN message over a stream and reads one back.
async fn stream_roundtrip<S>(stream: &mut S, setters: Vec<Box<dyn Setter>>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut m = Message::new();
    m.build(&setters).expect("build");
    stream.write_all(&m.raw).await.expect("write");
    let mut header = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header))
        .await
        .expect("an answer")
        .expect("read");
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.expect("read body");
    let mut r = Message::new();
    r.raw = [header.to_vec(), body].concat();
    r.decode().expect("decode");
    r
}

#[tokio::test]
async fn stun_and_turn_over_tls() {
    use tokio_rustls::rustls;
    let stack = Stack::new().await;
    let certs = tempfile::tempdir().expect("tempdir");
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_file, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_file, generated.cert.pem()).expect("write cert");
    std::fs::write(&key_file, generated.signing_key.serialize_pem()).expect("write key");
    let mut s = stack.turn_settings(None);
    s.tls = Some(floe_turn::TlsSettings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        cert_file,
        key_file,
    });
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let tls_addr = turn.tls_addr().expect("TLS listener");

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(generated.cert.der().clone())
        .expect("trust anchor");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(tls_addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");

    // STUN Binding over TLS.
    let resp = stream_roundtrip(
        &mut tls,
        vec![
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ],
    )
    .await;
    assert_eq!(resp.typ, BINDING_SUCCESS);

    // TURN Allocate over TLS: challenge, then authenticated.
    let (user, pass) = stack.credentials("paid", "r", "tls").await;
    let transport = || {
        Box::new(turn::proto::reqtrans::RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        })
    };
    let challenge = stream_roundtrip(
        &mut tls,
        vec![
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(stun::agent::TransactionId::new()),
            transport(),
        ],
    )
    .await;
    assert_eq!(code(&challenge), 401);
    let nonce = text(&challenge, ATTR_NONCE);
    let ok = stream_roundtrip(
        &mut tls,
        vec![
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(stun::agent::TransactionId::new()),
            transport(),
            Box::new(TextAttribute::new(ATTR_USERNAME, user.clone())),
            Box::new(TextAttribute::new(ATTR_REALM, "floe".into())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
            Box::new(MessageIntegrity::new_long_term_integrity(
                user,
                "floe".into(),
                pass,
            )),
        ],
    )
    .await;
    assert_eq!(
        ok.typ,
        MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE)
    );
    assert!(ok.contains(ATTR_XOR_RELAYED_ADDRESS));
    let metrics = metrics_page(&turn).await;
    assert!(metrics.contains("floe_turn_stun_requests_total{method=\"binding\",result=\"success\",transport=\"tls\"} 1"), "{metrics}");
}

#[tokio::test]
async fn ipv6_relays_and_requested_address_family() {
    let stack = Stack::new().await;
    let mut s = stack.turn_settings(None);
    s.relay_ips = vec!["127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")];
    s.allow_peers.push("::1/128".parse().expect("net"));
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");

    // An IPv4 client asks for an IPv6 relay (RFC 6156 REQUESTED-ADDRESS-FAMILY).
    let (user, pass) = stack.credentials("paid", "r", "v6").await;
    let raw = Raw::new(turn.listen_addr(), &user, &pass).await;
    let ok = raw
        .request(
            METHOD_ALLOCATE,
            vec![
                Box::new(turn::proto::reqtrans::RequestedTransport {
                    protocol: turn::proto::PROTO_UDP,
                }),
                Box::new(turn::proto::reqfamily::REQUESTED_FAMILY_IPV6),
            ],
        )
        .await;
    assert_eq!(ok.typ.class, CLASS_SUCCESS_RESPONSE);
    let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
    relayed.get_from(&ok).expect("XOR-RELAYED-ADDRESS");
    assert!(relayed.ip.is_ipv6(), "relay is {}", relayed.ip);
    // A permission for an IPv4 peer on an IPv6 relay is a family mismatch.
    let mismatch = raw
        .request(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(turn::proto::peeraddr::PeerAddress {
                ip: "127.0.0.1".parse().expect("ip"),
                port: 9,
            })],
        )
        .await;
    assert_eq!(code(&mismatch), 443);

    // Data relayed between an IPv6 relay and an IPv6 peer.
    let (user2, pass2) = stack.credentials("paid", "r", "v6b").await;
    let raw2 = Raw::new(turn.listen_addr(), &user2, &pass2).await;
    let ok2 = raw2
        .request(
            METHOD_ALLOCATE,
            vec![
                Box::new(turn::proto::reqtrans::RequestedTransport {
                    protocol: turn::proto::PROTO_UDP,
                }),
                Box::new(turn::proto::reqfamily::REQUESTED_FAMILY_IPV6),
            ],
        )
        .await;
    let mut relay_addr = turn::proto::relayaddr::RelayedAddress::default();
    relay_addr.get_from(&ok2).expect("relayed");
    let relay_addr = SocketAddr::new(relay_addr.ip, relay_addr.port);
    let peer = UdpSocket::bind("[::1]:0").await.expect("v6 peer");
    let peer_addr = peer.local_addr().expect("addr");
    let perm = raw2
        .request(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(turn::proto::peeraddr::PeerAddress {
                ip: peer_addr.ip(),
                port: peer_addr.port(),
            })],
        )
        .await;
    assert_eq!(perm.typ.class, CLASS_SUCCESS_RESPONSE);
    // Client to peer with a Send indication.
    let mut send = Message::new();
    send.build(&[
        Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
        Box::new(stun::agent::TransactionId::new()),
        Box::new(turn::proto::peeraddr::PeerAddress {
            ip: peer_addr.ip(),
            port: peer_addr.port(),
        }),
        Box::new(turn::proto::data::Data(b"over six".to_vec())),
    ])
    .expect("build");
    raw2.sock
        .send_to(&send.raw, turn.listen_addr())
        .await
        .expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
        .await
        .expect("peer receives")
        .expect("recv");
    assert_eq!((&buf[..n], from), (&b"over six"[..], relay_addr));
    // Peer to client arrives as a Data indication.
    peer.send_to(b"back", relay_addr).await.expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), raw2.sock.recv_from(&mut buf))
        .await
        .expect("client receives")
        .expect("recv");
    let mut data = Message::new();
    data.raw = buf[..n].to_vec();
    data.decode().expect("decode");
    assert_eq!(data.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
    assert_eq!(data.get(ATTR_DATA).expect("DATA"), b"back");
}

#[tokio::test]
async fn drain_refuses_new_allocations_but_keeps_relaying() {
    let stack = Stack::new().await;
    let mut s = stack.turn_settings(None);
    s.drain = Duration::from_secs(3);
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let (listen, http) = (turn.listen_addr(), turn.http_addr());
    let (user, pass) = stack.credentials("paid", "r", "stay").await;
    let (_c, relay) = client(listen, &user, &pass).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
    exchange(&relay, &peer, 2, 100).await;

    let started = Instant::now();
    let stopping = tokio::spawn(turn.stop());
    // Readiness turns false at once.
    loop {
        let r = reqwest::get(format!("http://{http}/readyz"))
            .await
            .expect("readyz");
        if r.status() == 503 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still ready while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New allocations are refused with 508 (clients try another server) ...
    let (user2, pass2) = stack.credentials("paid", "r", "new").await;
    let raw = Raw::new(listen, &user2, &pass2).await;
    assert_eq!(code(&raw.allocate(17).await), 508);
    // ... while the existing one keeps relaying.
    exchange(&relay, &peer, 5, 100).await;
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("stops")
        .expect("join");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the drain lasted its deadline"
    );
    // Every relayed byte was reported before the exit.
    stack.await_usage("paid", 700, 700).await;
}

/// A TURN client over TCP that builds its requests by hand.
struct TcpClient {
    stream: tokio::net::TcpStream,
    user: String,
    pass: String,
    nonce: String,
}

impl TcpClient {
    /// Connects (with a receive buffer of `rcvbuf` bytes when given) and
    /// allocates a relayed address, which it returns.
    async fn allocate(
        server: SocketAddr,
        (user, pass): (String, String),
        rcvbuf: Option<u32>,
    ) -> (Self, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).expect("rcvbuf");
        }
        let mut stream = socket.connect(server).await.expect("connect");
        let challenge = stream_roundtrip(&mut stream, unsigned_allocate()).await;
        assert_eq!(code(&challenge), 401);
        let mut c = Self {
            stream,
            user,
            pass,
            nonce: text(&challenge, ATTR_NONCE),
        };
        let ok = c
            .request(
                METHOD_ALLOCATE,
                vec![Box::new(turn::proto::reqtrans::RequestedTransport {
                    protocol: turn::proto::PROTO_UDP,
                })],
            )
            .await;
        assert_eq!(ok.typ.class, CLASS_SUCCESS_RESPONSE);
        let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
        relayed.get_from(&ok).expect("XOR-RELAYED-ADDRESS");
        (c, SocketAddr::new(relayed.ip, relayed.port))
    }

    async fn request(&mut self, method: Method, attrs: Vec<Box<dyn Setter>>) -> Message {
        let setters = signed(method, attrs, &self.user, &self.pass, &self.nonce);
        stream_roundtrip(&mut self.stream, setters).await
    }

    async fn bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let r = self
            .request(
                METHOD_CHANNEL_BIND,
                vec![
                    Box::new(turn::proto::channum::ChannelNumber(channel)),
                    Box::new(turn::proto::peeraddr::PeerAddress {
                        ip: peer.ip(),
                        port: peer.port(),
                    }),
                ],
            )
            .await;
        assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "channel bind");
    }
}

/// A TCP client that stops reading while its partner sends 8 MB (more
/// than its queue and the largest kernel send buffer hold): what the
/// partner is billed out equals what the slow client is billed in plus
/// what was dropped for it (by reason), and what it is billed in is what
/// it received.
#[tokio::test]
async fn a_slow_tcp_reader_is_billed_what_it_received() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::new().await;
    let turn = stack.turn(None).await;
    let server = turn.listen_addr();
    let (mut a, a_relayed) =
        TcpClient::allocate(server, stack.credentials("paid", "tcp-a", "a").await, None).await;
    let (mut b, b_relayed) = TcpClient::allocate(
        server,
        stack.credentials("paid", "tcp-b", "b").await,
        Some(4096),
    )
    .await;
    a.bind_channel(0x4000, b_relayed).await;
    b.bind_channel(0x4000, a_relayed).await;

    // A sends 8,192 ChannelData messages of 1,000 B; B reads nothing.
    let (count, size) = (8_192u64, 1_000usize);
    let mut frame = vec![0x40, 0x00];
    frame.extend_from_slice(&(size as u16).to_be_bytes());
    frame.extend(std::iter::repeat_n(7u8, size));
    for _ in 0..count {
        a.stream.write_all(&frame).await.expect("A sends");
    }
    let sent = count * size as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack.usage("paid").await["rooms"]["tcp-a"]["bytes_out"] != sent {
        assert!(Instant::now() < deadline, "A's bytes never all billed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // B reads what reached it until the server has nothing more.
    let mut received = 0u64;
    let mut header = [0u8; 4];
    let mut body = vec![0u8; 2_048];
    while let Ok(r) =
        tokio::time::timeout(Duration::from_secs(1), b.stream.read_exact(&mut header)).await
    {
        r.expect("read");
        assert_eq!(&header[..2], &[0x40, 0x00], "ChannelData on B's channel");
        let len = u16::from_be_bytes([header[2], header[3]]) as usize;
        b.stream
            .read_exact(&mut body[..(len + 3) & !3])
            .await
            .expect("read data");
        received += len as u64;
    }
    let page = metrics_page(&turn).await;
    let dropped: f64 = ["client_slow", "client_gone", "no_permission", "bitrate"]
        .iter()
        .map(|r| {
            metric(
                &page,
                &format!("floe_turn_discarded_bytes_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    let slow = metric(
        &page,
        "floe_turn_discarded_bytes_total{reason=\"client_slow\"}",
    );
    assert!(
        slow > 0.0 && received < sent,
        "B's queue never overflowed: {page}"
    );
    assert_eq!(received + dropped as u64, sent, "{page}");

    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let u = stack.usage("paid").await;
        if u["rooms"]["tcp-b"]["bytes_in"] == received {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B billed in {u}, received {received}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    turn.stop().await;
}
