//! One peer's WebSocket: authenticate, join, then relay until the peer
//! leaves, goes silent, is replaced, the room closes or the node drains.
//! One task per connection does reading, writing and timers, so an idle
//! peer costs one small task, one queue and the socket buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use floe_common::ratelimit::TokenBucket;
use floe_proto::signal::{ClientMessage, ServerMessage};
use floe_proto::time::unix_now;

use crate::api::{App, JoinQuery};
use crate::bus::JoinOutcome;
use crate::error::SignalError;
use crate::hub::{Mailbox, Outbound, close};
use crate::room::{Admission, Member, RoomRecord};

/// Largest `broadcast` payload.
const MAX_BROADCAST: usize = 8 * 1024;
/// Refresh ICE servers this long before the credentials expire.
const REFRESH_BEFORE: u64 = 60;
/// How long to wait for a client to answer our close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Largest byte count one `stats` report may claim.
const MAX_STATS_BYTES: u64 = 1 << 40;

/// Who is joining, after authentication.
struct Joiner {
    record: RoomRecord,
    peer_id: String,
}

async fn authenticate(app: &App, room: &str, q: &JoinQuery) -> Result<Joiner, SignalError> {
    if floe_proto::id::validate("room", room).is_err() {
        return Err(SignalError::RoomNotFound);
    }
    let record = match app.bus.room(room).await? {
        Some(r) if r.expires_at > unix_now() => r,
        _ => return Err(SignalError::RoomNotFound),
    };
    if let Some(cid) = &q.client_id {
        floe_proto::id::validate("client_id", cid)?;
    }
    let peer_id = match &q.token {
        Some(token) => {
            let holder = app.verify_token(token).await?;
            if holder.tenant != record.tenant {
                return Err(SignalError::Forbidden(
                    "wrong_room",
                    "the join token is for another tenant".into(),
                ));
            }
            if holder
                .claims
                .room
                .as_deref()
                .is_some_and(|r| r != record.id)
            {
                return Err(SignalError::Forbidden(
                    "wrong_room",
                    "the join token is for another room".into(),
                ));
            }
            if !holder.claims.grants.join {
                return Err(SignalError::Forbidden(
                    "grant_missing",
                    "the join token does not allow joining".into(),
                ));
            }
            floe_proto::id::validate("peer", &holder.claims.sub)?;
            holder.claims.sub
        }
        None => {
            let tenant = app.tenant(&record.tenant).await?;
            if !tenant.plan.public_rooms {
                return Err(SignalError::Forbidden(
                    "token_required",
                    "this room needs a join token".into(),
                ));
            }
            if let Some(hash) = &record.password {
                let given = q.password.as_deref().unwrap_or("");
                if !hash.verify(given) {
                    return Err(SignalError::WrongPassword);
                }
            }
            q.client_id
                .clone()
                .unwrap_or_else(|| format!("p_{}", floe_common::secret::random_token(6)))
        }
    };
    Ok(Joiner { record, peer_id })
}

async fn send_text(socket: &mut WebSocket, text: Utf8Bytes) -> bool {
    socket.send(Message::Text(text)).await.is_ok()
}

/// Starts the closing handshake and waits (briefly) for the client's
/// answer, so the client reads the close code instead of a reset.
async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    }));
    if socket.send(frame).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Sends an `error` message and closes.
async fn refuse(app: &App, socket: &mut WebSocket, err: SignalError) {
    let err = app.refuse(err);
    let code = if matches!(err, SignalError::Unavailable(_)) {
        close::TRY_AGAIN
    } else {
        close::REFUSED
    };
    let text = ServerMessage::error(err.code(), err.to_string()).to_json();
    send_text(socket, text.into()).await;
    close_with(socket, code, err.code()).await;
}

/// A deadline for a timer that is disabled.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// When to fetch fresh ICE servers for credentials expiring at `expires`.
fn refresh_at(expires: u64) -> Option<tokio::time::Instant> {
    if expires == 0 {
        return None;
    }
    let secs = expires
        .saturating_sub(REFRESH_BEFORE)
        .saturating_sub(unix_now());
    Some(tokio::time::Instant::now() + Duration::from_secs(secs.max(2)))
}

/// A peer that has joined its room.
struct Joined {
    record: Arc<RoomRecord>,
    me: Member,
    mailbox: Arc<Mailbox>,
    /// When the ICE credentials in the welcome expire.
    ice_expires: u64,
}

/// Serves one WebSocket until it ends.
///
/// Only the relay loop's state lives inside the connection task for the
/// connection's lifetime; joining and leaving await HTTP and Redis
/// futures several KiB large, so they are boxed and freed when done
/// (unboxed, they made every connection task about 3.8 KiB).
pub(crate) async fn serve(app: Arc<App>, mut socket: WebSocket, room: String, q: JoinQuery) {
    let Some(joined) = Box::pin(join(&app, &mut socket, room, q)).await else {
        return;
    };
    let reason = relay(&app, &mut socket, &joined).await;
    Box::pin(leave(&app, &joined, reason)).await;
}

