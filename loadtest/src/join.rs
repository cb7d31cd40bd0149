//! How a simulated peer reaches signaling: join tokens minted locally with
//! the tenant's API key, WebSocket URLs from the signal base URLs, and the
//! socket's next JSON message.

use floe_proto::token::{self, Grants, JoinClaims, TokenError};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// A simulated peer's WebSocket.
pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Lifetime of the join tokens a load run mints.
const TOKEN_TTL_SECS: u64 = 3_600;

/// A join token for `peer` in `room` that may create and join it.
pub(crate) fn join_token(
    kid: &str,
    secret: &str,
    room: &str,
    peer: &str,
) -> Result<String, TokenError> {
    let now = floe_proto::time::unix_now();
    token::mint(
        &JoinClaims {
            iss: kid.to_owned(),
            sub: peer.to_owned(),
            room: Some(room.to_owned()),
            grants: Grants {
                create: true,
                join: true,
            },
            exp: now + TOKEN_TTL_SECS,
            iat: now,
            nbf: None,
        },
        secret.as_bytes(),
    )
}

/// `base` with its scheme turned to WebSocket's (http → ws, https → wss)
/// and no trailing slash.
pub(crate) fn ws_base(base: &str) -> String {
    base.replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1)
        .trim_end_matches('/')
        .to_owned()
}

/// The WebSocket URL of `room` on the signal node at `base`.
pub(crate) fn ws_url(base: &str, room: &str, client: &str) -> String {
    format!("{}/v1/rooms/{room}/ws?client_id={client}", ws_base(base))
}

/// The next text message on `ws` as JSON, skipping others; `None` when
/// the socket closes or `deadline` passes first.
pub(crate) async fn next_json(ws: &mut Ws, deadline: tokio::time::Instant) -> Option<Value> {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_tokens() {
        assert_eq!(
            ws_url("https://sig.example/", "r1", "c"),
            "wss://sig.example/v1/rooms/r1/ws?client_id=c"
        );
        assert_eq!(
            ws_url("http://127.0.0.1:8080", "r", "p"),
            "ws://127.0.0.1:8080/v1/rooms/r/ws?client_id=p"
        );
        let t = join_token("k1", "secret-secret-secret", "r", "p").expect("mint");
        let claims = token::verify(&t, b"secret-secret-secret", floe_proto::time::unix_now())
            .expect("verifies");
        assert_eq!(
            (claims.room.as_deref(), claims.sub.as_str()),
            (Some("r"), "p")
        );
        assert!(claims.grants.create && claims.grants.join);
    }
}
