//! TURN REST credentials (draft-uberti-behave-turn-rest, as coturn's
//! `use-auth-secret` reads them), extended with floe's scope fields.
//!
//! `username = <expiry-unix>:<kid>:<tenant>:<room>:<peer>` and
//! `password = base64(HMAC-SHA1(secret[kid], username))`. The expiry comes
//! first so that coturn accepts the same credentials. The TURN server trusts
//! tenant and room from the username because MESSAGE-INTEGRITY covers it.

use std::collections::BTreeMap;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::api::{IceServer, IceServers};
use crate::id;

/// The parsed form of a floe TURN username.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TurnUsername {
    /// Unix time after which the credential is refused.
    pub expires: u64,
    pub kid: String,
    pub tenant: String,
    pub room: String,
    pub peer: String,
}

/// Why a username or secret list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("username must be <expiry>:<kid>:<tenant>:<room>:<peer>")]
    Malformed,
    #[error("username expiry is not a number")]
    BadExpiry,
    #[error(transparent)]
    BadId(#[from] id::IdError),
    #[error("TURN secret entry must be <kid>=<secret>, got {0:?}")]
    BadSecretEntry(String),
    #[error("TURN secret for kid {0:?} is shorter than 16 bytes")]
    WeakSecret(String),
    #[error("duplicate TURN secret kid {0:?}")]
    DuplicateKid(String),
    #[error("no TURN secret configured")]
    NoSecret,
}

impl TurnUsername {
    /// Parses a username and checks every field's syntax (not the expiry).
    pub fn parse(s: &str) -> Result<Self, CredentialError> {
        let mut parts = s.split(':');
        let (Some(exp), Some(kid), Some(tenant), Some(room), Some(peer), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CredentialError::Malformed);
        };
        let expires = exp.parse().map_err(|_| CredentialError::BadExpiry)?;
        id::validate("kid", kid)?;
        id::validate("tenant", tenant)?;
        id::validate("room", room)?;
        id::validate("peer", peer)?;
        Ok(Self {
            expires,
            kid: kid.to_owned(),
            tenant: tenant.to_owned(),
            room: room.to_owned(),
            peer: peer.to_owned(),
        })
    }
}

impl std::fmt::Display for TurnUsername {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}",
            self.expires, self.kid, self.tenant, self.room, self.peer
        )
    }
}

/// `base64(HMAC-SHA1(secret, username))`: the TURN password for `username`.
pub fn turn_password(secret: &[u8], username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The live TURN secrets by kid, and the one used to issue new credentials.
///
/// Several kids are live at once so that a secret can be rotated without
/// breaking credentials issued under the previous one. The active kid is
/// the first one given.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnSecrets {
    active: String,
    by_kid: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for TurnSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs: only kids are shown.
        f.debug_struct("TurnSecrets")
            .field("active", &self.active)
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_LEN: usize = 16;

impl TurnSecrets {
    /// Parses `kid=secret` entries, separated by commas or new lines; `#`
    /// starts a comment line. The first entry is the active one.
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        let mut active = None;
        let mut by_kid = BTreeMap::new();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
        {
            let (kid, secret) = entry
                .split_once('=')
                .ok_or_else(|| CredentialError::BadSecretEntry(redact(entry)))?;
            let (kid, secret) = (kid.trim(), secret.trim());
            id::validate("kid", kid)?;
            if secret.len() < MIN_SECRET_LEN {
                return Err(CredentialError::WeakSecret(kid.to_owned()));
            }
            if by_kid
                .insert(kid.to_owned(), secret.as_bytes().to_vec())
                .is_some()
            {
                return Err(CredentialError::DuplicateKid(kid.to_owned()));
            }
            active.get_or_insert_with(|| kid.to_owned());
        }
        let active = active.ok_or(CredentialError::NoSecret)?;
        Ok(Self { active, by_kid })
    }

    /// The kid new credentials are issued under.
    pub fn active_kid(&self) -> &str {
        &self.active
    }

    /// The secret for `kid`, if that kid is live.
    pub fn secret(&self, kid: &str) -> Option<&[u8]> {
        self.by_kid.get(kid).map(Vec::as_slice)
    }

    /// The active `kid=secret` entry, as [`TurnSecrets::parse`] reads it:
    /// what a service that only issues credentials needs.
    pub fn active_entry(&self) -> String {
        let secret = self.secret(&self.active).unwrap_or_default();
        format!("{}={}", self.active, String::from_utf8_lossy(secret))
    }

    /// Every live kid.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.by_kid.keys().map(String::as_str)
    }

    /// Issues a credential for (tenant, room, peer) valid until `expires`.
    pub fn issue(
        &self,
        expires: u64,
        tenant: &str,
        room: &str,
        peer: &str,
    ) -> (TurnUsername, String) {
        let username = TurnUsername {
            expires,
            kid: self.active.clone(),
            tenant: tenant.to_owned(),
            room: room.to_owned(),
            peer: peer.to_owned(),
        };
        let secret = self
            .secret(&self.active)
            .expect("the active kid is always in the map");
        let password = turn_password(secret, &username.to_string());
        (username, password)
    }
}

