//! One peer's WebSocket: authenticate, join, then relay until the peer
//! leaves, goes silent, is too slow, is replaced, loses access, the room
//! closes or the node drains. One task per connection does reading,
//! writing and timers, so an idle peer costs one small task, one queue and
//! the socket buffers.
//!
//! The handler is generic over the socket ([`Socket`]: any `Stream` of
//! messages and `Sink` for them), so its rules are unit-tested with
//! channels as well as over real connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use floe_common::ratelimit::TokenBucket;
use floe_proto::signal::{ClientMessage, ServerMessage};
use floe_proto::time::unix_now;
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use serde::Deserialize;

use crate::bus::JoinOutcome;
use crate::error::SignalError;
use crate::hub::{Mailbox, Outbound, close};
use crate::room::{Admission, Member, RoomRecord, SECRET_LEN, secret_hash};
use crate::state::App;

/// Largest `broadcast` payload.
const MAX_BROADCAST: usize = 8 * 1024;
/// Refresh ICE servers this long before the credentials expire.
const REFRESH_BEFORE: u64 = 60;
/// Longest a closing handshake may take (sending our close frame and
/// waiting for the client's answer).
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long a connection that sent an oversized message stays open after
/// its close frame (see [`end`]).
const LINGER: Duration = Duration::from_secs(1);
/// Largest byte count one `stats` report may claim, per path.
pub(crate) const MAX_STATS_REPORT: u64 = 1 << 36;
/// Sustained rate of reported bytes a connection may claim (10 Gbit/s), in
/// MiB per second, and the burst (a minute of it).
const STATS_MIB_PER_SEC: f64 = 1_192.0;
const STATS_BURST_MIB: u32 = 60 * 1_192;

/// A WebSocket as this module needs it.
pub(crate) trait Socket:
    Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin + Send
{
}

impl<T> Socket for T where
    T: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Unpin
        + Send
{
}

/// Query of the WebSocket URL.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct JoinQuery {
    /// Join token (browsers cannot set headers on WebSockets).
    pub token: Option<String>,
    /// Room password, for public rooms that have one.
    pub password: Option<String>,
    /// Stable id of this client: in public rooms, also its peer id.
    pub client_id: Option<String>,
    /// The secret a previous `welcome` gave this client: needed to replace
    /// a connection of the same peer without a join token.
    pub reconnect_secret: Option<String>,
}

/// Who is joining, after authentication.
struct Joiner {
    record: RoomRecord,
    peer_id: String,
    /// API key of the join token, when there was one.
    key_id: Option<String>,
    secret: String,
}

async fn authenticate(app: &App, room: &str, q: &JoinQuery) -> Result<Joiner, SignalError> {
    if let Some(cid) = &q.client_id {
        floe_proto::id::validate("client_id", cid)?;
    }
    let secret = match &q.reconnect_secret {
        Some(s) => {
            let ok = SECRET_LEN.contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(SignalError::Invalid(format!(
                    "reconnect_secret must be {} to {} letters, digits, '-' or '_'",
                    SECRET_LEN.start(),
                    SECRET_LEN.end()
                )));
            }
            s.clone()
        }
        None => floe_common::secret::random_token(16),
    };
    match &q.token {
        Some(token) => {
            let holder = app.verify_token(token).await?;
            let record = app.find_room(room, Some(&holder.tenant)).await?;
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
            Ok(Joiner {
                record,
                peer_id: holder.claims.sub,
                key_id: Some(holder.claims.iss),
                secret,
            })
        }
        None => {
            let record = app.find_room(room, None).await?;
            let tenant = app.tenant(&record.tenant).await?;
            if !record.public || !tenant.plan.public_rooms {
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
            let peer_id = q
                .client_id
                .clone()
                .unwrap_or_else(|| format!("p_{}", floe_common::secret::random_token(6)));
            Ok(Joiner {
                record,
                peer_id,
                key_id: None,
                secret,
            })
        }
    }
}

