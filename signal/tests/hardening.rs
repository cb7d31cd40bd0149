//! What an outside tester found: ghosts, hijacks, tenant isolation,
//! revocation, token rules, oversized messages, poisoned stats, and the
//! places where server and docs disagreed. Each test names the hole it
//! keeps closed; one node, the in-process bus, a real control plane.

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN, Client, Stack, metrics, public_room, room_as_owner};
use floe_proto::api::CreatedApiKey;
use floe_proto::token::{Grants, JoinClaims};
use serde_json::{Value, json};

/// An API key for tenant `id`, created (with the tenant) by the admin.
async fn tenant_with_key(stack: &Stack, id: &str, plan: Value) -> CreatedApiKey {
    common::tenant_with_key(&stack.http, &stack.cp.url(), id, plan).await
}

fn token_of(key: &CreatedApiKey, claims: impl FnOnce(&mut JoinClaims)) -> String {
    let now = floe_proto::time::unix_now();
    let mut c = JoinClaims {
        iss: key.id.clone(),
        sub: "alice".into(),
        room: None,
        grants: Grants {
            create: true,
            join: true,
        },
        exp: now + 600,
        iat: now,
        nbf: None,
    };
    claims(&mut c);
    floe_proto::token::mint(&c, key.secret.as_bytes()).expect("mint")
}

async fn create_with_token(
    stack: &Stack,
    node: &impl common::Node,
    token: &str,
) -> reqwest::Response {
    stack
        .http
        .post(format!("http://{}/v1/rooms", node.addr()))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .expect("create")
}

/// A room created with `token`, and a peer joined to it with the same token.
async fn token_room_with_peer(stack: &Stack, node: &impl common::Node, token: &str) -> Client {
    let r = create_with_token(stack, node, token).await;
    assert_eq!(r.status(), 201);
    let room: Value = r.json().await.expect("json");
    let id = room["room_id"].as_str().expect("id");
    Client::join(node, id, &format!("token={token}")).await
}

#[tokio::test]
async fn a_peer_that_never_reads_is_closed_and_leaves_within_a_heartbeat() {
    let stack = Stack::new().await;
    let mut s = stack.settings();
    s.heartbeat_secs = 2;
    let node = stack.node(s).await;
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let owner = room["owner_key"].as_str().expect("owner");
    // The ghost joins, then never reads again.
    let ghost = Client::join(&node, id, "client_id=ghost").await;
    let mut senders = Vec::new();
    for name in ["a", "b", "c"] {
        senders.push(Client::join(&node, id, &format!("client_id={name}")).await);
    }
    let started = Instant::now();
    let payload = json!({"blob": "x".repeat(60_000)});
    let mut errors = Vec::new();
    'flood: for _ in 0..600 {
        for c in &mut senders {
            c.signal("ghost", None, payload.clone()).await;
            if let Some(m) = c.next_or_timeout(Duration::ZERO).await {
                errors.push(m.clone());
                if m["type"] == "peer-left" {
                    break 'flood;
                }
            }
        }
    }
    // Everyone else hears that the ghost left as too slow, within a
    // heartbeat or so of the flood.
    let left = if errors.iter().any(|m| m["type"] == "peer-left") {
        errors
            .into_iter()
            .find(|m| m["type"] == "peer-left")
            .expect("left")
    } else {
        senders[0]
            .expect_within("peer-left", Duration::from_secs(4))
            .await
    };
    assert_eq!(
        (left["peer_id"].clone(), left["reason"].clone()),
        (json!("ghost"), json!("slow"))
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let info = room_as_owner(&stack.http, &node, id, owner).await;
    assert_eq!(info["peers"], json!(["a", "b", "c"]));
    let fresh = Client::join(&node, id, "client_id=d").await;
    assert!(
        !fresh.welcome["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .any(|p| p["peer_id"] == "ghost")
    );
    drop(ghost);
}

#[tokio::test]
async fn knowing_a_peer_id_is_not_enough_to_take_its_place() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut victim = Client::join(&node, id, "client_id=victim").await;
    let mut other = Client::join(&node, id, "client_id=other").await;
    victim.expect("peer-joined").await;

    // Anonymous listings show how many, not who.
    let info: Value = reqwest::get(format!("http://{}/v1/rooms/{id}", node.addr()))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(info["peer_count"], 2);
    assert!(info.get("peers").is_none(), "{info}");

    // The attacker's connection with the victim's id is refused ...
    for query in [
        "client_id=victim".to_owned(),
        "client_id=victim&reconnect_secret=0123456789abcdef0123".to_owned(),
    ] {
        let (mut attacker, first) = Client::connect_raw(&node, id, &query).await;
        assert_eq!(first["code"], "peer_id_taken", "{first}");
        assert_eq!(attacker.next().await["code"], 4003);
    }
    // ... and the victim still gets its signals.
    other.signal("victim", None, json!({"still": "mine"})).await;
    assert_eq!(victim.expect("signal").await["payload"]["still"], "mine");

    // The real client, reloading with its secret, replaces its socket.
    let reloaded = Client::join(&node, id, &victim.reconnect_query()).await;
    assert_eq!(victim.next().await["code"], 4001);
    assert_eq!(
        reloaded.welcome["reconnect_secret"], victim.welcome["reconnect_secret"],
        "the secret stays the same across reconnects"
    );
}

