//! `floe dev` as a user runs it: a real process on free ports, checked over
//! HTTP, STUN and signals.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::start;

fn url(v: &Value, key: &str) -> String {
    v[key].as_str().expect("endpoint present").to_owned()
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        if r.status() == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn dev_serves_health_readiness_metrics_and_stun_then_stops_cleanly() {
    let data = tempfile::tempdir().expect("tempdir");
    let (mut dev, ep) = start(data.path());
    let http = reqwest::Client::new();
    for base in [
        url(&ep, "signal_ops_url"),
        url(&ep, "control_url"),
        url(&ep, "turn_ops_url"),
    ] {
        let r = http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(r.status(), 200, "{base}/healthz");
        wait_ready(&http, &base).await;
        let r = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(ct.starts_with("text/plain"), "{ct}");
    }

    // The default tenant exists and the admin token printed works.
    let control = url(&ep, "control_url");
    let tenants: Value = http
        .get(format!("{control}/v1/tenants"))
        .bearer_auth(url(&ep, "admin_token"))
        .send()
        .await
        .expect("list tenants")
        .json()
        .await
        .expect("json");
    assert_eq!(tenants[0]["id"], "default");
    assert_eq!(tenants[0]["plan"]["turn"], true);
    assert_eq!(tenants[0]["plan"]["public_rooms"], true);

    // The printed join token verifies with the printed key.
    let claims = floe_proto::token::verify(
        &url(&ep, "join_token"),
        url(&ep, "api_key_secret").as_bytes(),
        floe_proto::time::unix_now(),
    )
    .expect("join token verifies");
    assert_eq!(claims.iss, url(&ep, "api_key_id"));

    // STUN answers on the advertised address.
    let turn: std::net::SocketAddr = url(&ep, "turn_addr").parse().expect("addr");
    let flood = floe_loadtest::stun_flood::Flood {
        requests: 200,
        in_flight: 20,
        sockets: 2,
        timeout: Duration::from_secs(2),
    };
    let report = floe_loadtest::stun_flood::run(turn, flood)
        .await
        .expect("binding flood");
    assert_eq!(report.answered, 200);

    // SIGTERM: graceful stop, exit 0.
    let pid = dev.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = dev.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "floe dev ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");

    // A second start reuses the tenant, key and admin token.
    let (_dev2, ep2) = start(data.path());
    for key in ["admin_token", "tenant", "api_key_id", "api_key_secret"] {
        assert_eq!(ep2[key], ep[key], "{key} changed across restarts");
    }
}

#[test]
fn check_config_validates_without_starting() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_floe"))
            .args(args)
            .output()
            .expect("run floe")
    };
    let ok = run(&[
        "control-plane",
        "--check-config",
        "--admin-token",
        "0123456789abcdef0123",
        "--internal-token",
        "0123456789abcdef0123",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration OK"));
    let bad = run(&["control-plane", "--check-config"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("admin token is required"));
    let bad_flag = run(&["signal", "--no-such-flag"]);
    assert!(!bad_flag.status.success());
    for cmd in [
        "dev",
        "signal",
        "turn",
        "control-plane",
        "loadtest",
        "tenant",
        "token",
        "ice-servers",
        "usage",
    ] {
        let help = run(&[cmd, "--help"]);
        assert!(help.status.success(), "{cmd} --help");
    }
}

/// Logs written to a file carry no colour codes (only a terminal gets them).
#[test]
fn logs_to_a_file_are_plain_text() {
    let data = tempfile::tempdir().expect("tempdir");
    let log_path = data.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_floe"))
        .args(["dev", "--signal-port", "0", "--control-port", "0"])
        .args(["--turn-port", "0", "--turn-http-port", "0", "--data-dir"])
        .arg(data.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn floe dev");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !data.path().join("data/endpoints.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "floe dev did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log_path).expect("read log");
    assert!(text.contains("signal node listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a log file: {text}"
    );
}

/// A port in use is reported once, naming the flag to change (the cause
/// used to be printed twice in the error chain).
#[test]
fn a_port_in_use_is_reported_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_floe"))
        .args(["signal", "--listen", &addr, "--ops-listen", "127.0.0.1:0"])
        .env("FLOE_INTERNAL_TOKEN", "0123456789abcdef0123")
        .output()
        .expect("run floe");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("--listen"), "{stderr}");
}

/// `floe dev` checks its fixed ports before starting anything, and names
/// the flag to change; a data dir that is a file says so.
#[test]
fn dev_refuses_a_taken_port_and_a_file_as_data_dir_before_starting() {
    let data = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_floe"))
            .arg("dev")
            .args(args)
            .output()
            .expect("run floe dev");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let dir = data.path().join("d").display().to_string();
    let stderr = run(&[
        "--data-dir",
        &dir,
        "--signal-port",
        "0",
        "--control-port",
        &port,
    ]);
    assert!(stderr.contains("--control-port"), "{stderr}");
    assert!(
        !stderr.contains("listening"),
        "components started before the check: {stderr}"
    );
    let file = data.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let stderr = run(&["--data-dir", &file.display().to_string()]);
    assert!(stderr.contains("not a directory"), "{stderr}");
    let stderr = run(&[
        "--data-dir",
        &dir,
        "--relay-port-min",
        "60000",
        "--relay-port-max",
        "50000",
    ]);
    assert!(stderr.contains("--relay-port-min"), "{stderr}");
}
