//! How a simulated peer reaches signaling: join tokens minted locally with
//! the tenant's API key, and WebSocket URLs from the signal base URLs.

use floe_proto::token::{self, Grants, JoinClaims, TokenError};

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

/// The WebSocket URL of `room` on the signal node at `base` (http → ws).
pub(crate) fn ws_url(base: &str, room: &str, client: &str) -> String {
    let ws = base
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    format!(
        "{}/v1/rooms/{room}/ws?client_id={client}",
        ws.trim_end_matches('/')
    )
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