#[tokio::test]
async fn public_rooms_have_their_own_limit_and_tenants_manage_their_rooms() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let key = tenant_with_key(
        &stack,
        "shop",
        json!({"public_rooms": true, "max_rooms": 2, "max_public_rooms": 2}),
    )
    .await;
    let url = format!("http://{}/v1/rooms", node.addr());
    for _ in 0..2 {
        let r = stack
            .http
            .post(&url)
            .json(&json!({"tenant": "shop"}))
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), 201);
    }
    let r = stack
        .http
        .post(&url)
        .json(&json!({"tenant": "shop"}))
        .send()
        .await
        .expect("create");
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "public_room_limit_reached"
    );
    // The back end's own rooms are unaffected.
    let token = token_of(&key, |_| {});
    assert_eq!(create_with_token(&stack, &node, &token).await.status(), 201);

    // The tenant lists its rooms, with peers, and deletes one.
    let list: Value = stack
        .http
        .get(&url)
        .basic_auth(&key.id, Some(&key.secret))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let rooms = list["rooms"].as_array().expect("rooms");
    assert_eq!(rooms.len(), 3);
    assert_eq!(rooms.iter().filter(|r| r["public"] == true).count(), 2);
    let victim = rooms[0]["room_id"].as_str().expect("id");
    let r = stack
        .http
        .delete(format!("{url}/{victim}"))
        .basic_auth(&key.id, Some(&key.secret))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    // Without the key: no list.
    assert_eq!(
        stack.http.get(&url).send().await.expect("list").status(),
        401
    );
    // Another tenant's key cannot delete it.
    let r = stack
        .http
        .delete(format!(
            "{url}/{}",
            rooms[1]["room_id"].as_str().expect("id")
        ))
        .basic_auth(&stack.key.id, Some(&stack.key.secret))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 404, "invisible from another tenant");
}

