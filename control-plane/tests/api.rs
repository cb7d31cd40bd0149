//! The control plane over real HTTP on loopback, with the embedded store
//! (and the Redis store where noted).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use floe_common::Shutdown;
use floe_control::{ControlPlane, Settings, StoreLocation};
use floe_proto::api::{CreatedApiKey, IceServers, MintedToken, Tenant};
use floe_proto::credential::{TurnSecrets, TurnUsername, turn_password};
use floe_proto::usage::{CutOffReason, UsageAck, UsageBatch, UsageRecord};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-tests-0123";
const INTERNAL: &str = "internal-token-for-tests-0123";

fn settings(store: StoreLocation) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        store,
        redis_prefix: format!("floe-test:{}:", floe_common::secret::random_token(6)),
        admin_token: ADMIN.into(),
        internal_token: INTERNAL.into(),
        turn_secrets: Some(
            TurnSecrets::parse("k2=second-secret-0123456789,k1=first-secret-0123456789")
                .expect("secrets"),
        ),
        stun_urls: vec!["stun:127.0.0.1:3478".into()],
        turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
        credential_ttl_secs: 600,
        max_token_ttl_secs: 86_400,
        api_rate: 1_000.0,
        trusted_proxies: Default::default(),
        enforcement_refresh: std::time::Duration::from_secs(2),
        store_replicas: None,
    }
}

struct Harness {
    cp: ControlPlane,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = settings(StoreLocation::Embedded(dir.path().join("cp.redb")));
        Self::with(s, dir).await
    }

    async fn with(s: Settings, dir: tempfile::TempDir) -> Self {
        let cp = floe_control::start(s, Shutdown::new())
            .await
            .expect("start");
        Self {
            cp,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cp.url())
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn internal(&self, path: &str, body: &impl serde::Serialize) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(INTERNAL)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    async fn create_tenant(&self, body: Value) -> Tenant {
        let (status, v) = self
            .admin(reqwest::Method::POST, "/v1/tenants", Some(body))
            .await;
        assert_eq!(status, 201, "{v}");
        serde_json::from_value(v).expect("tenant")
    }

    async fn create_key(&self, tenant: &str) -> CreatedApiKey {
        let (status, v) = self
            .admin(
                reqwest::Method::POST,
                &format!("/v1/tenants/{tenant}/keys"),
                None,
            )
            .await;
        assert_eq!(status, 201, "{v}");
        serde_json::from_value(v).expect("key")
    }

    /// ICE servers for (tenant, room, peer), through a new API key of
    /// the tenant.
    async fn ice(&self, tenant: &str, room: &str, peer: &str) -> IceServers {
        let key = self.create_key(tenant).await;
        let (status, v) = public_ice(self, &key, json!({"room": room, "peer": peer})).await;
        assert_eq!(status, 200, "{v}");
        serde_json::from_value(v).expect("ice servers")
    }

    async fn usage(&self, batch: &UsageBatch) -> UsageAck {
        let r = self.internal("/internal/v1/usage", batch).await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("ack")
    }
}

fn batch(seq: u64, tenant: &str, room: &str, out: u64, inb: u64) -> UsageBatch {
    UsageBatch {
        server_id: "turn-a".into(),
        seq,
        at: floe_proto::time::unix_now(),
        records: vec![UsageRecord {
            tenant: tenant.into(),
            room: room.into(),
            bytes_out: out,
            bytes_in: inb,
            packets_out: 1,
            packets_in: 1,
        }],
    }
}