async fn send_text(socket: &mut impl Socket, text: Utf8Bytes) -> bool {
    socket.send(Message::Text(text)).await.is_ok()
}

/// Starts the closing handshake and waits (briefly) for the client's
/// answer, so the client reads the close code instead of a reset. Bounded
/// as a whole: a peer that reads nothing cannot hold it up.
async fn close_with(socket: &mut impl Socket, code: u16, reason: &str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    }));
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if socket.send(frame).await.is_err() {
            return;
        }
        // Read until the client's close (or the end), discarding what
        // comes first; after a refused oversized frame this also drains
        // its rest, so closing does not reset the connection under the
        // error the client has yet to read.
        while let Some(m) = socket.next().await {
            if matches!(m, Ok(Message::Close(_))) {
                break;
            }
        }
    })
    .await;
}

/// Sends an `error` message and closes: 1013 for "try again later", 1012
/// while draining, 4003 for every other refusal.
pub(crate) async fn refuse(app: &App, mut socket: impl Socket, err: SignalError) {
    let err = app.refuse(err);
    let code = match &err {
        SignalError::Unavailable(_) if app.draining.is_cancelled() => close::DRAINING,
        SignalError::Unavailable(_) => close::TRY_AGAIN,
        _ => close::REFUSED,
    };
    let text = ServerMessage::error(err.code(), err.to_string()).to_json();
    let _ = tokio::time::timeout(CLOSE_WAIT, send_text(&mut socket, text.into())).await;
    close_with(&mut socket, code, err.code()).await;
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
pub(crate) struct Joined {
    pub record: Arc<RoomRecord>,
    pub me: Member,
    pub mailbox: Arc<Mailbox>,
    /// When the ICE credentials in the welcome expire.
    pub ice_expires: u64,
}

/// Serves one WebSocket until it ends.
///
/// Only the relay loop's state lives inside the connection task for the
/// connection's lifetime; joining and leaving await HTTP and Redis
/// futures several KiB large, so they are boxed and freed when done
/// (unboxed, they made every connection task about 3.8 KiB).
pub(crate) async fn serve(app: Arc<App>, mut socket: impl Socket, room: String, q: JoinQuery) {
    let Some(joined) = Box::pin(join(&app, &mut socket, room, q)).await else {
        return;
    };
    let reason = relay(&app, &mut socket, &joined).await;
    Box::pin(leave(&app, &joined, reason)).await;
}

/// Authenticates, fetches ICE servers, joins the room and sends the
/// welcome; `None` when the peer was refused (and told why) or is gone.
async fn join(app: &App, socket: &mut impl Socket, room: String, q: JoinQuery) -> Option<Joined> {
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
    let Joiner {
        record,
        peer_id,
        key_id,
        secret,
    } = joiner;
    let ice = match app.ice_servers(&record, &peer_id).await {
        Ok(ice) => ice,
        Err(e) => {
            refuse(app, socket, e).await;
            return None;
        }
    };
    let by_token = key_id.is_some();
    let mut me = Member {
        peer_id,
        session_id: format!("s_{}", floe_common::secret::random_token(6)),
        node: app.settings.node_id.clone(),
        secret: secret_hash(&secret),
    };
    let mailbox = Mailbox::new();
    // Admitted before registering locally, so a refused joiner (say, one
    // without the reconnect secret) cannot displace the connection it
    // claims to replace; announced after, so answers to the announcement
    // find this connection.
    let now = unix_now();
    let admitted = match app.bus.join(&record, &me, by_token, now).await {
        Ok(JoinOutcome::Admitted { peers, admission }) => Ok((peers, admission)),
        Ok(JoinOutcome::Refused(r)) => Err(r.into()),
        Ok(JoinOutcome::NoRoom) => Err(SignalError::RoomNotFound),
        Err(e) => Err(e.into()),
    };
    let (peers, admission) = match admitted {
        Ok(a) => a,
        Err(e) => {
            refuse(app, socket, e).await;
            return None;
        }
    };
    let key = record.key();
    let (record, old) = app.hub.register(record, &me, key_id, mailbox.clone());
    // The hub and the bus keep the secret's hash; the connection's own
    // copy would only cost memory for as long as it lives.
    me.secret = String::new();
    if let Some(old) = old {
        // A reconnect of a peer held on this node whose close the bus has
        // not reached yet.
        old.close(close::REPLACED, crate::hub::REPLACED_REASON);
    }
    if let Err(e) = app.bus.announce(&record, &me, &admission).await {
        // Unannounced, the peer would be in the room unknown to the
        // others: refused (1013, try again). Should the removal fail too,
        // this node's next reconcile removes the entry.
        tracing::warn!(error = %e, room = %key, "cannot announce a join; refused");
        app.hub.unregister(&key, &me.peer_id, &me.session_id);
        if let Err(e) = app.bus.leave(&key, &me, "error").await {
            tracing::warn!(error = %e, room = %key, "cannot withdraw an unannounced join");
        }
        app.metrics.rooms.set(app.hub.room_count() as i64);
        refuse(app, socket, e.into()).await;
        return None;
    }
    if let Admission::Replaced { previous } = admission {
        tracing::debug!(room = %key, peer = %me.peer_id, old_session = %previous.session_id, "reconnect replaced a connection");
    }
    app.metrics.connections.inc();
    app.metrics.rooms.set(app.hub.room_count() as i64);
    tracing::debug!(room = %key, peer = %me.peer_id, session = %me.session_id, "peer joined");
    let ice_expires = ice.expires;
    let welcome = ServerMessage::Welcome {
        room_id: record.id.clone(),
        peer_id: me.peer_id.clone(),
        session_id: me.session_id.clone(),
        peers,
        room_expires_at: record.expires_at,
        ice_servers: ice,
        reconnect_secret: secret,
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
    let key = record.key();
    app.hub.unregister(&key, &me.peer_id, &me.session_id);
    if let Err(e) = app.bus.leave(&key, me, reason).await {
        // This node's next reconcile removes the entry and tells them.
        tracing::warn!(error = %e, room = %key, "cannot announce a departure");
    }
    app.metrics.connections.dec();
    app.metrics.rooms.set(app.hub.room_count() as i64);
    tracing::debug!(room = %key, peer = %me.peer_id, reason, "peer left");
}

/// How a bounded send ended.
enum Sent {
    Ok,
    /// The socket failed.
    Gone,
    /// The peer reads too slowly: its mailbox overflowed while we waited,
    /// or one write took longer than a heartbeat interval.
    Slow,
}

/// Sends `msg` unless the peer is too slow to take it. Callers box it: its
/// timer and waiters would otherwise sit in every idle connection's task
/// (224 bytes each), where one allocation per sent message is cheaper.
async fn send_bounded(
    socket: &mut impl Socket,
    msg: Message,
    mailbox: &Mailbox,
    limit: Duration,
) -> Sent {
    tokio::select! {
        r = socket.send(msg) => if r.is_ok() { Sent::Ok } else { Sent::Gone },
        _ = mailbox.aborted() => Sent::Slow,
        _ = tokio::time::sleep(limit) => Sent::Slow,
    }
}

/// What `on_text` and the reader decided.
enum Step {
    /// Keep going, answering with this message if any.
    Continue(Option<Utf8Bytes>),
    /// End the connection (after closing it) for this reason.
    End(&'static str),
}

/// The connection's main loop; returns why it ended.
pub(crate) async fn relay(app: &App, socket: &mut impl Socket, joined: &Joined) -> &'static str {
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
    let mut limits = Limits {
        messages: TokenBucket::new(s.messages_per_sec, s.message_burst, Instant::now()),
        stats: TokenBucket::new(STATS_MIB_PER_SEC, STATS_BURST_MIB, Instant::now()),
    };
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
        let step = tokio::select! {
            incoming = socket.next() => match incoming {
                Some(Ok(m)) => {
                    last_heard = Instant::now();
                    match m {
                        // Boxed: message handling state lives only while a message is handled.
                        Message::Text(text) => Box::pin(on_text(app, record, me, &mut limits, text)).await,
                        Message::Binary(_) => Step::Continue(Some(refused(
                            app,
                            "binary_not_supported",
                            "send JSON text messages".into(),
                        ))),
                        Message::Close(_) => return "closed",
                        Message::Ping(_) | Message::Pong(_) => Step::Continue(None),
                    }
                }
                Some(Err(e)) => {
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("too big") {
                        Step::End("message_too_large")
                    } else {
                        tracing::debug!(error = %e, "WebSocket error");
                        return "error";
                    }
                }
                None => return "closed",
            },
            out = mailbox.next() => match out {
                Outbound::Text(t) => {
                    match Box::pin(send_bounded(socket, Message::Text(t), mailbox, heartbeat)).await {
                        Sent::Ok => Step::Continue(None),
                        Sent::Gone => return "gone",
                        Sent::Slow => Step::End("slow"),
                    }
                }
                Outbound::Close { code, reason } => {
                    // Boxed, like every once-per-connection step (its timer is large).
                    Box::pin(close_with(socket, code, &reason)).await;
                    return match code {
                        close::REPLACED => "replaced",
                        close::ROOM_CLOSED => "room_closed",
                        close::SLOW => "slow",
                        close::REVOKED => "revoked",
                        _ => "closed_by_server",
                    };
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > 2 * heartbeat {
                    Box::pin(close_with(socket, close::DEAD, "no heartbeat")).await;
                    return "timeout";
                }
                match Box::pin(send_bounded(socket, Message::Ping(Default::default()), mailbox, heartbeat)).await {
                    Sent::Ok => Step::Continue(None),
                    Sent::Gone => return "gone",
                    Sent::Slow => Step::End("slow"),
                }
            }
            _ = &mut refresh_sleep, if refresh.is_some() => {
                let answer = match Box::pin(app.ice_servers(record, &me.peer_id)).await {
                    Ok(fresh) => {
                        refresh = refresh_at(fresh.expires);
                        Some(ServerMessage::IceServers { ice_servers: fresh }.to_json().into())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ICE server refresh failed; retrying");
                        refresh = Some(tokio::time::Instant::now() + Duration::from_secs(10));
                        None
                    }
                };
                refresh_sleep.as_mut().reset(refresh.unwrap_or_else(far_future));
                Step::Continue(answer)
            }
            _ = &mut draining => {
                Box::pin(close_with(socket, close::DRAINING, "node draining; reconnect")).await;
                return "node_draining";
            }
        };
        match step {
            Step::Continue(None) => {}
            Step::Continue(Some(answer)) => {
                match Box::pin(send_bounded(
                    socket,
                    Message::Text(answer),
                    mailbox,
                    heartbeat,
                ))
                .await
                {
                    Sent::Ok => {}
                    Sent::Gone => return "gone",
                    Sent::Slow => return Box::pin(end(app, socket, record, me, "slow")).await,
                }
            }
            Step::End(reason) => return Box::pin(end(app, socket, record, me, reason)).await,
        }
    }
}

/// Ends a connection from this side with the documented close: 1000 when
/// the peer sent `leave`, 4002 for a slow reader, `message_too_large`
/// then 1009 for an oversized message (at every size).
async fn end(
    app: &App,
    socket: &mut impl Socket,
    record: &RoomRecord,
    me: &Member,
    reason: &'static str,
) -> &'static str {
    // Off the hub first, so nothing more is queued for it.
    app.hub
        .unregister(&record.key(), &me.peer_id, &me.session_id);
    match reason {
        "message_too_large" => {
            let text = refused(
                app,
                "message_too_large",
                format!(
                    "messages are limited to {} bytes",
                    app.settings.max_message_bytes
                ),
            );
            let _ = tokio::time::timeout(CLOSE_WAIT, send_text(socket, text)).await;
            close_with(socket, close::TOO_BIG, "message too large").await;
            // The WebSocket layer stops reading after refusing the frame,
            // so the rest of it stays unread in the kernel, and closing
            // the socket now would send a reset that can overtake the
            // error and the close frame on their way to the client. Keep
            // the connection a moment so the client reads both first.
            tokio::time::sleep(LINGER).await;
        }
        "left" => close_with(socket, 1000, "left").await,
        _ => {
            app.metrics.refusals.with_label_values(&["slow"]).inc();
            close_with(socket, close::SLOW, "too slow to read messages").await;
        }
    }
    reason
}

/// Per-connection budgets.
pub(crate) struct Limits {
    messages: TokenBucket,
    /// Reported bytes, in MiB.
    stats: TokenBucket,
}

/// An `error` message, counted as a refusal.
fn refused(app: &App, code: &str, message: String) -> Utf8Bytes {
    app.metrics.refusals.with_label_values(&[code]).inc();
    ServerMessage::error(code, message).to_json().into()
}

/// Handles one text message.
async fn on_text(
    app: &App,
    record: &RoomRecord,
    me: &Member,
    limits: &mut Limits,
    text: Utf8Bytes,
) -> Step {
    if text.len() > app.settings.max_message_bytes {
        return Step::End("message_too_large");
    }
    if !limits.messages.take(1.0, Instant::now()) {
        return Step::Continue(Some(refused(
            app,
            "rate_limited",
            "too many messages; slow down".into(),
        )));
    }
    let msg = match ClientMessage::parse(&text) {
        Ok(m) => m,
        Err(e) => return Step::Continue(Some(refused(app, "bad_message", e.to_string()))),
    };
    app.metrics.message(&msg).inc();
    let key = record.key();
    let answer = match msg {
        ClientMessage::Signal { to, sid, payload } => {
            if to == me.peer_id {
                Some(refused(app, "bad_message", "cannot signal yourself".into()))
            } else {
                let out = ServerMessage::Signal {
                    from: me.peer_id.clone(),
                    from_sid: me.session_id.clone(),
                    payload,
                };
                match app
                    .bus
                    .send_to_peer(&key, me, &to, sid.as_deref(), out.to_json().into())
                    .await
                {
                    Ok(()) => None,
                    Err(e) => Some(refused(
                        app,
                        e.code(),
                        format!("message to {to} not delivered: {e}"),
                    )),
                }
            }
        }
        ClientMessage::Broadcast { payload } => {
            if payload.get().len() > MAX_BROADCAST {
                Some(refused(
                    app,
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
                    .broadcast(&key, &me.peer_id, out.to_json().into())
                    .await
                {
                    Ok(()) => None,
                    Err(e) => Some(refused(app, "bus_unavailable", e.to_string())),
                }
            }
        }
        ClientMessage::Leave => return Step::End("left"),
        ClientMessage::Stats {
            direct_bytes,
            relayed_bytes,
        } => stats(app, &record.tenant, limits, direct_bytes, relayed_bytes),
        ClientMessage::Ping => Some(ServerMessage::Pong.to_json().into()),
    };
    Step::Continue(answer)
}

/// Counts a `stats` report, or refuses one that claims more than a peer
/// connection can have moved: over [`MAX_STATS_REPORT`] per path, or past
/// the connection's budget of 10 Gbit/s sustained.
fn stats(
    app: &App,
    tenant: &str,
    limits: &mut Limits,
    direct: u64,
    relayed: u64,
) -> Option<Utf8Bytes> {
    let total = direct.saturating_add(relayed);
    if direct > MAX_STATS_REPORT
        || relayed > MAX_STATS_REPORT
        || !limits
            .stats
            .take(total as f64 / f64::from(1 << 20), Instant::now())
    {
        return Some(refused(
            app,
            "invalid_stats",
            format!(
                "a stats report counts bytes since the previous one: at most {MAX_STATS_REPORT} per path, and no more than 10 Gbit/s on average"
            ),
        ));
    }
    for (path, bytes) in [("direct", direct), ("relayed", relayed)] {
        app.metrics
            .reported_bytes
            .with_label_values(&[tenant, path])
            .inc_by(bytes);
    }
    None
}

#[cfg(test)]
mod tests {
    //! The relay loop's rules, driven through channels instead of sockets.

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;
    use tokio_util::sync::PollSender;

    use super::*;
    use crate::bus::local::LocalBus;
    use crate::hub::{Hub, Target};
    use crate::room::tests::{member, record};

    /// A socket whose incoming side is a channel the test feeds and whose
    /// outgoing side is a bounded channel the test may leave undrained
    /// (a peer that does not read).
    struct Pipe {
        rx: mpsc::UnboundedReceiver<Message>,
        tx: PollSender<Message>,
    }

    fn failed<E: std::fmt::Debug>(e: E) -> axum::Error {
        axum::Error::new(std::io::Error::other(format!("{e:?}")))
    }

    impl Stream for Pipe {
        type Item = Result<Message, axum::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.rx.poll_recv(cx).map(|m| m.map(Ok))
        }
    }

    impl Sink<Message> for Pipe {
        type Error = axum::Error;
        fn poll_ready(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.tx).poll_ready(cx).map_err(failed)
        }
        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            Pin::new(&mut self.tx).start_send(item).map_err(failed)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.tx).poll_flush(cx).map_err(failed)
        }
        fn poll_close(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.tx).poll_close(cx).map_err(failed)
        }
    }

    struct Harness {
        app: Arc<App>,
        joined: Joined,
        input: mpsc::UnboundedSender<Message>,
        output: mpsc::Receiver<Message>,
        socket: Pipe,
    }

    /// A node (local bus, a control plane nobody calls) with peer "a"
    /// joined to a room; `capacity` frames fit in its socket unread.
    async fn harness(capacity: usize) -> Harness {
        let mut settings = crate::Settings::new(
            "127.0.0.1:0".parse().expect("addr"),
            "http://127.0.0.1:9",
            "t",
        );
        settings.max_message_bytes = 2_048;
        settings.message_burst = 20;
        // Next to no refill: the burst alone decides, however slow the machine.
        settings.messages_per_sec = 0.001;
        settings.heartbeat_secs = 30;
        let hub = Arc::new(Hub::new());
        let app = Arc::new(App {
            bus: Arc::new(LocalBus::new(hub.clone())),
            hub,
            control: crate::control::Control::new(&settings.control_url, "t").expect("client"),
            ice: crate::ice::Ice::new(Duration::from_secs(60)),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            draining: floe_common::Shutdown::new(),
            create_limiter: std::sync::Mutex::new(floe_common::ratelimit::RateLimiter::new(
                1.0, 1, 10,
            )),
            settings,
        });
        let mut room = record(4, false);
        room.expires_at = unix_now() + 600;
        app.bus
            .create_room(&room, None, unix_now())
            .await
            .expect("create");
        let me = member("a", "s1");
        app.bus
            .join(&room, &me, false, unix_now())
            .await
            .expect("join");
        let mailbox = Mailbox::new();
        let (record, _) = app.hub.register(room, &me, None, mailbox.clone());
        let (input, rx) = mpsc::unbounded_channel();
        let (tx, output) = mpsc::channel(capacity);
        Harness {
            app,
            joined: Joined {
                record,
                me,
                mailbox,
                ice_expires: 0,
            },
            input,
            output,
            socket: Pipe {
                rx,
                tx: PollSender::new(tx),
            },
        }
    }

    fn json_of(m: Option<Message>) -> serde_json::Value {
        match m {
            Some(Message::Text(t)) => serde_json::from_str(t.as_str()).expect("json"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    fn close_code(m: Option<Message>) -> u16 {
        match m {
            Some(Message::Close(Some(f))) => f.code,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_are_answered_by_the_rules() {
        let mut h = harness(64).await;
        let send = |t: &str| h.input.send(Message::Text(t.into())).expect("send");
        send(r#"{"type":"ping"}"#);
        send(r#"{"type":"stats","direct_bytes":18446744073709551615}"#);
        send(r#"{"type":"stats","direct_bytes":100,"relayed_bytes":5}"#);
        send(r#"{"type":"signal","to":"a","payload":{}}"#);
        send(r#"{"type":"signal","to":"nobody","payload":{}}"#);
        h.input
            .send(Message::Binary(vec![1u8].into()))
            .expect("send");
        send(r#"{"type":"leave"}"#);
        let app = h.app.clone();
        let relay = tokio::spawn(async move {
            let reason = relay(&app, &mut h.socket, &h.joined).await;
            (reason, h.output)
        });
        let (reason, mut out) = relay.await.expect("relay");
        assert_eq!(reason, "left");
        assert_eq!(json_of(out.recv().await)["type"], "pong");
        assert_eq!(json_of(out.recv().await)["code"], "invalid_stats");
        assert_eq!(json_of(out.recv().await)["code"], "bad_message");
        assert_eq!(json_of(out.recv().await)["code"], "peer_not_found");
        assert_eq!(json_of(out.recv().await)["code"], "binary_not_supported");
        assert_eq!(close_code(out.recv().await), 1000);
        let reported = h
            .app
            .metrics
            .reported_bytes
            .with_label_values(&["t", "direct"])
            .get();
        assert_eq!(reported, 100, "the poisoned report was not counted");
    }

    #[tokio::test]
    async fn a_flood_is_rate_limited_and_an_oversized_message_closes_1009() {
        let mut h = harness(256).await;
        for _ in 0..30 {
            h.input
                .send(Message::Text(r#"{"type":"ping"}"#.into()))
                .expect("send");
        }
        h.input
            .send(Message::Text("x".repeat(2_049).into()))
            .expect("send");
        let app = h.app.clone();
        let (reason, mut out) = tokio::spawn(async move {
            let reason = relay(&app, &mut h.socket, &h.joined).await;
            (reason, h.output)
        })
        .await
        .expect("relay");
        assert_eq!(reason, "message_too_large");
        let mut codes = Vec::new();
        while let Ok(m) = out.try_recv() {
            match m {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                    codes.push(v["code"].as_str().unwrap_or("pong").to_owned());
                }
                Message::Close(Some(f)) => codes.push(f.code.to_string()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            codes.iter().filter(|c| *c == "pong").count(),
            20,
            "the burst"
        );
        assert_eq!(codes.iter().filter(|c| *c == "rate_limited").count(), 10);
        assert_eq!(&codes[codes.len() - 2..], ["message_too_large", "1009"]);
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_closed_as_slow() {
        // One frame fits; the test never drains the socket.
        let mut h = harness(1).await;
        let app = h.app.clone();
        let key = h.joined.record.key();
        let relay = tokio::spawn(async move {
            let reason = relay(&app, &mut h.socket, &h.joined).await;
            (reason, h.output)
        });
        let big: Utf8Bytes = "y".repeat(60_000).into();
        let mut delivered = 0;
        for _ in 0..crate::hub::QUEUE_BYTES / 60_000 + 10 {
            let target = Target::Peer {
                peer: "a",
                session: None,
            };
            match h.app.hub.deliver(&key, target, &big) {
                crate::hub::Delivery::Delivered => delivered += 1,
                crate::hub::Delivery::Dropped => break,
                other => panic!("unexpected {other:?}"),
            }
            tokio::task::yield_now().await;
        }
        assert!(delivered > 2, "the queue took messages first");
        let (reason, _) = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the stuck writer was woken")
            .expect("relay");
        assert_eq!(reason, "slow");
        assert_eq!(
            h.app.hub.deliver(
                &key,
                Target::Peer {
                    peer: "a",
                    session: None
                },
                &big
            ),
            crate::hub::Delivery::NoPeer,
            "gone from the hub at once"
        );
    }
}