#[tokio::test]
async fn room_names_belong_to_their_tenant() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let other = tenant_with_key(&stack, "other", json!({})).await;
    let theirs = token_of(&other, |c| c.room = Some("shared-name".into()));
    assert_eq!(
        create_with_token(&stack, &node, &theirs).await.status(),
        201
    );
    // The same name in t1: no 409, no hint that it exists elsewhere.
    let ours = stack.token("alice", Some("shared-name"), true, 600);
    let r = create_with_token(&stack, &node, &ours).await;
    assert_eq!(r.status(), 201);
    let mut a = Client::join(&node, "shared-name", &format!("token={ours}")).await;
    let b = Client::join(&node, "shared-name", &format!("token={theirs}")).await;
    assert_eq!(b.welcome["peers"], json!([]), "two different rooms");
    assert!(
        a.next_or_timeout(Duration::from_millis(300))
            .await
            .is_none()
    );
    // A named room is not found without its tenant.
    let r = reqwest::get(format!("http://{}/v1/rooms/shared-name", node.addr()))
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn disabling_a_tenant_or_revoking_a_key_closes_its_sockets_within_seconds() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let key = tenant_with_key(&stack, "gone", json!({"public_rooms": true})).await;
    let spare = tenant_with_key(&stack, "spare", json!({})).await;
    let mut peer = token_room_with_peer(&stack, &node, &token_of(&key, |_| {})).await;

    // Revoking the key that signed the token.
    let started = Instant::now();
    let r = stack
        .http
        .delete(format!(
            "{}/v1/tenants/gone/keys/{}",
            stack.cp.url(),
            key.id
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    let closed = peer.next().await;
    assert_eq!(closed["code"], 4005, "{closed}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Disabling the tenant: a socket joined with another key's token closes too.
    let mut peer = token_room_with_peer(&stack, &node, &token_of(&spare, |_| {})).await;
    let started = Instant::now();
    let r = stack
        .http
        .patch(format!("{}/v1/tenants/spare", stack.cp.url()))
        .bearer_auth(ADMIN)
        .json(&json!({"disabled": true}))
        .send()
        .await
        .expect("disable");
    assert_eq!(r.status(), 200);
    let closed = peer.next().await;
    assert_eq!(closed["code"], 4005, "{closed}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // ... and the control plane mints no more tokens for it.
    let r = stack
        .http
        .post(format!("{}/v1/tokens", stack.cp.url()))
        .basic_auth(&spare.id, Some(&spare.secret))
        .json(&json!({"peer": "p", "grants": {"join": true}}))
        .send()
        .await
        .expect("mint");
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "tenant_disabled"
    );
}

#[tokio::test]
async fn join_tokens_are_checked_the_same_everywhere() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let now = floe_proto::time::unix_now();
    let cases = [
        (
            "a sub of 1,000 characters",
            stack.token(&"x".repeat(1_000), None, true, 600),
        ),
        ("a sub with a path", stack.token("a/..", None, true, 600)),
        ("valid for ten years", {
            let key = stack.key.clone();
            token_of(&key, |c| c.exp = now + 10 * 365 * 86_400)
        }),
        ("not valid for an hour", {
            let key = stack.key.clone();
            token_of(&key, |c| c.nbf = Some(now + 3_600))
        }),
    ];
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    for (what, token) in cases {
        let r = create_with_token(&stack, &node, &token).await;
        assert_eq!(r.status(), 401, "REST create, {what}");
        assert_eq!(
            r.json::<Value>().await.expect("json")["code"],
            "invalid_token"
        );
        let (_c, first) = Client::connect_raw(&node, id, &format!("token={token}")).await;
        assert_eq!(first["code"], "invalid_token", "join, {what}");
    }
}

#[tokio::test]
async fn one_time_rooms_admit_two_clients_even_one_after_the_other() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({"one_time": true})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&node, id, "client_id=a").await;
    a.send(json!({"type": "leave"})).await;
    assert_eq!(a.next().await["code"], 1000);
    let mut b = Client::join(&node, id, "client_id=b").await;
    b.send(json!({"type": "leave"})).await;
    assert_eq!(b.next().await["code"], 1000);
    let (_c, first) = Client::connect_raw(&node, id, "client_id=c").await;
    assert_eq!(first["code"], "room_sealed");
    // Either of the pair comes back with its secret.
    Client::join(&node, id, &a.reconnect_query()).await;
    let (_x, first) = Client::connect_raw(&node, id, "client_id=b").await;
    // Sealed, or (while b's departure is still being recorded) taken.
    assert!(
        first["code"] == "room_sealed" || first["code"] == "peer_id_taken",
        "b's id without b's secret: {first}"
    );
}

