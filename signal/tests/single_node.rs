//! One signal node with the in-process bus, a real control plane, real
//! WebSocket clients on loopback.

mod common;

use std::time::Duration;

use common::{Client, Stack, metrics, public_room};
use serde_json::{Value, json};

#[tokio::test]
async fn two_peers_exchange_offer_answer_and_candidates_exactly() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    assert!(id.len() >= 16, "room ids are unguessable: {id}");

    let mut a = Client::join(&node, id, "client_id=alice").await;
    assert_eq!(a.peer_id(), "alice");
    assert_eq!(a.welcome["peers"], json!([]));
    // ICE servers with TURN credentials for (t1, room, alice).
    let ice = &a.welcome["ice_servers"]["iceServers"];
    let turn = ice
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s.get("username").is_some())
        .expect("a TURN entry");
    assert!(
        turn["username"]
            .as_str()
            .expect("username")
            .ends_with(&format!(":t1:{id}:alice"))
    );

    let mut b = Client::join(&node, id, "client_id=bob").await;
    assert_eq!(b.welcome["peers"][0]["peer_id"], "alice");
    assert_eq!(b.welcome["peers"][0]["session_id"], a.session_id());
    let joined = a.expect("peer-joined").await;
    assert_eq!(joined["peer_id"], "bob");
    assert_eq!(joined["session_id"], b.session_id());

    let offer = json!({"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n".repeat(20)});
    a.signal("bob", Some(&b.session_id()), offer.clone()).await;
    let got = b.expect("signal").await;
    assert_eq!(got["from"], "alice");
    assert_eq!(got["from_sid"], a.session_id());
    assert_eq!(got["payload"], offer);

    let answer = json!({"type": "answer", "sdp": "v=0\r\n"});
    b.signal("alice", Some(&a.session_id()), answer.clone())
        .await;
    assert_eq!(a.expect("signal").await["payload"], answer);
    for i in 0..20 {
        let cand = json!({"candidate": format!("candidate:{i} 1 udp 2122260223 127.0.0.1 {} typ host", 50000 + i)});
        a.signal("bob", None, cand.clone()).await;
        assert_eq!(
            b.expect("signal").await["payload"],
            cand,
            "candidate {i} in order"
        );
    }

    // Mistakes get errors, never silence.
    a.signal("bob", Some("s_stale"), json!({})).await;
    assert_eq!(a.expect("error").await["code"], "stale_session");
    a.signal("nobody", None, json!({})).await;
    assert_eq!(a.expect("error").await["code"], "peer_not_found");
    a.send(json!({"type": "signal", "to": "bob", "from": "mallory", "payload": {}}))
        .await;
    assert_eq!(a.expect("error").await["code"], "bad_message");
    a.signal("alice", None, json!({})).await;
    assert_eq!(a.expect("error").await["code"], "bad_message");

    a.send(json!({"type": "broadcast", "payload": {"hello": 1}}))
        .await;
    let bc = b.expect("broadcast").await;
    assert_eq!(
        (bc["from"].clone(), bc["payload"].clone()),
        (json!("alice"), json!({"hello": 1}))
    );

    a.send(json!({"type": "ping"})).await;
    a.expect("pong").await;
    a.send(json!({"type": "stats", "direct_bytes": 1000, "relayed_bytes": 250}))
        .await;

    b.send(json!({"type": "leave"})).await;
    let left = a.expect("peer-left").await;
    assert_eq!(
        (left["peer_id"].clone(), left["reason"].clone()),
        (json!("bob"), json!("left"))
    );

    let m = metrics(&node).await;
    assert!(
        m.contains("floe_signal_messages_total{type=\"signal\"}"),
        "{m}"
    );
    assert!(
        m.contains("floe_signal_reported_bytes_total{path=\"relayed\",tenant=\"t1\"} 250"),
        "{m}"
    );
    assert!(m.contains("floe_signal_connections 1"), "{m}");
}

