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
    #[error("join token could not be signed: {0}")]
    Sign(String),
}

/// Clock skew tolerated on `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

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

/// Verifies signature, issuer and expiry (against `now`, Unix seconds).
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
