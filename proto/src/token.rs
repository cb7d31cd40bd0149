//! Join tokens: JWT HS256 signed with a tenant's API key secret.
//!
//! `iss` is the API key id (also put in the header's `kid`, so a verifier
//! can find the secret before checking the signature), `sub` the peer
//! identity, `room` the room it is good for (absent: any room of the
//! tenant), `grants` what it allows, `exp` when it stops working.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a join token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Grants {
    /// May create rooms.
    #[serde(default)]
    pub create: bool,
    /// May join rooms.
    #[serde(default)]
    pub join: bool,
}

/// The claims of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinClaims {
    /// API key id that signed the token.
    pub iss: String,
    /// Peer identity.
    pub sub: String,
    /// Room the token is limited to; `None` means any room of the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub grants: Grants,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: u64,
    /// Not valid before, Unix seconds (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed")]
    Malformed,
    #[error("join token names no key id")]
    NoKeyId,
    #[error("join token signature is invalid")]
    BadSignature,
    #[error("join token has expired")]
    Expired,
    #[error("join token issuer does not match its key id")]
    IssuerMismatch,
    #[error("join token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("join token lives longer than {MAX_LIFETIME_SECS} s")]
    TooLong,
    #[error("join token claim {claim}: {error}")]
    BadClaim {
        claim: &'static str,
        error: crate::id::IdError,
    },
    #[error("join token could not be signed: {0}")]
    Sign(String),
}

/// Clock skew tolerated on `exp` and `nbf`, in seconds (documented in
/// `docs/signaling.md`).
pub const LEEWAY_SECS: u64 = 30;

/// Longest lifetime a join token may have, from `iat` (or from the
/// verifier's clock) to `exp`. Minting caps at this too, and verification
/// enforces it, so a self-signed token valid for years is refused.
pub const MAX_LIFETIME_SECS: u64 = 86_400;

/// Signs `claims` with the API key `claims.iss` whose secret is `secret`.
pub fn mint(claims: &JoinClaims, secret: &[u8]) -> Result<String, TokenError> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(claims.iss.clone());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
        .map_err(|e| TokenError::Sign(e.to_string()))
}

/// The API key id a token claims to be signed with (not yet verified).
pub fn key_id(token: &str) -> Result<String, TokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    header.kid.ok_or(TokenError::NoKeyId)
}

/// Verifies signature, issuer, `nbf`, expiry and lifetime (against `now`,
/// Unix seconds), and that `sub` and `room` are valid identifiers, so every
/// caller applies the same rules.
pub fn verify(token: &str, secret: &[u8], now: u64) -> Result<JoinClaims, TokenError> {
    let kid = key_id(token)?;
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked below against the caller's clock, so tests and
    // state machines can feed their own time.
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let data =
        jsonwebtoken::decode::<JoinClaims>(token, &DecodingKey::from_secret(secret), &validation)
            .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
            _ => TokenError::Malformed,
        })?;
    let claims = data.claims;
    if claims.iss != kid {
        return Err(TokenError::IssuerMismatch);
    }
    if claims.exp.saturating_add(LEEWAY_SECS) < now {
        return Err(TokenError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS))
    {
        return Err(TokenError::NotYetValid);
    }
    // From issue (or from now, when `iat` is absent or in the future) to
    // expiry: never more than the cap, whatever the signer claimed.
    let start = if claims.iat == 0 {
        now
    } else {
        claims.iat.min(now)
    };
    if claims.exp.saturating_sub(start) > MAX_LIFETIME_SECS + LEEWAY_SECS
        || claims.exp.saturating_sub(now) > MAX_LIFETIME_SECS + LEEWAY_SECS
    {
        return Err(TokenError::TooLong);
    }
    crate::id::validate("sub", &claims.sub).map_err(|error| TokenError::BadClaim {
        claim: "sub",
        error,
    })?;
    if let Some(room) = &claims.room {
        crate::id::validate("room", room).map_err(|error| TokenError::BadClaim {
            claim: "room",
            error,
        })?;
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> JoinClaims {
        JoinClaims {
            iss: "key1".into(),
            sub: "alice".into(),
            room: Some("r1".into()),
            grants: Grants {
                create: true,
                join: true,
            },
            exp,
            iat: 1,
            nbf: None,
        }
    }

    #[test]
    fn mint_then_verify() {
        let token = mint(&claims(1_000), b"secret-secret-secret").expect("sign");
        assert_eq!(key_id(&token).expect("kid"), "key1");
        let got = verify(&token, b"secret-secret-secret", 900).expect("valid");
        assert_eq!(got, claims(1_000));
    }

    #[test]
    fn refuses_wrong_secret_expiry_and_garbage() {
        let token = mint(&claims(1_000), b"secret-secret-secret").expect("sign");
        assert_eq!(
            verify(&token, b"other-secret-other", 900),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(&token, b"secret-secret-secret", 1_000 + LEEWAY_SECS + 1),
            Err(TokenError::Expired)
        );
        assert_eq!(verify("not.a.jwt", b"x", 0), Err(TokenError::Malformed));
        assert_eq!(key_id(""), Err(TokenError::Malformed));
    }

    #[test]
    fn honours_nbf_caps_lifetime_and_validates_claims() {
        let secret = b"secret-secret-secret";
        let sign = |c: &JoinClaims| mint(c, secret).expect("sign");
        let mut c = claims(1_000);
        c.nbf = Some(900);
        assert_eq!(
            verify(&sign(&c), secret, 900 - LEEWAY_SECS - 1),
            Err(TokenError::NotYetValid)
        );
        assert!(verify(&sign(&c), secret, 900 - LEEWAY_SECS).is_ok());

        // Ten years, self-signed: refused at verification, not only at minting.
        let mut long = claims(0);
        long.iat = 1_000;
        long.exp = 1_000 + 10 * 365 * 86_400;
        assert_eq!(
            verify(&sign(&long), secret, 1_000),
            Err(TokenError::TooLong)
        );
        // No iat: measured from now.
        long.iat = 0;
        long.exp = 1_000 + MAX_LIFETIME_SECS + LEEWAY_SECS + 1;
        assert_eq!(
            verify(&sign(&long), secret, 1_000),
            Err(TokenError::TooLong)
        );
        long.exp = 1_000 + MAX_LIFETIME_SECS;
        assert!(verify(&sign(&long), secret, 1_000).is_ok());

        for (sub, room) in [
            ("x".repeat(1_000), None),
            ("a/..".to_owned(), None),
            ("..".to_owned(), None),
            ("alice".to_owned(), Some("../r".to_owned())),
        ] {
            let mut c = claims(1_000);
            c.sub = sub.clone();
            c.room = room;
            assert!(
                matches!(
                    verify(&sign(&c), secret, 900),
                    Err(TokenError::BadClaim { .. })
                ),
                "{sub}"
            );
        }
    }

    #[test]
    fn refuses_issuer_that_differs_from_kid() {
        let mut c = claims(1_000);
        c.iss = "key2".into();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("key1".into());
        let token =
            jsonwebtoken::encode(&header, &c, &EncodingKey::from_secret(b"s")).expect("sign");
        assert_eq!(verify(&token, b"s", 0), Err(TokenError::IssuerMismatch));
    }
}
