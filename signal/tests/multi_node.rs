//! Several signal nodes sharing one Redis: peers spread over nodes see one
//! room; a stopped node's peers leave; a Redis restart heals by itself.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Stack, metrics, public_room};
use floe_signal::Signal;
use serde_json::json;

fn redis_url() -> String {
    std::env::var("FLOE_TEST_REDIS_URL")
        .expect("FLOE_TEST_REDIS_URL is not set: run the suite through scripts/test.sh")
}

async fn cluster(stack: &Stack, url: &str, n: usize) -> Vec<Signal> {
    let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut s = stack.settings();
        s.redis_url = Some(url.to_owned());
        s.redis_prefix = prefix.clone();
        s.node_id = format!("node{i}");
        // Settings, not constants: a dead node is noticed in a second.
        s.node_beat = Duration::from_millis(200);
        s.node_dead_after = Duration::from_secs(1);
        nodes.push(stack.node(s).await);
    }
    nodes
}

async fn wait_ready(node: &Signal) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = reqwest::get(format!("http://{}/readyz", node.addr())).await;
        if matches!(&r, Ok(r) if r.status() == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "node never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn peers_on_three_nodes_share_rooms_presence_and_relay() {
    let stack = Stack::new().await;
    let nodes = cluster(&stack, &redis_url(), 3).await;
    for n in &nodes {
        wait_ready(n).await;
    }
    // Created on node 0, joined through all three.
    let room = public_room(&stack.http, &nodes[0], json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&nodes[0], id, "client_id=a").await;
    let mut b = Client::join(&nodes[1], id, "client_id=b").await;
    assert_eq!(b.welcome["peers"][0]["peer_id"], "a");
    assert_eq!(a.expect("peer-joined").await["peer_id"], "b");
    let mut c = Client::join(&nodes[2], id, "client_id=c").await;
    assert_eq!(c.welcome["peers"].as_array().expect("list").len(), 2);
    assert_eq!(a.expect("peer-joined").await["peer_id"], "c");
    assert_eq!(b.expect("peer-joined").await["peer_id"], "c");

    // Offer/answer/candidates across nodes, exact and in order.
    let offer = json!({"type": "offer", "sdp": "x".repeat(1_600)});
    a.signal("b", Some(&b.session_id()), offer.clone()).await;
    let got = b.expect("signal").await;
    assert_eq!(
        (got["from"].clone(), got["payload"].clone()),
        (json!("a"), offer)
    );
    for i in 0..30 {
        c.signal("a", None, json!({"candidate": i})).await;
    }
    for i in 0..30 {
        assert_eq!(a.expect("signal").await["payload"]["candidate"], i);
    }
    a.send(json!({"type": "broadcast", "payload": {"n": 1}}))
        .await;
    assert_eq!(b.expect("broadcast").await["payload"]["n"], 1);
    assert_eq!(c.expect("broadcast").await["payload"]["n"], 1);

    // Errors across nodes.
    a.signal("b", Some("s_old"), json!({})).await;
    assert_eq!(a.expect("error").await["code"], "stale_session");
    a.signal("zed", None, json!({})).await;
    assert_eq!(a.expect("error").await["code"], "peer_not_found");

    // b reconnects through node 2: its node-1 socket is replaced.
    let b2 = Client::join(&nodes[2], id, &b.reconnect_query()).await;
    assert_eq!(b.next().await["code"], 4001);
    assert_eq!(a.expect("peer-joined").await["session_id"], b2.session_id());
    let mut b2 = b2;
    a.signal("b", Some(&b2.session_id()), json!({"again": true}))
        .await;
    assert_eq!(b2.expect("signal").await["payload"]["again"], true);

    // The REST view from any node (peer ids for the owner only).
    let owner = room["owner_key"].as_str().expect("owner key");
    let info = common::room_as_owner(&stack.http, &nodes[1], id, owner).await;
    assert_eq!(info["peers"], json!(["a", "b", "c"]));
    assert_eq!(info["peer_count"], 3);

    // c leaves: everyone hears it.
    c.send(json!({"type": "leave"})).await;
    assert_eq!(a.expect("peer-left").await["peer_id"], "c");
    assert_eq!(b2.expect("peer-left").await["peer_id"], "c");
    let m = metrics(&nodes[1]).await;
    assert!(m.contains("floe_signal_relay_latency_seconds_count"), "{m}");
}

