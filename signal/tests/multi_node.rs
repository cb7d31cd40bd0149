//! Several signal nodes sharing one Redis: peers spread over nodes see one
//! room; a stopped node's peers leave; a Redis restart heals by itself.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Stack, metrics, public_room};
use floe_signal::Signal;
use serde_json::{Value, json};

fn redis_url() -> String {
    std::env::var("FLOE_TEST_REDIS_URL")
        .expect("FLOE_TEST_REDIS_URL is not set: run the suite through scripts/test.sh")
}

fn redis_at(url: &str) -> floe_common::redis_link::Endpoint {
    floe_common::redis_link::Endpoint::parse("test Redis", url, None, None).expect("a Redis URL")
}

/// `n` nodes on the Redis at `url`, quick to notice a dead node.
async fn cluster(stack: &Stack, url: &str, n: usize) -> Vec<Signal> {
    cluster_on(stack, &redis_at(url), n, |s| {
        // Settings, not constants: a dead node is noticed in a second.
        s.node_beat = Duration::from_millis(200);
        s.node_dead_after = Duration::from_secs(1);
    })
    .await
}

/// `n` nodes on `redis` under a fresh key prefix, each set up by `tune`.
async fn cluster_on(
    stack: &Stack,
    redis: &floe_common::redis_link::Endpoint,
    n: usize,
    tune: impl Fn(&mut floe_signal::Settings),
) -> Vec<Signal> {
    let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut s = stack.settings();
        s.redis = Some(redis.clone());
        s.redis_prefix = prefix.clone();
        s.node_id = format!("node{i}");
        tune(&mut s);
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

/// A node reaching the shared Redis through a path the test can cut, and
/// one reaching it directly, under one prefix.
struct Split {
    fault: floe_common::netfault::TcpFault,
    prefix: String,
    cut_node: Signal,
    other: Signal,
}

impl Split {
    async fn new(stack: &Stack, dead_after: Duration) -> Self {
        let url = redis_url();
        let target: std::net::SocketAddr = url
            .trim_start_matches("redis://")
            .parse()
            .expect("FLOE_TEST_REDIS_URL is redis://ip:port");
        let fault =
            floe_common::netfault::TcpFault::start("127.0.0.1:0".parse().expect("addr"), target)
                .await
                .expect("fault proxy");
        let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
        let node = |url: String, id: &str| {
            let mut s = stack.settings();
            s.redis = Some(redis_at(&url));
            s.redis_prefix = prefix.clone();
            s.node_id = id.into();
            s.node_beat = Duration::from_millis(200);
            s.node_dead_after = dead_after;
            s
        };
        let cut_node = stack
            .node(node(format!("redis://{}", fault.addr()), "cut"))
            .await;
        let other = stack.node(node(url.clone(), "other")).await;
        wait_ready(&cut_node).await;
        wait_ready(&other).await;
        Self {
            fault,
            prefix,
            cut_node,
            other,
        }
    }
}

/// The peer ids the room lists (asked through `node` as its owner).
async fn listed(stack: &Stack, node: &Signal, room: &Value) -> Value {
    let id = room["room_id"].as_str().expect("id");
    let owner = room["owner_key"].as_str().expect("owner key");
    common::room_as_owner(&stack.http, node, id, owner).await["peers"].clone()
}

/// Waits (10 s at most) until the room lists `want`.
async fn await_listed(stack: &Stack, node: &Signal, room: &Value, want: Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = listed(stack, node, room).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "room lists {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// P reconnects on another node while its first node is cut off from
/// Redis (the kick is lost). When the first node is back, its stale
/// socket is closed as replaced, and neither its state nor its old
/// socket's departure undoes P's newer connection.
#[tokio::test]
async fn a_node_back_from_an_outage_does_not_undo_a_newer_connection() {
    let stack = Stack::new().await;
    let split = Split::new(&stack, Duration::from_secs(30)).await;
    let room = public_room(&stack.http, &split.other, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut p_old = Client::join(&split.cut_node, id, "client_id=p").await;
    let mut q = Client::join(&split.other, id, "client_id=q").await;
    p_old.expect("peer-joined").await;

    split.fault.cut();
    let p_new = Client::join(&split.other, id, &p_old.reconnect_query()).await;
    assert_eq!(
        q.expect("peer-joined").await["session_id"],
        p_new.session_id()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    split.fault.restore();
    wait_ready(&split.cut_node).await;

    assert_eq!(p_old.expect("closed").await["code"], 4001);
    // Nothing tells q that p left: its newer session stays.
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while let Some(m) = q
        .next_or_timeout(quiet_until.saturating_duration_since(Instant::now()))
        .await
    {
        assert_eq!(m["type"], "ice-servers", "q heard {m}");
    }
    await_listed(&stack, &split.other, &room, json!(["p", "q"])).await;
    let mut p_new = p_new;
    q.signal("p", Some(&p_new.session_id()), json!({"still": "here"}))
        .await;
    assert_eq!(p_new.expect("signal").await["payload"]["still"], "here");
}

/// A node cut off for longer than `--node-dead-after-ms` is reaped: its
/// peers' rooms hear them leave. When it is back, those peers are closed
/// with 1013 to rejoin, and come back as new sessions the others hear of.
#[tokio::test]
async fn peers_reaped_during_an_outage_rejoin_as_new_sessions() {
    let stack = Stack::new().await;
    let split = Split::new(&stack, Duration::from_secs(1)).await;
    let room = public_room(&stack.http, &split.other, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&split.cut_node, id, "client_id=a").await;
    let mut b = Client::join(&split.other, id, "client_id=b").await;
    a.expect("peer-joined").await;

    split.fault.cut();
    let left = b.expect_within("peer-left", Duration::from_secs(10)).await;
    assert_eq!(
        (left["peer_id"].clone(), left["reason"].clone()),
        (json!("a"), json!("node_lost"))
    );
    await_listed(&stack, &split.other, &room, json!(["b"])).await;
    split.fault.restore();
    wait_ready(&split.cut_node).await;

    assert_eq!(a.expect("closed").await["code"], 1013);
    let a2 = Client::join(&split.cut_node, id, &a.reconnect_query()).await;
    let joined = b.expect("peer-joined").await;
    assert_eq!(
        (joined["peer_id"].clone(), joined["session_id"].clone()),
        (json!("a"), json!(a2.session_id()))
    );
    await_listed(&stack, &split.other, &room, json!(["a", "b"])).await;
}

/// A departure that cannot reach Redis is not forgotten: the node's next
/// reconcile removes the member and the room hears it left.
#[tokio::test]
async fn a_departure_during_an_outage_is_announced_after_it() {
    let stack = Stack::new().await;
    let split = Split::new(&stack, Duration::from_secs(30)).await;
    let room = public_room(&stack.http, &split.other, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let a = Client::join(&split.cut_node, id, "client_id=a").await;
    let mut b = Client::join(&split.other, id, "client_id=b").await;

    split.fault.cut();
    drop(a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    split.fault.restore();
    let left = b.expect_within("peer-left", Duration::from_secs(10)).await;
    assert_eq!(
        (left["peer_id"].clone(), left["reason"].clone()),
        (json!("a"), json!("gone"))
    );
    await_listed(&stack, &split.other, &room, json!(["b"])).await;
}

/// A node restarted under the same id (as Kubernetes restarts a pod)
/// before it counts as dead: the peers of the process that died are
/// removed and announced, not kept until the room expires.
#[tokio::test]
async fn a_restarted_node_forgets_the_peers_of_its_previous_process() {
    let stack = Stack::new().await;
    let split = Split::new(&stack, Duration::from_secs(30)).await;
    let room = public_room(&stack.http, &split.other, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let _a = Client::join(&split.cut_node, id, "client_id=a").await;
    let mut b = Client::join(&split.other, id, "client_id=b").await;

    // The first process falls silent for good; its successor starts.
    split.fault.cut();
    let mut s = stack.settings();
    s.redis = Some(redis_at(&redis_url()));
    s.redis_prefix = split.prefix.clone();
    s.node_id = "cut".into();
    s.node_beat = Duration::from_millis(200);
    s.node_dead_after = Duration::from_secs(30);
    let successor = stack.node(s).await;
    wait_ready(&successor).await;
    let left = b.expect_within("peer-left", Duration::from_secs(10)).await;
    assert_eq!(left["peer_id"], "a");
    await_listed(&stack, &split.other, &room, json!(["b"])).await;
}

/// In a one-time room, a client reconnecting to the same node while its
/// old socket's departure is under way is admitted, every time.
#[tokio::test]
async fn a_one_time_reconnect_racing_its_own_departure_is_admitted() {
    let stack = Stack::new().await;
    let nodes = cluster(&stack, &redis_url(), 1).await;
    let room = public_room(&stack.http, &nodes[0], json!({"one_time": true})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut p = Client::join(&nodes[0], id, "client_id=p").await;
    let _q = Client::join(&nodes[0], id, "client_id=q").await;
    for round in 0..20 {
        let query = p.reconnect_query();
        let leave = async { drop(p) };
        let ((), (next, first)) = tokio::join!(leave, Client::connect_raw(&nodes[0], id, &query));
        assert_eq!(first["type"], "welcome", "round {round}: {first}");
        p = next;
        p.welcome = first;
    }
}

/// Redis through Sentinel loses its master: the nodes follow the promoted
/// replica, nobody is dropped, and signalling and presence work again.
#[tokio::test]
async fn the_bus_survives_the_loss_of_the_redis_master() {
    use floe_common::redis_link::testing::{SentinelSet, endpoint};
    let stack = Stack::new().await;
    let set = SentinelSet::from_env();
    // Default beat and dead-after: a failover is shorter than the time
    // after which a silent node's peers are reaped.
    let nodes = cluster_on(&stack, &endpoint("FLOE_TEST_REDIS_SENTINEL_URL"), 2, |_| {}).await;
    for n in &nodes {
        wait_ready(n).await;
    }
    let room = public_room(&stack.http, &nodes[0], json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&nodes[0], id, "client_id=a").await;
    let mut b = Client::join(&nodes[1], id, "client_id=b").await;
    assert_eq!(a.expect("peer-joined").await["peer_id"], "b");

    let old = set.stop_master().await;
    let stopped = Instant::now();
    set.wait_failover(&old).await;

    // a's signals reach b again (one a second until one does).
    let mut tries = 0;
    loop {
        tries += 1;
        a.signal("b", Some(&b.session_id()), json!({"try": tries}))
            .await;
        match b.next_or_timeout(Duration::from_secs(1)).await {
            Some(m) if m["type"] == "signal" => break,
            Some(m) => assert_ne!(m["type"], "closed", "b was dropped: {m}"),
            None => {}
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(40),
            "no signalling 40 s after the master stopped"
        );
    }
    println!(
        "signalling back {:?} after the master stopped",
        stopped.elapsed()
    );
    // Presence is written to the new master: a newcomer is seen by both,
    // and nobody was reaped meanwhile.
    let c = Client::join(&nodes[1], id, "client_id=c").await;
    let mut seen: Vec<String> = c.welcome["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["a", "b"]);
    assert_eq!(
        a.expect_within("peer-joined", Duration::from_secs(5)).await["peer_id"],
        "c"
    );
    assert_eq!(
        b.expect_within("peer-joined", Duration::from_secs(5)).await["peer_id"],
        "c"
    );

    // Each node counted the move (and reconciled after it).
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !metrics(node)
            .await
            .contains("floe_signal_redis_master_switches_total 1")
        {
            assert!(Instant::now() < deadline, "no master switch counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    set.restore(&old).await;
}