#[tokio::test]
async fn every_oversized_message_gets_the_error_and_close_1009() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({"max_peers": 10})).await;
    let id = room["room_id"].as_str().expect("id");
    for size in [65_537, 131_000, 140_000, 1 << 20] {
        let mut a = Client::join(&node, id, "").await;
        a.send_raw(format!(r#"{{"type":"ping","x":"{}"}}"#, "y".repeat(size)))
            .await;
        let e = a.next().await;
        assert_eq!(e["code"], "message_too_large", "{size}: {e}");
        let closed = a.next().await;
        assert_eq!(closed["code"], 1009, "{size}: {closed}");
    }
}

#[tokio::test]
async fn stats_reports_are_bounded_and_metrics_stay_off_the_public_port() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&node, id, "").await;
    for _ in 0..2 {
        a.send(json!({"type": "stats", "direct_bytes": u64::MAX}))
            .await;
        assert_eq!(a.expect("error").await["code"], "invalid_stats");
    }
    a.send(json!({"type": "stats", "direct_bytes": 1_000, "relayed_bytes": 24}))
        .await;
    a.send(json!({"type": "ping"})).await;
    a.expect("pong").await;
    let m = metrics(&node).await;
    assert!(
        m.contains(r#"floe_signal_reported_bytes_total{path="direct",tenant="t1"} 1000"#),
        "{m}"
    );
    let r = reqwest::get(format!("http://{}/metrics", node.addr()))
        .await
        .expect("get");
    assert_eq!(r.status(), 404, "metrics name tenants: ops port only");
    assert_eq!(
        reqwest::get(format!("http://{}/readyz", node.addr()))
            .await
            .expect("get")
            .status()
            .as_u16()
            / 100,
        2,
        "load balancers still probe the public port"
    );
}

#[tokio::test]
async fn refusals_are_json_or_websocket_errors_as_documented() {
    let stack = Stack::new().await;
    let mut s = stack.settings();
    s.max_connections_per_ip = 1;
    let node = stack.node(s).await;
    let base = format!("http://{}", node.addr());
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");

    // A plain GET of the WebSocket URL, and a wrong method: JSON bodies.
    for (method, url, status, code) in [
        (
            "GET",
            format!("{base}/v1/rooms/{id}/ws"),
            426,
            "upgrade_required",
        ),
        ("PUT", format!("{base}/v1/rooms"), 405, "method_not_allowed"),
        (
            "DELETE",
            format!("{base}/v1/rooms/no-such-room"),
            401,
            "unauthorized",
        ),
        ("GET", format!("{base}/nowhere"), 404, "not_found"),
    ] {
        let r = stack
            .http
            .request(method.parse().expect("method"), &url)
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), status, "{method} {url}");
        let body: Value = r.json().await.expect("a JSON body");
        assert_eq!(body["code"], code, "{method} {url}");
    }
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .body("tenant=t1")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 415);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "unsupported_media_type"
    );

    // The per-IP limit is an `error` message on the WebSocket.
    let _first = Client::join(&node, id, "").await;
    let (mut second, first) = Client::connect_raw(&node, id, "").await;
    assert_eq!(first["code"], "too_many_connections");
    assert_eq!(second.next().await["code"], 4003);
}

