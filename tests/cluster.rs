//! Signal nodes as real processes sharing one Redis: killing one (SIGKILL,
//! no goodbye) makes its peers leave their rooms within 10 seconds.

#[path = "../signal/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, INTERNAL, Stack, public_room};
use serde_json::json;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn signal_process(
    control_url: &str,
    redis: &str,
    prefix: &str,
    node: &str,
) -> (Process, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_floe"))
        .args([
            "signal",
            "--listen",
            &addr.to_string(),
            "--ops-listen",
            "127.0.0.1:0",
            "--control-url",
            control_url,
        ])
        .args([
            "--redis-url",
            redis,
            "--redis-prefix",
            prefix,
            "--node-id",
            node,
            // A dead node is noticed in a second, not five.
            "--node-beat-ms",
            "200",
            "--node-dead-after-ms",
            "1000",
        ])
        .env("FLOE_INTERNAL_TOKEN", INTERNAL)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn floe signal");
    (Process(child), addr)
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_node_s_peers_leave_within_ten_seconds() {
    let redis = std::env::var("FLOE_TEST_REDIS_URL")
        .expect("FLOE_TEST_REDIS_URL is not set: run the suite through scripts/test.sh");
    let stack = Stack::new().await;
    let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
    let mut nodes: Vec<(Option<Process>, SocketAddr)> = (0..3)
        .map(|i| {
            let (p, a) = signal_process(&stack.cp.url(), &redis, &prefix, &format!("n{i}"));
            (Some(p), a)
        })
        .collect();
    for (_, addr) in &nodes {
        wait_ready(*addr).await;
    }
    let room = public_room(&stack.http, &nodes[0].1, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&nodes[0].1, id, "client_id=a").await;
    let _b = Client::join(&nodes[1].1, id, "client_id=b").await;
    let mut c = Client::join(&nodes[2].1, id, "client_id=c").await;
    a.expect("peer-joined").await;
    a.expect("peer-joined").await;

    // SIGKILL node 1.
    let killed_at = Instant::now();
    drop(nodes[1].0.take());
    for client in [&mut a, &mut c] {
        let left = client
            .expect_within(
                "peer-left",
                Duration::from_secs(10).saturating_sub(killed_at.elapsed()),
            )
            .await;
        assert_eq!(left["peer_id"], "b");
        assert_eq!(left["reason"], "node_lost");
    }
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(10), "peers left after {took:?}");
    eprintln!("dead node's peers left after {took:?}");

    // The survivors still talk.
    a.signal("c", Some(&c.session_id()), json!({"still": "here"}))
        .await;
    assert_eq!(c.expect("signal").await["payload"]["still"], "here");
}

/// The signal-only load mode against two nodes on one Redis: rooms of
/// three spread over both nodes, so offers and answers cross nodes both
/// ways and stay on one node too; every message arrives, and the report
/// breaks the round trip down by route.
#[tokio::test]
async fn signal_load_spread_over_two_nodes_breaks_latency_down_by_route() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: floe_loadtest::signal::SignalArgs,
    }
    let redis = std::env::var("FLOE_TEST_REDIS_URL")
        .expect("FLOE_TEST_REDIS_URL is not set: run the suite through scripts/test.sh");
    let stack = Stack::new().await;
    let prefix = format!("floe-test:{}:", floe_common::secret::random_token(6));
    let nodes: Vec<(Process, SocketAddr)> = (0..2)
        .map(|i| signal_process(&stack.cp.url(), &redis, &prefix, &format!("n{i}")))
        .collect();
    let mut argv = vec!["signal".to_owned()];
    for (_, addr) in &nodes {
        wait_ready(*addr).await;
        argv.extend(["--signal-url".to_owned(), format!("http://{addr}")]);
    }
    argv.extend(
        [
            "--tenant",
            "t1",
            "--peers",
            "24",
            "--room-size",
            "3",
            "--rounds",
            "3",
            "--hold-secs",
            "0",
            "--message-bytes",
            "200",
        ]
        .map(str::to_owned),
    );
    let report = floe_loadtest::signal::run(Cli::parse_from(argv).args).await;
    println!("{}", floe_loadtest::signal::render(&report));
    assert_eq!((report.rooms, report.connected), (8, 24), "{report:?}");
    assert_eq!(report.messages_lost, 0, "{report:?}");
    assert_eq!(report.messages_relayed, 8 * 3 * 2 * 2);
    let routes: Vec<&str> = report
        .offer_answer_by_route_ms
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(routes, ["n0→n0", "n0→n1", "n1→n0", "n1→n1"]);
    let per_route: usize = report
        .offer_answer_by_route_ms
        .values()
        .map(|s| s.count)
        .sum();
    assert_eq!(per_route, 8 * 3 * 2, "one sample per answer");
}
