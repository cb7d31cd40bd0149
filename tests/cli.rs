//! The operator commands (`floe tenant`, `floe token`, `floe ice-servers`,
//! `floe usage`) against a running control plane.

use std::process::Command;

use floe_common::Shutdown;
use floe_control::{Settings, StoreLocation};
use serde_json::Value;

const ADMIN: &str = "admin-token-for-cli-tests-0123";

fn floe(url: &str, args: &[&str]) -> (bool, String, String) {
    floe_env(url, args, &[])
}

/// `floe args` with the control plane's URL, the admin token and `env`.
fn floe_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_floe"))
        .args(args)
        .env("FLOE_CONTROL_URL", url)
        .env("FLOE_ADMIN_TOKEN", ADMIN)
        .envs(env.iter().copied())
        .output()
        .expect("run floe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn tenant_token_and_usage_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = floe_control::start(
        Settings {
            listen: "127.0.0.1:0".parse().expect("addr"),
            store: StoreLocation::Embedded(dir.path().join("cp.redb")),
            redis_prefix: "unused:".into(),
            admin_token: ADMIN.into(),
            internal_token: "internal-token-for-cli-tests".into(),
            turn_secrets: None,
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
    let url = cp.url();
    let run = |args: &'static [&'static str]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || floe(&url, args))
    };

    let (ok, out, err) = run(&[
        "tenant",
        "create",
        "--id",
        "acme",
        "--name",
        "Acme",
        "--turn",
        "true",
        "--quota-bytes",
        "1000000",
        "--public-rooms",
        "true",
    ])
    .await
    .expect("join");
    assert!(ok, "{err}");
    assert!(out.contains("acme") && out.contains("active"), "{out}");
    let (ok, out, _) = run(&["tenant", "--json", "show", "acme"])
        .await
        .expect("join");
    assert!(ok);
    let t: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(t["plan"]["monthly_relay_bytes"], 1_000_000);
    let (ok, out, _) = run(&["tenant", "--json", "update", "acme", "--max-rooms", "5"])
        .await
        .expect("join");
    assert!(ok);
    let t: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (t["plan"]["max_rooms"].clone(), t["plan"]["turn"].clone()),
        (5.into(), true.into()),
        "other plan fields kept"
    );
    let (ok, out, _) = run(&["tenant", "disable", "acme"]).await.expect("join");
    assert!(ok && out.contains("disabled"), "{out}");
    let (ok, out, _) = run(&["tenant", "enable", "acme"]).await.expect("join");
    assert!(ok && out.contains("active"), "{out}");
    let (ok, out, _) = run(&["tenant", "list"]).await.expect("join");
    assert!(ok && out.lines().count() == 2, "{out}");
    let (ok, _, err) = run(&["tenant", "update", "acme"]).await.expect("join");
    assert!(!ok && err.contains("nothing to change"), "{err}");
    let (ok, _, err) = run(&["tenant", "show", "nope"]).await.expect("join");
    assert!(
        !ok && err.contains("404") && err.contains("not_found"),
        "{err}"
    );

    let (ok, out, _) = run(&["tenant", "--json", "create-key", "acme"])
        .await
        .expect("join");
    assert!(ok);
    let key: Value = serde_json::from_str(&out).expect("json");
    let (kid, secret) = (
        key["id"].as_str().expect("id").to_owned(),
        key["secret"].as_str().expect("secret").to_owned(),
    );
    let token_out = {
        let (url, kid, secret) = (url.clone(), kid.clone(), secret.clone());
        tokio::task::spawn_blocking(move || {
            floe(
                &url,
                &[
                    "token",
                    "--key-id",
                    &kid,
                    "--key-secret",
                    &secret,
                    "--peer",
                    "bob",
                    "--room",
                    "r1",
                    "--create",
                    "--join",
                ],
            )
        })
        .await
        .expect("join")
    };
    assert!(token_out.0, "{}", token_out.2);
    let claims = floe_proto::token::verify(
        token_out.1.trim(),
        secret.as_bytes(),
        floe_proto::time::unix_now(),
    )
    .expect("a valid token");
    assert_eq!(
        (claims.sub.as_str(), claims.room.as_deref()),
        ("bob", Some("r1"))
    );
    assert!(claims.grants.create && claims.grants.join);

    // `floe ice-servers`, every input from the environment. This control
    // plane has no TURN, so the answer is STUN-less and says why.
    let ice = {
        let (url, kid, secret) = (url.clone(), kid.clone(), secret.clone());
        tokio::task::spawn_blocking(move || {
            let env = [
                ("FLOE_KEY_ID", kid.as_str()),
                ("FLOE_KEY_SECRET", secret.as_str()),
                ("FLOE_ROOM", "call-1"),
                ("FLOE_TTL_SECS", "120"),
            ];
            floe_env(&url, &["ice-servers"], &env)
        })
        .await
        .expect("join")
    };
    assert!(ice.0, "{}", ice.2);
    let v: Value = serde_json::from_str(&ice.1).expect("json");
    assert_eq!(v["turnRefused"], "turn_not_configured", "{v}");
    assert!(v["iceServers"].is_array());

    let usage = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let env = [("FLOE_TENANT", "acme"), ("FLOE_JSON", "true")];
            floe_env(&url, &["usage"], &env)
        })
        .await
        .expect("join")
    };
    assert!(usage.0, "{}", usage.2);
    let u: Value = serde_json::from_str(&usage.1).expect("usage as JSON");
    assert_eq!(u["total"]["bytes_out"], 0);
    let (ok, out, err) = run(&["usage", "--tenant", "acme"]).await.expect("join");
    assert!(ok, "{err}");
    assert!(
        out.contains("TOTAL_BYTES") && out.contains("total"),
        "{out}"
    );
    let (ok, out, _) = run(&[
        "usage",
        "--json",
        "--tenant",
        "acme",
        "--from",
        "2026-01-01",
        "--to",
        "2026-01-31",
    ])
    .await
    .expect("join");
    assert!(ok);
    let u: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(u["total"]["bytes_out"], 0);
    let (ok, _, err) = run(&["usage", "--tenant", "acme", "--from", "2026-02-30"])
        .await
        .expect("join");
    assert!(!ok && err.contains("invalid_request"), "{err}");
}

/// An unreachable control plane is reported once, cause included (the
/// cause used to be repeated in the error chain).
#[test]
fn an_unreachable_control_plane_is_reported_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let (ok, _, err) = floe(&url, &["tenant", "list"]);
    assert!(!ok);
    assert!(err.contains("cannot reach the control plane"), "{err}");
    assert_eq!(err.matches("error sending request").count(), 1, "{err}");
}