/// TURN credentials are minted on the node (no control-plane round trip
/// per join); a revocation, a quota cut-off or TURN turned off still stops
/// them within a poll interval, and what is minted is what TURN verifies.
#[tokio::test]
async fn credentials_minted_on_the_node_follow_revocations_and_cut_offs() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let key = tenant_with_key(
        &stack,
        "metered",
        json!({"turn": true, "monthly_relay_bytes": 1000}),
    )
    .await;
    let r = create_with_token(&stack, &node, &token_of(&key, |_| {})).await;
    assert_eq!(r.status(), 201);
    let room: Value = r.json().await.expect("json");
    let room = room["room_id"].as_str().expect("id").to_owned();
    let ice_of = |peer: &'static str| {
        let (node, room, key) = (&node, room.clone(), key.clone());
        async move {
            let token = token_of(&key, |c| c.sub = peer.into());
            let (c, first) = Client::connect_raw(node, &room, &format!("token={token}")).await;
            assert_eq!(first["type"], "welcome", "{first}");
            drop(c);
            first["ice_servers"].clone()
        }
    };
    let ice = ice_of("alice").await;
    let turn = &ice["iceServers"][1];
    let user = turn["username"].as_str().expect("TURN username");
    assert!(user.ends_with(&format!(":metered:{room}:alice")), "{user}");
    assert_eq!(
        turn["credential"].as_str(),
        Some(floe_proto::credential::turn_password(b"turn-secret-0123456789", user).as_str()),
        "signed with the TURN secret the TURN servers hold"
    );

    // Waits until a join of `peer` is refused TURN for `reason`.
    let refused_within = |peer: &'static str, reason: &'static str| {
        let ice_of = &ice_of;
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let ice = ice_of(peer).await;
                if ice["turnRefused"] == reason {
                    assert_eq!(ice["iceServers"].as_array().map(Vec::len), Some(1));
                    return;
                }
                assert!(Instant::now() < deadline, "{peer}: still {ice}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let r = stack
        .http
        .post(format!("{}/v1/revocations", stack.cp.url()))
        .basic_auth(&key.id, Some(&key.secret))
        .json(&json!({"tenant": "metered", "room": room, "peer": "mallory"}))
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 201);
    refused_within("mallory", "revoked").await;
    assert!(ice_of("alice").await.get("turnRefused").is_none());

    // The month's usage reaches the quota: every peer is cut off.
    let r = stack
        .http
        .post(format!("{}/internal/v1/usage", stack.cp.url()))
        .bearer_auth(common::INTERNAL)
        .json(
            &json!({"server_id": "turn-x", "seq": 1, "at": floe_proto::time::unix_now(),
            "records": [{"tenant": "metered", "room": room, "bytes_out": 600, "bytes_in": 400,
                "packets_out": 1, "packets_in": 1}]}),
        )
        .send()
        .await
        .expect("usage");
    assert_eq!(r.status(), 200);
    refused_within("alice", "over_quota").await;

    // TURN turned off in the plan.
    let r = stack
        .http
        .patch(format!("{}/v1/tenants/metered", stack.cp.url()))
        .bearer_auth(ADMIN)
        .json(&json!({"plan": {"turn": false}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    refused_within("alice", "turn_disabled").await;
    let m = metrics(&node).await;
    assert!(
        m.contains("floe_signal_turn_credentials_total{outcome=\"issued\"}"),
        "{m}"
    );
    assert!(
        m.contains("floe_signal_turn_credentials_total{outcome=\"revoked\"}"),
        "{m}"
    );
}

/// A WebSocket opened through a proxy forwarding for some client.
type Forwarded =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `room` as a proxy forwarding for `client`;
/// returns it (open, so it counts against its client's limit) and its
/// first message.
async fn join_forwarded(
    node: &floe_signal::Signal,
    room: &str,
    client: &str,
) -> (Forwarded, Value) {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let url = format!("ws://{}/v1/rooms/{room}/ws", node.addr());
    let mut req = url.into_client_request().expect("request");
    req.headers_mut()
        .insert("x-forwarded-for", client.parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .expect("a message")
        .expect("open")
        .expect("frame");
    let first = serde_json::from_str(first.to_text().expect("text")).expect("json");
    (ws, first)
}

/// Per-IP limits count the client a trusted proxy names, and ignore the
/// header from anyone else (an ingress in front of every connection
/// would otherwise make all clients one).
#[tokio::test]
async fn per_ip_limits_see_clients_behind_trusted_proxies_only() {
    let stack = Stack::new().await;
    for trusted in [true, false] {
        let mut s = stack.settings();
        s.max_connections_per_ip = 1;
        if trusted {
            s.trusted_proxies =
                floe_common::proxy::TrustedProxies::new(vec!["127.0.0.0/8".parse().expect("net")]);
        }
        let node = stack.node(s).await;
        let room = public_room(&stack.http, &node, json!({})).await;
        let id = room["room_id"].as_str().expect("id");
        let (_a, first) = join_forwarded(&node, id, "203.0.113.1").await;
        assert_eq!(first["type"], "welcome");
        let (_b, other) = join_forwarded(&node, id, "203.0.113.2").await;
        let (_c, again) = join_forwarded(&node, id, "203.0.113.1").await;
        if trusted {
            assert_eq!(other["type"], "welcome", "another client behind the proxy");
        } else {
            assert_eq!(other["code"], "too_many_connections", "one peer: {other}");
        }
        assert_eq!(again["code"], "too_many_connections", "{again}");
    }
}