#[tokio::test]
async fn one_time_rooms_and_capacity_hold_across_nodes() {
    let stack = Stack::new().await;
    let nodes = cluster(&stack, &redis_url(), 2).await;
    let room = public_room(&stack.http, &nodes[0], json!({"one_time": true})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&nodes[0], id, "client_id=a").await;
    let _b = Client::join(&nodes[1], id, "client_id=b").await;
    a.expect("peer-joined").await;
    let (_c, first) = Client::connect_raw(&nodes[0], id, "client_id=c").await;
    assert_eq!(first["code"], "room_sealed");

    let room = public_room(&stack.http, &nodes[1], json!({"max_peers": 2})).await;
    let id = room["room_id"].as_str().expect("id");
    let _x = Client::join(&nodes[0], id, "").await;
    let _y = Client::join(&nodes[1], id, "").await;
    let (_z, first) = Client::connect_raw(&nodes[0], id, "").await;
    assert_eq!(first["code"], "room_full");
}

#[tokio::test]
async fn a_stopped_node_sends_its_peers_elsewhere_and_others_hear_them_leave() {
    let stack = Stack::new().await;
    let mut nodes = cluster(&stack, &redis_url(), 2).await;
    let room = public_room(&stack.http, &nodes[0], json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&nodes[0], id, "client_id=a").await;
    let mut b = Client::join(&nodes[1], id, "client_id=b").await;
    a.expect("peer-joined").await;
    let node1 = nodes.remove(1);
    let stop = tokio::spawn(node1.stop());
    assert_eq!(b.next().await["code"], 1012);
    let left = a.expect("peer-left").await;
    assert_eq!(
        (left["peer_id"].clone(), left["reason"].clone()),
        (json!("b"), json!("node_draining"))
    );
    tokio::time::timeout(Duration::from_secs(15), stop)
        .await
        .expect("stopped")
        .expect("join");
    // b reconnects to the surviving node.
    let b2 = Client::join(&nodes[0], id, "client_id=b").await;
    assert_eq!(b2.welcome["peers"][0]["peer_id"], "a");
}

/// A private Redis this test may stop and restart.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut r = Self {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn a_redis_restart_heals_without_restarting_nodes() {
    let stack = Stack::new().await;
    let mut redis = OwnRedis::start();
    let nodes = cluster(&stack, &redis.url(), 2).await;
    for n in &nodes {
        wait_ready(n).await;
    }
    let room = public_room(&stack.http, &nodes[0], json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&nodes[0], id, "client_id=a").await;
    let mut b = Client::join(&nodes[1], id, "client_id=b").await;
    a.expect("peer-joined").await;

    // Redis goes away (and comes back empty: no persistence).
    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = reqwest::get(format!("http://{}/readyz", nodes[0].addr()))
            .await
            .expect("readyz");
        if r.status() == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A message during the outage is refused, not lost silently.
    a.signal("b", None, json!({"during": "outage"})).await;
    let err = a.expect("error").await;
    assert!(
        ["bus_unavailable", "peer_unreachable"].contains(&err["code"].as_str().unwrap_or("")),
        "{err}"
    );

    redis.spawn();
    for n in &nodes {
        wait_ready(n).await;
    }
    // Nodes re-registered rooms and peers: relay works again both ways.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        a.signal("b", Some(&b.session_id()), json!({"after": "restart"}))
            .await;
        let m = a.next_or_timeout(Duration::from_millis(300)).await;
        match m {
            Some(m) if m["type"] == "error" => {
                assert!(Instant::now() < deadline, "relay did not recover: {m}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => break,
        }
    }
    let got = b.expect("signal").await;
    assert_eq!(got["payload"]["after"], "restart");
    b.signal("a", Some(&a.session_id()), json!({"back": 1}))
        .await;
    assert_eq!(a.expect("signal").await["payload"]["back"], 1);
    let m = metrics(&nodes[0]).await;
    assert!(
        !m.contains("floe_signal_redis_errors_total 0"),
        "errors were counted: {m}"
    );
}