#[tokio::test]
async fn admin_api_validates_authenticates_and_answers_json_errors() {
    let h = Harness::embedded().await;
    // No token, wrong token.
    let r = h.http.get(h.url("/v1/tenants")).send().await.expect("req");
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], "unauthorized");
    let r = h
        .http
        .get(h.url("/v1/tenants"))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);

    // Bad input: malformed JSON, unknown field, bad id, bad plan.
    let r = h
        .http
        .post(h.url("/v1/tenants"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "invalid_json"
    );
    for bad in [
        json!({"name": "x", "colour": "red"}),
        json!({"name": "x", "id": "has space"}),
        json!({"name": ""}),
        json!({"name": "x", "plan": {"max_peers_per_room": 0}}),
        json!({"name": "x", "webhook_url": "ftp://example.com"}),
    ] {
        let (status, v) = h
            .admin(reqwest::Method::POST, "/v1/tenants", Some(bad.clone()))
            .await;
        assert!(status == 400 || status == 422, "{bad} -> {status} {v}");
        assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
    }
    // Oversized body.
    let big = json!({"name": "x".repeat(100_000)});
    let (status, v) = h
        .admin(reqwest::Method::POST, "/v1/tenants", Some(big))
        .await;
    assert_eq!(status, 413, "{v}");

    // Create, conflict, read, update, disable, delete.
    let t = h
        .create_tenant(json!({"id": "acme", "name": "Acme", "plan": {"turn": true}}))
        .await;
    assert_eq!(t.id, "acme");
    let (status, v) = h
        .admin(
            reqwest::Method::POST,
            "/v1/tenants",
            Some(json!({"id": "acme", "name": "Again"})),
        )
        .await;
    assert_eq!((status, v["code"].as_str()), (409, Some("conflict")));
    let (status, v) = h
        .admin(
            reqwest::Method::PATCH,
            "/v1/tenants/acme",
            Some(json!({"name": "Acme Inc", "disabled": true})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["name"].as_str(), v["disabled"].as_bool()),
        (Some("Acme Inc"), Some(true))
    );
    let (status, _) = h
        .admin(reqwest::Method::GET, "/v1/tenants/nope", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = h
        .admin(reqwest::Method::DELETE, "/v1/tenants/acme", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = h
        .admin(reqwest::Method::DELETE, "/v1/tenants/acme", None)
        .await;
    assert_eq!(status, 404);
    let r = h
        .http
        .get(h.url("/no/such/route"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.expect("json")["code"], "not_found");
}

#[tokio::test]
async fn keys_mint_join_tokens_and_revocation_stops_them() {
    let h = Harness::embedded().await;
    h.create_tenant(json!({"id": "app", "name": "App"})).await;
    let key = h.create_key("app").await;
    let mint = |secret: String| {
        let (http, url, kid) = (h.http.clone(), h.url("/v1/tokens"), key.id.clone());
        async move {
            http.post(url)
                .basic_auth(kid, Some(secret))
                .json(
                    &json!({"peer": "bob", "room": "r1", "grants": {"join": true}, "ttl_secs": 60}),
                )
                .send()
                .await
                .expect("req")
        }
    };
    let r = mint(key.secret.clone()).await;
    assert_eq!(r.status(), 200);
    let minted: MintedToken = r.json().await.expect("token");
    let claims = floe_proto::token::verify(
        &minted.token,
        key.secret.as_bytes(),
        floe_proto::time::unix_now(),
    )
    .expect("verifies");
    assert_eq!(
        (claims.sub.as_str(), claims.room.as_deref()),
        ("bob", Some("r1"))
    );
    assert!(claims.grants.join && !claims.grants.create);

    assert_eq!(mint("wrong".into()).await.status(), 401);

    // Signal's view of the key.
    let r = h
        .http
        .get(h.url(&format!("/internal/v1/keys/{}", key.id)))
        .bearer_auth(INTERNAL)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["tenant"].as_str(), v["secret"].as_str()),
        (Some("app"), Some(key.secret.as_str()))
    );
    // The internal API refuses the admin token.
    let r = h
        .http
        .get(h.url(&format!("/internal/v1/keys/{}", key.id)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);

    let (status, _) = h
        .admin(
            reqwest::Method::DELETE,
            &format!("/v1/tenants/app/keys/{}", key.id),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(mint(key.secret.clone()).await.status(), 401);
    let (_, keys) = h
        .admin(reqwest::Method::GET, "/v1/tenants/app/keys", None)
        .await;
    assert_eq!(keys[0]["revoked"], true);
    assert!(
        keys[0].get("secret").is_none(),
        "listing never shows secrets"
    );
}

#[tokio::test]
async fn ice_servers_follow_plan_quota_and_revocation() {
    let h = Harness::embedded().await;
    h.create_tenant(
        json!({"id": "paid", "name": "Paid", "plan": {"turn": true, "monthly_relay_bytes": 1000}}),
    )
    .await;
    h.create_tenant(json!({"id": "free", "name": "Free", "plan": {"turn": false}}))
        .await;

    let ice = h.ice("paid", "room1", "alice").await;
    assert_eq!(ice.turn_refused, None);
    assert_eq!(ice.ttl, 600);
    let turn = ice
        .ice_servers
        .iter()
        .find(|s| s.username.is_some())
        .expect("TURN entry");
    let username = turn.username.clone().expect("username");
    let parsed = TurnUsername::parse(&username).expect("floe username");
    assert_eq!(
        (
            parsed.kid.as_str(),
            parsed.tenant.as_str(),
            parsed.room.as_str(),
            parsed.peer.as_str()
        ),
        ("k2", "paid", "room1", "alice")
    );
    assert_eq!(
        turn.credential.as_deref(),
        Some(turn_password(b"second-secret-0123456789", &username).as_str()),
        "credential is base64(HMAC-SHA1(secret[kid], username))"
    );
    // The RTCPeerConnection shape.
    let v = serde_json::to_value(&ice).expect("json");
    assert!(v["iceServers"][0]["urls"].is_array());

    let stun_only = h.ice("free", "room1", "bob").await;
    assert_eq!(stun_only.turn_refused.as_deref(), Some("turn_disabled"));
    assert!(stun_only.ice_servers.iter().all(|s| s.username.is_none()));
    assert_eq!(stun_only.ice_servers.len(), 1);

    // Usage up to the quota: the ack cuts the tenant off and TURN is refused.
    let ack = h.usage(&batch(1, "paid", "room1", 400, 500)).await;
    assert!(ack.applied);
    assert!(ack.enforcement.cut_off.iter().all(|c| c.tenant != "paid"));
    let ack = h.usage(&batch(2, "paid", "room1", 100, 0)).await;
    assert!(
        ack.enforcement
            .cut_off
            .iter()
            .any(|c| c.tenant == "paid" && c.reason == CutOffReason::OverQuota)
    );
    assert_eq!(
        h.ice("paid", "room1", "alice")
            .await
            .turn_refused
            .as_deref(),
        Some("over_quota")
    );
    // Raising the quota lifts it.
    let (status, _) = h
        .admin(
            reqwest::Method::PATCH,
            "/v1/tenants/paid",
            Some(json!({"plan": {"turn": true, "monthly_relay_bytes": 1_000_000}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(h.ice("paid", "room1", "alice").await.turn_refused, None);
    let e: Value = h
        .http
        .get(h.url("/internal/v1/enforcement"))
        .bearer_auth(INTERNAL)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert!(
        e["cut_off"]
            .as_array()
            .expect("list")
            .iter()
            .all(|c| c["tenant"] != "paid")
    );

    // Revoking one peer refuses that peer only.
    let (status, v) = h
        .admin(
            reqwest::Method::POST,
            "/v1/revocations",
            Some(json!({"tenant": "paid", "room": "room1", "peer": "alice"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        h.ice("paid", "room1", "alice")
            .await
            .turn_refused
            .as_deref(),
        Some("revoked")
    );
    assert_eq!(h.ice("paid", "room1", "carol").await.turn_refused, None);
    let ack = h.usage(&batch(3, "paid", "room1", 1, 1)).await;
    assert!(
        ack.enforcement
            .revocations
            .iter()
            .any(|r| r.covers("paid", "room1", "alice"))
    );
}

/// `POST /v1/ice-servers` as a tenant's own back end calls it.
async fn public_ice(h: &Harness, key: &CreatedApiKey, body: Value) -> (u16, Value) {
    let r = h
        .http
        .post(h.url("/v1/ice-servers"))
        .basic_auth(&key.id, Some(&key.secret))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn turn_username(ice: &Value) -> Option<TurnUsername> {
    ice["iceServers"]
        .as_array()?
        .iter()
        .find_map(|s| s["username"].as_str())
        .and_then(|u| TurnUsername::parse(u).ok())
}

#[tokio::test]
async fn public_ice_servers_serve_tenants_with_their_own_signaling() {
    let h = Harness::embedded().await;
    h.create_tenant(json!({"id": "byo", "name": "BYO",
        "plan": {"turn": true, "monthly_relay_bytes": 10_000, "max_credential_ttl_secs": 3600}}))
        .await;
    let key = h.create_key("byo").await;

    // No key, a wrong secret: 401 with the JSON error shape.
    let r = h
        .http
        .post(h.url("/v1/ice-servers"))
        .json(&json!({}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);
    let wrong = CreatedApiKey {
        secret: "not-the-secret".into(),
        ..key.clone()
    };
    let (status, v) = public_ice(&h, &wrong, json!({})).await;
    assert_eq!((status, v["code"].as_str()), (401, Some("unauthorized")));

    // Defaults: the plan's longest lifetime, room label `default`, a random peer.
    let (status, v) = public_ice(&h, &key, json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ttl"], 3600);
    assert!(v.get("turnRefused").is_none(), "{v}");
    let u = turn_username(&v).expect("TURN credentials");
    assert_eq!((u.tenant.as_str(), u.room.as_str()), ("byo", "default"));
    assert!(u.peer.starts_with("p_"));
    assert!(
        v["iceServers"][0]["urls"][0]
            .as_str()
            .expect("url")
            .starts_with("stun:")
    );

    // Labels are kept; a longer lifetime is capped by the plan.
    let (status, v) = public_ice(
        &h,
        &key,
        json!({"room": "call-1", "peer": "alice", "ttl_secs": 999_999}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ttl"], 3600);
    let u = turn_username(&v).expect("TURN credentials");
    assert_eq!((u.room.as_str(), u.peer.as_str()), ("call-1", "alice"));
    let (_, v) = public_ice(&h, &key, json!({"ttl_secs": 120})).await;
    assert_eq!(v["ttl"], 120);

    // Bad input: JSON errors, never TURN.
    for bad in [
        json!({"ttl_secs": 0}),
        json!({"room": "no spaces"}),
        json!({"peer": ""}),
        json!({"room": 5}),
        json!({"colour": "red"}),
    ] {
        let (status, v) = public_ice(&h, &key, bad.clone()).await;
        assert_eq!(status, 400, "{bad} → {v}");
        assert!(v["code"].is_string(), "{v}");
    }

    // Usage is metered per tenant and room label.
    h.usage(&batch(1, "byo", "call-1", 700, 300)).await;
    let (_, report) = h
        .admin(reqwest::Method::GET, "/v1/tenants/byo/usage", None)
        .await;
    assert_eq!(report["rooms"]["call-1"]["bytes_out"], 700);

    // The tenant revokes one peer with its own key.
    let r = h
        .http
        .post(h.url("/v1/revocations"))
        .basic_auth(&key.id, Some(&key.secret))
        .json(&json!({"tenant": "byo", "room": "call-1", "peer": "alice"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    let (_, v) = public_ice(&h, &key, json!({"room": "call-1", "peer": "alice"})).await;
    assert_eq!(v["turnRefused"], "revoked", "{v}");
    assert!(turn_username(&v).is_none());
    let (_, v) = public_ice(&h, &key, json!({"room": "call-1", "peer": "bob"})).await;
    assert!(turn_username(&v).is_some());

    // Over quota, TURN off, disabled: STUN only, with the reason.
    h.usage(&batch(2, "byo", "call-1", 9_000, 0)).await;
    let (status, v) = public_ice(&h, &key, json!({})).await;
    assert_eq!(
        (status, v["turnRefused"].as_str()),
        (200, Some("over_quota"))
    );
    assert_eq!(
        (v["ttl"].as_u64(), v["iceServers"].as_array().map(Vec::len)),
        (Some(0), Some(1))
    );
    for (patch, reason) in [
        (json!({"plan": {"turn": false}}), "turn_disabled"),
        (
            json!({"plan": {"turn": true}, "disabled": true}),
            "tenant_disabled",
        ),
    ] {
        let (status, _) = h
            .admin(reqwest::Method::PATCH, "/v1/tenants/byo", Some(patch))
            .await;
        assert_eq!(status, 200);
        let (_, v) = public_ice(&h, &key, json!({})).await;
        assert_eq!(v["turnRefused"], reason);
    }

    // A revoked key gets nothing.
    let (status, _) = h
        .admin(
            reqwest::Method::DELETE,
            &format!("/v1/tenants/byo/keys/{}", key.id),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(public_ice(&h, &key, json!({})).await.0, 401);
}

#[tokio::test]
async fn another_replicas_changes_reach_enforcement_within_the_refresh() {
    let redis = floe_common::redis_link::testing::endpoint("FLOE_TEST_REDIS_URL");
    let mut s = settings(StoreLocation::Redis(redis));
    s.enforcement_refresh = Duration::from_millis(200);
    let a = Harness::with(s.clone(), tempfile::tempdir().expect("tempdir")).await;
    let b = Harness::with(s, tempfile::tempdir().expect("tempdir")).await;
    a.create_tenant(
        json!({"id": "moving", "name": "M", "plan": {"turn": true, "monthly_relay_bytes": 100}}),
    )
    .await;
    // B learns of the new tenant, then of its quota use through A, then
    // of its being disabled through A, each within a few refreshes.
    for (step, want) in [
        (0, None),
        (1, Some("over_quota")),
        (2, Some("tenant_disabled")),
    ] {
        match step {
            1 => {
                a.usage(&batch(1, "moving", "r", 100, 0)).await;
            }
            2 => {
                let (status, _) = a
                    .admin(
                        reqwest::Method::PATCH,
                        "/v1/tenants/moving",
                        Some(json!({"disabled": true})),
                    )
                    .await;
                assert_eq!(status, 200);
            }
            _ => {}
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = b.ice("moving", "r", "p").await.turn_refused;
            if got.as_deref() == want {
                break;
            }
            assert!(Instant::now() < deadline, "step {step}: still {got:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn usage_batches_apply_once_and_report_by_day_and_room() {
    let h = Harness::embedded().await;
    h.create_tenant(json!({"id": "meter", "name": "Meter", "plan": {"turn": true}}))
        .await;
    let batches = [
        batch(1, "meter", "a", 100, 50),
        batch(2, "meter", "b", 10, 5),
        batch(3, "meter", "a", 1, 1),
    ];
    // Replayed, reordered, and concurrent duplicates.
    let mut tasks = Vec::new();
    for i in [2usize, 0, 1, 0, 2, 1, 1] {
        let (http, url, b) = (
            h.http.clone(),
            h.url("/internal/v1/usage"),
            batches[i].clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(INTERNAL)
                .json(&b)
                .send()
                .await
                .expect("req");
            assert_eq!(r.status(), 200);
            r.json::<UsageAck>().await.expect("ack").applied
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += usize::from(t.await.expect("join"));
    }
    assert_eq!(applied, 3);
    let (status, report) = h
        .admin(reqwest::Method::GET, "/v1/tenants/meter/usage", None)
        .await;
    assert_eq!(status, 200, "{report}");
    let total = &report["total"];
    assert_eq!(
        (total["bytes_out"].as_u64(), total["bytes_in"].as_u64()),
        (Some(111), Some(56))
    );
    assert_eq!(report["rooms"]["a"]["bytes_out"], 101);
    assert_eq!(report["rooms"]["b"]["bytes_in"], 5);

    // Bad batches are refused with a reason.
    let mut bad = batch(0, "meter", "a", 1, 1);
    let r = h.internal("/internal/v1/usage", &bad).await;
    assert_eq!(r.status(), 400);
    bad.seq = 9;
    bad.records[0].room = "no spaces".into();
    assert_eq!(h.internal("/internal/v1/usage", &bad).await.status(), 400);
    let r = h
        .http
        .get(h.url("/v1/tenants/meter/usage?from=2026-13-01"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);

    // The tenant's own API key may read its usage; another's may not.
    let key = h.create_key("meter").await;
    let r = h
        .http
        .get(h.url("/v1/tenants/meter/usage"))
        .basic_auth(&key.id, Some(&key.secret))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
    h.create_tenant(json!({"id": "other", "name": "Other"}))
        .await;
    let r = h
        .http
        .get(h.url("/v1/tenants/other/usage"))
        .basic_auth(&key.id, Some(&key.secret))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403);

    let metrics = h
        .http
        .get(h.url("/metrics"))
        .send()
        .await
        .expect("req")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("floe_control_usage_batches_total{result=\"applied\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("floe_control_usage_batches_total{result=\"duplicate\"} 4"));
    assert!(metrics.contains("floe_control_ledger_bytes_total{tenant=\"meter\"} 167"));
}

#[tokio::test]
async fn embedded_store_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cp.redb");
    {
        let h = Harness::with(
            settings(StoreLocation::Embedded(path.clone())),
            tempfile::tempdir().expect("tempdir"),
        )
        .await;
        h.create_tenant(json!({"id": "keep", "name": "Keep", "plan": {"turn": true}}))
            .await;
        h.usage(&batch(1, "keep", "r", 7, 8)).await;
        let cp = h.cp;
        drop(cp);
    }
    // The store file is released once the server task ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        match floe_control::start(
            settings(StoreLocation::Embedded(path.clone())),
            Shutdown::new(),
        )
        .await
        {
            Ok(cp) => {
                break Harness {
                    cp,
                    http: reqwest::Client::new(),
                    _dir: tempfile::tempdir().expect("tempdir"),
                };
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "restart failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (status, t) = h
        .admin(reqwest::Method::GET, "/v1/tenants/keep", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(t["name"], "Keep");
    // The same batch again is still a duplicate after the restart.
    assert!(!h.usage(&batch(1, "keep", "r", 7, 8)).await.applied);
    let (_, report) = h
        .admin(reqwest::Method::GET, "/v1/tenants/keep/usage", None)
        .await;
    assert_eq!(report["total"]["bytes_out"], 7);
}

#[tokio::test]
async fn two_replicas_on_redis_apply_each_batch_once() {
    let redis = floe_common::redis_link::testing::endpoint("FLOE_TEST_REDIS_URL");
    let s = settings(StoreLocation::Redis(redis));
    let a = Harness::with(s.clone(), tempfile::tempdir().expect("tempdir")).await;
    let b = Harness::with(s, tempfile::tempdir().expect("tempdir")).await;
    a.create_tenant(json!({"id": "shared", "name": "Shared", "plan": {"turn": true}}))
        .await;
    let mut tasks = Vec::new();
    for seq in 1..=30u64 {
        for h in [&a, &b] {
            let (http, url) = (h.http.clone(), h.url("/internal/v1/usage"));
            let body = batch(seq, "shared", "r", seq, 0);
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth(INTERNAL)
                    .json(&body)
                    .send()
                    .await
                    .expect("req");
                r.json::<UsageAck>().await.expect("ack").applied
            }));
        }
    }
    let mut applied = 0;
    for t in tasks {
        applied += usize::from(t.await.expect("join"));
    }
    assert_eq!(applied, 30);
    let (_, report) = b
        .admin(reqwest::Method::GET, "/v1/tenants/shared/usage", None)
        .await;
    assert_eq!(report["total"]["bytes_out"], (1..=30).sum::<u64>());
}

/// A loopback webhook receiver that fails its first `fail` requests.
async fn receiver(fail: usize) -> (String, Arc<Mutex<Vec<(HeaderMap, String)>>>) {
    let got: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
    let seen = got.clone();
    let calls = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let (seen, calls) = (seen.clone(), calls.clone());
            async move {
                let n = {
                    let mut c = calls.lock().expect("lock");
                    *c += 1;
                    *c
                };
                if n <= fail {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                seen.lock().expect("lock").push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), got)
}

#[tokio::test]
async fn quota_alerts_reach_a_webhook_signed_and_retried() {
    let h = Harness::embedded().await;
    let (hook, got) = receiver(2).await;
    let t = h
        .create_tenant(json!({"id": "hooked", "name": "Hooked", "plan": {"turn": true, "monthly_relay_bytes": 100}, "webhook_url": hook}))
        .await;
    let secret = t
        .webhook_secret
        .expect("webhook secret issued with the URL");
    h.usage(&batch(1, "hooked", "r", 85, 0)).await; // 85%: one alert
    h.usage(&batch(2, "hooked", "r", 5, 0)).await; // still 90%: nothing new
    h.usage(&batch(3, "hooked", "r", 20, 0)).await; // 110%: threshold 100 + cut off
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = got.lock().expect("lock").len();
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} webhooks arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a duplicate, if any were sent, the chance to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = got.lock().expect("lock").clone();
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for (headers, body) in &got {
        let sig = headers["x-floe-signature"].to_str().expect("ascii");
        assert_eq!(
            sig,
            floe_control::webhooks::signature(&secret, body.as_bytes())
        );
        let v: Value = serde_json::from_str(body).expect("json body");
        assert_eq!(headers["x-floe-event-id"].to_str().expect("ascii"), v["id"]);
        by_id.insert(v["id"].as_str().expect("id").to_owned(), v);
    }
    let kinds: Vec<(String, u64)> = by_id
        .values()
        .map(|v| {
            (
                v["type"].as_str().expect("type").to_owned(),
                v["level"].as_u64().expect("level"),
            )
        })
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert!(kinds.contains(&("usage.threshold".into(), 80)));
    assert!(kinds.contains(&("usage.threshold".into(), 100)));
    assert!(kinds.contains(&("tenant.cut_off".into(), 100)));
    let metrics = h
        .http
        .get(h.url("/metrics"))
        .send()
        .await
        .expect("req")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("floe_control_webhooks_total{result=\"failed\"} 2"),
        "{metrics}"
    );
}

/// The per-IP API rate keys on the client a trusted proxy names in
/// `X-Forwarded-For`; from any other peer the header is ignored.
#[tokio::test]
async fn the_api_rate_sees_clients_behind_trusted_proxies_only() {
    let throttled = |trusted: bool| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = settings(StoreLocation::Embedded(dir.path().join("cp.redb")));
        s.api_rate = 1.0;
        if trusted {
            s.trusted_proxies =
                floe_common::proxy::TrustedProxies::new(vec!["127.0.0.0/8".parse().expect("net")]);
        }
        let h = Harness::with(s, dir).await;
        let mut limited = 0;
        for i in 0..20 {
            let r = h
                .http
                .get(h.url("/v1/tenants"))
                .bearer_auth(ADMIN)
                .header("x-forwarded-for", format!("203.0.113.{i}"))
                .send()
                .await
                .expect("request");
            if r.status() == 429 {
                limited += 1;
            }
        }
        limited
    };
    assert_eq!(throttled(true).await, 0, "twenty clients, one request each");
    assert!(
        throttled(false).await > 0,
        "one peer, however it names itself"
    );
}
