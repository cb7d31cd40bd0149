//! Interoperability with coturn's `turnutils_uclient` (Debian package
//! `coturn`, installed by scripts/test.sh): its TURN REST client (`-W`)
//! allocates on `floe turn`, relays client to client over UDP and TCP with
//! no loss, and every byte reaches the ledger.

use std::process::Command;
use std::time::{Duration, Instant};

use floe_common::Shutdown;
use floe_control::{Settings as CpSettings, StoreLocation};
use floe_proto::credential::TurnSecrets;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-tests-0123";
const INTERNAL: &str = "internal-token-for-tests-0123";
const SECRET: &str = "coturn-interop-secret-0123";

/// Runs uclient and returns (sent, received, lost) messages.
fn uclient(port: u16, extra: &[&str], clients: u32, messages: u32, size: u32) -> (u64, u64, u64) {
    let out = Command::new("turnutils_uclient")
        .args(extra)
        .args(["-y", "-c", "-z", "5"])
        .args([
            "-m",
            &clients.to_string(),
            "-n",
            &messages.to_string(),
            "-l",
            &size.to_string(),
        ])
        .args([
            "-W",
            SECRET,
            "-u",
            "k1:interop:room1:uclient",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .expect("turnutils_uclient on PATH (scripts/test.sh installs coturn)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let number_after = |key: &str| -> Option<u64> {
        let i = text.rfind(key)? + key.len();
        text[i..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    let sent = number_after("tot_send_msgs=").unwrap_or_else(|| panic!("no totals in:\n{text}"));
    let recv = number_after("tot_recv_msgs=").expect("received total");
    let lost = number_after("Total lost packets ").expect("lost total");
    (sent, recv, lost)
}

#[tokio::test]
async fn turnutils_uclient_relays_through_floe_turn_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = floe_control::start(
        CpSettings {
            listen: "127.0.0.1:0".parse().expect("addr"),
            store: StoreLocation::Embedded(dir.path().join("cp.redb")),
            redis_prefix: "unused:".into(),
            admin_token: ADMIN.into(),
            internal_token: INTERNAL.into(),
            turn_secrets: Some(TurnSecrets::parse(&format!("k1={SECRET}")).expect("secrets")),
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            credential_ttl_secs: 600,
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
    let r = http
        .post(format!("{}/v1/tenants", cp.url()))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "interop", "name": "interop", "plan": {"turn": true}}))
        .send()
        .await
        .expect("tenant");
    assert_eq!(r.status(), 201);

    let mut s = floe_turn::Settings::new(
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    s.secrets = Some(TurnSecrets::parse(&format!("k1={SECRET}")).expect("secrets"));
    s.control_url = Some(cp.url());
    s.internal_token = Some(INTERNAL.into());
    s.allow_peers = vec!["127.0.0.0/8".parse().expect("net")];
    s.usage_interval = Duration::from_millis(500);
    let turn = floe_turn::start(s, Shutdown::new()).await.expect("turn");
    let port = turn.listen_addr().port();

    let mut expected = 0u64;
    for (transport, extra) in [("udp", &[][..]), ("tcp", &["-t"][..])] {
        let (sent, recv, lost) =
            tokio::task::spawn_blocking(move || uclient(port, extra, 4, 100, 120))
                .await
                .expect("uclient");
        assert_eq!((sent, recv, lost), (400, 400, 0), "over {transport}");
        // Client to client: every message leaves one allocation and
        // enters another.
        expected += 400 * 120;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let u: Value = http
            .get(format!("{}/v1/tenants/interop/usage", cp.url()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("json");
        if u["total"]["bytes_out"] == expected && u["total"]["bytes_in"] == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ledger {u} never reached {expected} each way"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    turn.stop().await;
}