/// What ICE servers are made of: STUN and TURN URLs, and the secrets TURN
/// credentials are signed with. The one place that shapes what peers get,
/// whoever hands it out (signal for joining peers, the control plane for
/// `POST /v1/ice-servers`).
pub struct IceSource<'a> {
    pub stun_urls: &'a [String],
    pub turn_urls: &'a [String],
    pub secrets: Option<&'a TurnSecrets>,
}

impl IceSource<'_> {
    /// ICE servers for (tenant, room, peer): STUN, and unless `refused`
    /// (whose reason goes in `turn_refused`) TURN with credentials valid
    /// `ttl` seconds from `now`.
    pub fn servers(
        &self,
        tenant: &str,
        room: &str,
        peer: &str,
        ttl: u64,
        now: u64,
        refused: Option<&str>,
    ) -> IceServers {
        let mut ice_servers = Vec::with_capacity(2);
        if !self.stun_urls.is_empty() {
            ice_servers.push(IceServer {
                urls: self.stun_urls.to_vec(),
                username: None,
                credential: None,
            });
        }
        let (ttl, expires) = match (refused, self.secrets) {
            (None, Some(secrets)) => {
                let expires = now + ttl;
                let (username, password) = secrets.issue(expires, tenant, room, peer);
                ice_servers.push(IceServer {
                    urls: self.turn_urls.to_vec(),
                    username: Some(username.to_string()),
                    credential: Some(password),
                });
                (ttl, expires)
            }
            _ => (0, 0),
        };
        IceServers {
            ice_servers,
            ttl,
            expires,
            turn_refused: refused.map(str::to_owned),
        }
    }
}

/// Shows only the kid of a malformed entry, never what may be a secret.
fn redact(entry: &str) -> String {
    entry.chars().take(8).chain("…".chars()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_round_trips() {
        let u = TurnUsername::parse("1700000000:k1:acme:room-1:alice").expect("valid");
        assert_eq!(u.expires, 1_700_000_000);
        assert_eq!(u.tenant, "acme");
        assert_eq!(u.to_string(), "1700000000:k1:acme:room-1:alice");
    }

    #[test]
    fn username_refuses_wrong_shapes() {
        for bad in [
            "",
            "1700000000",
            "1700000000:k1:acme:room",
            "1700000000:k1:acme:room:peer:extra",
            "soon:k1:acme:room:peer",
            "1700000000:k1:acme::peer",
        ] {
            assert!(TurnUsername::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn password_matches_rfc2202_hmac_sha1_vector() {
        // RFC 2202 test case 2: key "Jefe", data "what do ya want for nothing?".
        // HMAC = effcdf6ae5eb2fa2d27416d5f184df9c259a7c79.
        assert_eq!(
            turn_password(b"Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }

    #[test]
    fn secrets_parse_rotate_and_issue() {
        let s = TurnSecrets::parse("k2=0123456789abcdefXX\n# old\nk1=fedcba9876543210YY")
            .expect("valid");
        assert_eq!(s.active_kid(), "k2");
        assert_eq!(s.kids().collect::<Vec<_>>(), ["k1", "k2"]);
        // The active entry alone issues the same credentials.
        let issuer = TurnSecrets::parse(&s.active_entry()).expect("entry parses");
        assert_eq!(issuer.issue(42, "t", "r", "p"), s.issue(42, "t", "r", "p"));
        assert_eq!(issuer.kids().count(), 1);
        let (user, pass) = s.issue(42, "t", "r", "p");
        assert_eq!(user.to_string(), "42:k2:t:r:p");
        assert_eq!(pass, turn_password(b"0123456789abcdefXX", "42:k2:t:r:p"));
        assert!(!format!("{s:?}").contains("0123456789"));
    }

    #[test]
    fn secrets_refuse_bad_lists() {
        assert_eq!(TurnSecrets::parse(""), Err(CredentialError::NoSecret));
        assert_eq!(
            TurnSecrets::parse("k1=short"),
            Err(CredentialError::WeakSecret("k1".into()))
        );
        assert!(matches!(
            TurnSecrets::parse("k1=0123456789abcdef,k1=0123456789abcdef"),
            Err(CredentialError::DuplicateKid(_))
        ));
        assert!(matches!(
            TurnSecrets::parse("no-equals-sign-here-secret"),
            Err(CredentialError::BadSecretEntry(_))
        ));
    }
}