#[tokio::test]
async fn bad_input_is_answered_with_errors() {
    let stack = Stack::new().await;
    let mut s = stack.settings();
    s.max_message_bytes = 2_048;
    s.messages_per_sec = 1.0;
    s.message_burst = 30;
    let node = stack.node(s).await;
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&node, id, "").await;
    assert!(a.peer_id().starts_with("p_"), "anonymous peers get an id");

    a.send_raw("{not json".into()).await;
    assert_eq!(a.expect("error").await["code"], "bad_message");
    a.send(json!({"type": "teleport"})).await;
    let e = a.expect("error").await;
    assert_eq!(e["code"], "bad_message");
    assert!(e["message"].as_str().expect("text").contains("teleport"));
    a.send(json!({"type": "signal", "to": "x", "payload": "y".repeat(3_000)}))
        .await;
    assert_eq!(a.expect("error").await["code"], "message_too_large");
    let closed = a.next().await;
    assert_eq!(
        closed["code"], 1009,
        "an oversized message closes: {closed}"
    );
    // The burst allows 30 messages; the rest of a flood is refused.
    let mut a = Client::join(&node, id, "").await;
    let mut limited = 0;
    for _ in 0..40 {
        a.send(json!({"type": "ping"})).await;
    }
    for _ in 0..40 {
        let m = a.next().await;
        if m["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited >= 5, "flood was limited {limited} times");

    // Unknown room, bad room ids.
    let (_c, first) = Client::connect_raw(&node, "no-such-room", "").await;
    assert_eq!(first["code"], "room_not_found");
    let (mut c, first) = Client::connect_raw(&node, "bad%20id", "").await;
    assert_eq!(first["code"], "room_not_found");
    assert_eq!(c.next().await["code"], 4003);
    let (_c, first) = Client::connect_raw(&node, id, "client_id=has%20space").await;
    assert_eq!(first["code"], "invalid_request");

    // REST errors are JSON with codes.
    let base = format!("http://{}", node.addr());
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"ttl_secs": 60}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"tenant": "t1", "max_peers": 1}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"tenant": "nope"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "unknown_tenant"
    );
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"tenant": "t1", "colour": 1}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "invalid_json"
    );
    let r = stack
        .http
        .get(format!("{base}/v1/rooms/zzz"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 404);
    let r = stack
        .http
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.expect("json");
    assert!(
        doc["paths"]["/v1/rooms"].is_object(),
        "OpenAPI documents the room API"
    );
}