/// Authenticates, fetches ICE servers, joins the room and sends the
/// welcome; `None` when the peer was refused (and told why) or is gone.
async fn join(app: &App, socket: &mut WebSocket, room: String, q: JoinQuery) -> Option<Joined> {
    let joiner = match authenticate(app, &room, &q).await {
        Ok(j) => j,
        Err(e) => {
            refuse(app, socket, e).await;
            return None;
        }
    };
    // The query (with its join token) and the path are not needed past
    // authentication; free them instead of holding them per connection.
    drop(q);
    drop(room);
    let Joiner { record, peer_id } = joiner;
    let ice = match app
        .control
        .ice_servers(&record.tenant, &record.id, &peer_id)
        .await
    {
        Ok(ice) => ice,
        Err(e) => {
            refuse(app, socket, e.into()).await;
            return None;
        }
    };
    let me = Member {
        peer_id,
        session_id: format!("s_{}", floe_common::secret::random_token(6)),
        node: app.settings.node_id.clone(),
    };
    let mailbox = Mailbox::new();
    // Registered before joining, so replies to our peer-joined find us.
    let (record, old) = app
        .hub
        .register(record, &me.peer_id, &me.session_id, mailbox.clone());
    if let Some(old) = old {
        // A reconnect of a peer held on this node: close the old socket.
        old.close(close::REPLACED, crate::bus::REPLACED_REASON);
    }
    let admitted = match app.bus.join(&record, &me, unix_now()).await {
        Ok(JoinOutcome::Admitted { peers, admission }) => {
            if let Admission::Replaced { previous } = admission {
                tracing::debug!(room = %record.id, peer = %me.peer_id, old_session = %previous.session_id, "reconnect replaced a connection");
            }
            Ok(peers)
        }
        Ok(JoinOutcome::Refused(r)) => Err(r.into()),
        Ok(JoinOutcome::NoRoom) => Err(SignalError::RoomNotFound),
        Err(e) => Err(e.into()),
    };
    let peers = match admitted {
        Ok(peers) => peers,
        Err(e) => {
            app.hub.unregister(&record.id, &me.peer_id, &me.session_id);
            refuse(app, socket, e).await;
            return None;
        }
    };
    app.metrics.connections.inc();
    app.metrics.rooms.set(app.hub.room_count() as i64);
    tracing::debug!(room = %record.id, peer = %me.peer_id, session = %me.session_id, "peer joined");
    let ice_expires = ice.expires;
    let welcome = ServerMessage::Welcome {
        room_id: record.id.clone(),
        peer_id: me.peer_id.clone(),
        session_id: me.session_id.clone(),
        peers,
        room_expires_at: record.expires_at,
        ice_servers: ice,
    };
    let joined = Joined {
        record,
        me,
        mailbox,
        ice_expires,
    };
    if !send_text(socket, welcome.to_json().into()).await {
        leave(app, &joined, "gone").await;
        return None;
    }
    Some(joined)
}

/// Unregisters a peer that had joined and tells its room.
async fn leave(app: &App, joined: &Joined, reason: &'static str) {
    let Joined { record, me, .. } = joined;
    app.hub.unregister(&record.id, &me.peer_id, &me.session_id);
    if let Err(e) = app.bus.leave(&record.id, me, reason).await {
        // Peers elsewhere learn it when this node's entry is reaped or resynced.
        tracing::warn!(error = %e, room = %record.id, "cannot announce a departure");
    }
    app.metrics.connections.dec();
    app.metrics.rooms.set(app.hub.room_count() as i64);
    tracing::debug!(room = %record.id, peer = %me.peer_id, reason, "peer left");
}