#[tokio::test]
async fn passwords_one_time_rooms_capacity_and_reconnects() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(
        &stack.http,
        &node,
        json!({"password": "s3cret", "one_time": true}),
    )
    .await;
    let id = room["room_id"].as_str().expect("id");
    assert_eq!(room["has_password"], true);
    assert!(room.get("password").is_none());

    let (mut w, first) = Client::connect_raw(&node, id, "password=wrong").await;
    assert_eq!(first["code"], "wrong_password");
    assert_eq!(w.next().await["code"], 4003);
    let (_n, first) = Client::connect_raw(&node, id, "").await;
    assert_eq!(first["code"], "wrong_password");

    let mut a = Client::join(&node, id, "password=s3cret&client_id=a").await;
    let mut b = Client::join(&node, id, "password=s3cret&client_id=b").await;
    a.expect("peer-joined").await;
    // Sealed after the first pair.
    let (_c, first) = Client::connect_raw(&node, id, "password=s3cret&client_id=c").await;
    assert_eq!(first["code"], "room_sealed");
    // But b may reconnect (with its secret): the old connection is
    // closed, a sees the new session.
    let b2 = Client::join(
        &node,
        id,
        &format!("password=s3cret&{}", b.reconnect_query()),
    )
    .await;
    let closed = b.next().await;
    assert_eq!(closed["code"], 4001, "{closed}");
    let rejoined = a.expect("peer-joined").await;
    assert_eq!(rejoined["session_id"], b2.session_id());
    // The stale session of b is refused; the new one works.
    a.signal("b", Some(&b.session_id()), json!({})).await;
    assert_eq!(a.expect("error").await["code"], "stale_session");

    // Capacity.
    let small = public_room(&stack.http, &node, json!({"max_peers": 2})).await;
    let sid = small["room_id"].as_str().expect("id");
    let _p1 = Client::join(&node, sid, "").await;
    let _p2 = Client::join(&node, sid, "").await;
    let (_p3, first) = Client::connect_raw(&node, sid, "").await;
    assert_eq!(first["code"], "room_full");
    // Above the plan's cap of 10: capped, as documented.
    let r = stack
        .http
        .post(format!("http://{}/v1/rooms", node.addr()))
        .json(&json!({"tenant": "t1", "max_peers": 11, "ttl_secs": 999_999_999}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    let capped: Value = r.json().await.expect("json");
    assert_eq!(capped["max_peers"], 10);
    assert!(
        capped["expires_at"].as_u64().expect("expiry") <= floe_proto::time::unix_now() + 86_400
    );

    // Public rooms per tenant: "tiny" may have one.
    let url = format!("http://{}/v1/rooms", node.addr());
    let r = stack
        .http
        .post(&url)
        .json(&json!({"tenant": "tiny"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    let r = stack
        .http
        .post(&url)
        .json(&json!({"tenant": "tiny"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "public_room_limit_reached"
    );
    let m = metrics(&node).await;
    assert!(
        m.contains("floe_signal_refusals_total{reason=\"room_sealed\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn join_tokens_create_join_and_are_checked() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let base = format!("http://{}", node.addr());
    // A token with the create grant names the room.
    let creator = stack.token("owner", Some("standup-42"), true, 600);
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .bearer_auth(&creator)
        .json(&json!({"ttl_secs": 600}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    let room: Value = r.json().await.expect("json");
    assert_eq!(room["room_id"], "standup-42");

    // The same name again is a conflict, not a silent replacement.
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .bearer_auth(&creator)
        .json(&json!({}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "room_exists"
    );

    let join = stack.token("carol", Some("standup-42"), false, 600);
    let c = Client::join(&node, "standup-42", &format!("token={join}")).await;
    assert_eq!(c.peer_id(), "carol");

    let expired = stack.token("dave", Some("standup-42"), false, -600);
    let (_x, first) = Client::connect_raw(&node, "standup-42", &format!("token={expired}")).await;
    assert_eq!(first["code"], "token_expired");
    let other_room = stack.token("erin", Some("elsewhere"), false, 600);
    let (_x, first) =
        Client::connect_raw(&node, "standup-42", &format!("token={other_room}")).await;
    assert_eq!(first["code"], "wrong_room");
    let (_x, first) = Client::connect_raw(&node, "standup-42", "token=not.a.token").await;
    assert_eq!(first["code"], "invalid_token");
    let no_create = stack.token("frank", None, false, 600);
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .bearer_auth(&no_create)
        .json(&json!({}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "grant_missing"
    );

    // A tenant without public rooms refuses anonymous creation.
    let r = stack
        .http
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"tenant": "private"}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "public_rooms_disabled"
    );

    // The creator's token deletes the room; the member hears it closed.
    let mut c = c;
    let r = stack
        .http
        .delete(format!("{base}/v1/rooms/standup-42"))
        .bearer_auth(&join)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403, "only the creator deletes");
    let r = stack
        .http
        .delete(format!("{base}/v1/rooms/standup-42"))
        .bearer_auth(&creator)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 204);
    assert_eq!(c.expect("room-closed").await["reason"], "deleted");
    assert_eq!(c.next().await["code"], 4004);
}

#[tokio::test]
async fn rooms_expire_and_owner_keys_delete_and_ice_servers_refresh() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({"ttl_secs": 2})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&node, id, "").await;
    let closed = a.expect("room-closed").await;
    assert_eq!(closed["reason"], "expired");
    let r = stack
        .http
        .get(format!("http://{}/v1/rooms/{id}", node.addr()))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 404);

    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let owner = room["owner_key"].as_str().expect("owner key");
    let mut b = Client::join(&node, id, "").await;
    // Credentials last 60 s in this stack: fresh ones arrive before that.
    let fresh = b.expect("ice-servers").await;
    let expires = fresh["ice_servers"]["expires"].as_u64().expect("expiry");
    assert!(
        expires
            > b.welcome["ice_servers"]["expires"]
                .as_u64()
                .expect("expiry")
    );
    let url = format!("http://{}/v1/rooms/{id}", node.addr());
    let info = common::room_as_owner(&stack.http, &node, id, owner).await;
    assert_eq!(info["peers"], json!([b.peer_id()]));
    // No credentials: 401 before anything is looked up; a wrong owner
    // key: 403.
    assert_eq!(
        stack.http.delete(&url).send().await.expect("req").status(),
        401
    );
    assert_eq!(
        stack
            .http
            .delete(&url)
            .bearer_auth("not-the-owner-key")
            .send()
            .await
            .expect("req")
            .status(),
        403
    );
    assert_eq!(
        stack
            .http
            .delete(&url)
            .bearer_auth(owner)
            .send()
            .await
            .expect("req")
            .status(),
        204
    );
    b.expect("room-closed").await;
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn origin_allowlist_refuses_other_sites() {
    let stack = Stack::new().await;
    let mut s = stack.settings();
    s.allowed_origins = vec!["https://app.example.com".into()];
    let node = stack.node(s).await;
    let url = format!("http://{}/v1/rooms", node.addr());
    let body = json!({"tenant": "t1"});
    let r = stack
        .http
        .post(&url)
        .header("origin", "https://evil.example")
        .json(&body)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "origin_not_allowed"
    );
    let r = stack
        .http
        .post(&url)
        .header("origin", "https://app.example.com")
        .json(&body)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let room: Value = r.json().await.expect("json");
    // The WebSocket from another site is refused with an `error` message
    // a browser can read, and a close.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/v1/rooms/{}/ws",
            node.addr(),
            room["room_id"].as_str().expect("id")
        ))
        .expect("request");
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgraded");
    let first = futures_util::StreamExt::next(&mut ws)
        .await
        .expect("message")
        .expect("ok");
    let first: Value = serde_json::from_str(first.to_text().expect("text")).expect("json");
    assert_eq!(first["code"], "origin_not_allowed");
}

#[tokio::test]
async fn graceful_stop_tells_peers_to_reconnect() {
    let stack = Stack::new().await;
    let node = stack.node(stack.settings()).await;
    let room = public_room(&stack.http, &node, json!({})).await;
    let id = room["room_id"].as_str().expect("id");
    let mut a = Client::join(&node, id, "").await;
    let stop = tokio::spawn(node.stop());
    let closed = a.next().await;
    assert_eq!(closed["code"], 1012, "{closed}");
    tokio::time::timeout(Duration::from_secs(15), stop)
        .await
        .expect("stops")
        .expect("join");
}