/// The connection's main loop; returns why it ended.
async fn relay(app: &App, socket: &mut WebSocket, joined: &Joined) -> &'static str {
    let Joined {
        record,
        me,
        mailbox,
        ice_expires,
    } = joined;
    let s = &app.settings;
    let heartbeat = Duration::from_secs(s.heartbeat_secs);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let mut bucket = TokenBucket::new(s.messages_per_sec, s.message_burst, Instant::now());
    // The timer and the drain signal live across iterations; made afresh
    // per message they registered and cleared a timer entry and a waiter
    // every time (2.6% of the profile, though below the noise of the
    // CPU-per-message figure).
    let mut refresh = refresh_at(*ice_expires);
    let refresh_sleep = tokio::time::sleep_until(refresh.unwrap_or_else(far_future));
    tokio::pin!(refresh_sleep);
    let draining = app.draining.cancelled();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "WebSocket error");
                        if e.to_string().contains("too long") || e.to_string().contains("too big") {
                            app.metrics.refusals.with_label_values(&["message_too_large"]).inc();
                        }
                        return "error";
                    }
                    None => return "closed",
                };
                last_heard = Instant::now();
                match msg {
                    Message::Text(text) => {
                        // Boxed: message handling state lives only while a message is handled.
                        if let Some(reason) = Box::pin(on_text(app, socket, record, me, &mut bucket, text)).await {
                            return reason;
                        }
                    }
                    Message::Binary(_) => {
                        let err = ServerMessage::error("binary_not_supported", "send JSON text messages");
                        app.metrics.refusals.with_label_values(&["binary_not_supported"]).inc();
                        if !send_text(socket, err.to_json().into()).await {
                            return "gone";
                        }
                    }
                    Message::Close(_) => return "closed",
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            out = mailbox.next() => match out {
                Outbound::Text(t) => {
                    if !send_text(socket, t).await {
                        return "gone";
                    }
                }
                Outbound::Close { code, reason } => {
                    // Boxed, like every once-per-connection step (its timer is large).
                    Box::pin(close_with(socket, code, &reason)).await;
                    return match code {
                        close::REPLACED => "replaced",
                        close::ROOM_CLOSED => "room_closed",
                        close::SLOW => "slow",
                        _ => "closed_by_server",
                    };
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > 2 * heartbeat {
                    Box::pin(close_with(socket, close::DEAD, "no heartbeat")).await;
                    return "timeout";
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return "gone";
                }
            }
            _ = &mut refresh_sleep, if refresh.is_some() => {
                match Box::pin(app.control.ice_servers(&record.tenant, &record.id, &me.peer_id)).await {
                    Ok(fresh) => {
                        refresh = refresh_at(fresh.expires);
                        let msg = ServerMessage::IceServers { ice_servers: fresh };
                        if !send_text(socket, msg.to_json().into()).await {
                            return "gone";
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ICE server refresh failed; retrying");
                        refresh = Some(tokio::time::Instant::now() + Duration::from_secs(10));
                    }
                }
                refresh_sleep.as_mut().reset(refresh.unwrap_or_else(far_future));
            }
            _ = &mut draining => {
                Box::pin(close_with(socket, close::DRAINING, "node draining; reconnect")).await;
                return "node_draining";
            }
        }
    }
}

/// Handles one text message; `Some(reason)` ends the connection.
async fn on_text(
    app: &App,
    socket: &mut WebSocket,
    record: &RoomRecord,
    me: &Member,
    bucket: &mut TokenBucket,
    text: Utf8Bytes,
) -> Option<&'static str> {
    let reply = |code: &str, message: String| -> Utf8Bytes {
        app.metrics.refusals.with_label_values(&[code]).inc();
        ServerMessage::error(code, message).to_json().into()
    };
    if text.len() > app.settings.max_message_bytes {
        let r = reply(
            "message_too_large",
            format!(
                "messages are limited to {} bytes",
                app.settings.max_message_bytes
            ),
        );
        return (!send_text(socket, r).await).then_some("gone");
    }
    if !bucket.take(1.0, Instant::now()) {
        let r = reply("rate_limited", "too many messages; slow down".into());
        return (!send_text(socket, r).await).then_some("gone");
    }
    let msg = match ClientMessage::parse(&text) {
        Ok(m) => m,
        Err(e) => {
            let r = reply("bad_message", e.to_string());
            return (!send_text(socket, r).await).then_some("gone");
        }
    };
    app.metrics.message(&msg).inc();
    let answer: Option<Utf8Bytes> = match msg {
        ClientMessage::Signal { to, sid, payload } => {
            if to == me.peer_id {
                Some(reply("bad_message", "cannot signal yourself".into()))
            } else {
                let out = ServerMessage::Signal {
                    from: me.peer_id.clone(),
                    from_sid: me.session_id.clone(),
                    payload,
                };
                match app
                    .bus
                    .send_to_peer(&record.id, me, &to, sid.as_deref(), out.to_json().into())
                    .await
                {
                    Ok(()) => None,
                    Err(e) => Some(reply(
                        e.code(),
                        format!("message to {to} not delivered: {e}"),
                    )),
                }
            }
        }
        ClientMessage::Broadcast { payload } => {
            if payload.get().len() > MAX_BROADCAST {
                Some(reply(
                    "message_too_large",
                    format!("broadcast payloads are limited to {MAX_BROADCAST} bytes"),
                ))
            } else {
                let out = ServerMessage::Broadcast {
                    from: me.peer_id.clone(),
                    payload,
                };
                match app
                    .bus
                    .broadcast(&record.id, &me.peer_id, out.to_json().into())
                    .await
                {
                    Ok(()) => None,
                    Err(e) => Some(reply("bus_unavailable", e.to_string())),
                }
            }
        }
        ClientMessage::Leave => {
            close_with(socket, 1000, "left").await;
            return Some("left");
        }
        ClientMessage::Stats {
            direct_bytes,
            relayed_bytes,
        } => {
            for (path, bytes) in [("direct", direct_bytes), ("relayed", relayed_bytes)] {
                app.metrics
                    .reported_bytes
                    .with_label_values(&[record.tenant.as_str(), path])
                    .inc_by(bytes.min(MAX_STATS_BYTES));
            }
            None
        }
        ClientMessage::Ping => Some(ServerMessage::Pong.to_json().into()),
    };
    match answer {
        Some(a) => (!send_text(socket, a).await).then_some("gone"),
        None => None,
    }
}
