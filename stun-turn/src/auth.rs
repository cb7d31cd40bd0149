//! Long-term credential checks (RFC 8489 §9.2) with floe's TURN REST
//! usernames, and stateless nonces that expire (438 Stale Nonce).
//!
//! A nonce is `<expiry hex>-<MAC>`, the MAC binding expiry and client IP
//! under a per-process key, so the server keeps no nonce table.

use std::net::IpAddr;

use floe_proto::credential::{TurnSecrets, TurnUsername, turn_password};
use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::integrity::MessageIntegrity;
use stun::message::Message;

/// Why a request failed authentication, with the STUN error it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// No MESSAGE-INTEGRITY: the first leg of the handshake (401, not a failure).
    Challenge,
    /// Attributes missing or malformed (400).
    BadRequest,
    /// Nonce expired or not ours (438).
    StaleNonce,
    /// Unknown username format, kid, or wrong password (401).
    Unauthorized(&'static str),
    /// Credential past its expiry (401).
    Expired,
}

impl AuthError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Challenge => "challenge",
            Self::BadRequest => "bad_request",
            Self::StaleNonce => "stale_nonce",
            Self::Unauthorized(r) => r,
            Self::Expired => "expired",
        }
    }
}

/// Nonce minting and credential checks.
pub(crate) struct Authenticator {
    nonce_key: Vec<u8>,
    nonce_secs: u64,
    realm: String,
}

/// A request that passed authentication.
pub(crate) struct Authenticated {
    pub user: TurnUsername,
    /// The MESSAGE-INTEGRITY key for the response.
    pub integrity: MessageIntegrity,
}

impl Authenticator {
    pub fn new(realm: &str, nonce_secs: u64) -> Self {
        Self {
            nonce_key: floe_common::secret::random_token(16).into_bytes(),
            nonce_secs,
            realm: realm.to_owned(),
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    fn mac(&self, expiry: u64, ip: IpAddr) -> String {
        let full = turn_password(&self.nonce_key, &format!("{expiry:x}|{ip}"));
        full.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect()
    }

    /// A fresh nonce for a client at `ip`.
    pub fn nonce(&self, ip: IpAddr, now: u64) -> String {
        let expiry = now + self.nonce_secs;
        format!("{expiry:x}-{}", self.mac(expiry, ip))
    }

    fn nonce_valid(&self, nonce: &str, ip: IpAddr, now: u64) -> bool {
        let Some((exp, mac)) = nonce.split_once('-') else {
            return false;
        };
        let Ok(expiry) = u64::from_str_radix(exp, 16) else {
            return false;
        };
        expiry >= now && floe_common::http::secret_eq(mac, &self.mac(expiry, ip))
    }

    /// Checks a request's long-term credentials.
    pub fn check(
        &self,
        msg: &mut Message,
        ip: IpAddr,
        secrets: &TurnSecrets,
        now: u64,
    ) -> Result<Authenticated, AuthError> {
        if !msg.contains(ATTR_MESSAGE_INTEGRITY) {
            return Err(AuthError::Challenge);
        }
        let text = |m: &Message, t| {
            m.get(t)
                .ok()
                .and_then(|v| String::from_utf8(v).ok())
                .ok_or(AuthError::BadRequest)
        };
        let username = text(msg, ATTR_USERNAME)?;
        let realm = text(msg, ATTR_REALM)?;
        let nonce = text(msg, ATTR_NONCE)?;
        if msg.get(ATTR_MESSAGE_INTEGRITY).map(|v| v.len()) != Ok(20) {
            return Err(AuthError::BadRequest);
        }
        if realm != self.realm || !self.nonce_valid(&nonce, ip, now) {
            return Err(AuthError::StaleNonce);
        }
        let user =
            TurnUsername::parse(&username).map_err(|_| AuthError::Unauthorized("bad_username"))?;
        let secret = secrets
            .secret(&user.kid)
            .ok_or(AuthError::Unauthorized("unknown_kid"))?;
        let password = turn_password(secret, &username);
        let integrity = MessageIntegrity::new_long_term_integrity(username, realm, password);
        if integrity.check(msg).is_err() {
            return Err(AuthError::Unauthorized("bad_password"));
        }
        // Checked after the MAC so an attacker learns nothing from it.
        if user.expires < now {
            return Err(AuthError::Expired);
        }
        Ok(Authenticated { user, integrity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::Setter;
    use stun::textattrs::TextAttribute;

    fn request(username: &str, realm: &str, nonce: &str, password: &str) -> Message {
        let mut m = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(stun::message::MessageType::new(
                stun::message::METHOD_ALLOCATE,
                stun::message::CLASS_REQUEST,
            )),
            Box::new(stun::agent::TransactionId::new()),
            Box::new(TextAttribute::new(ATTR_USERNAME, username.into())),
            Box::new(TextAttribute::new(ATTR_REALM, realm.into())),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce.into())),
            Box::new(MessageIntegrity::new_long_term_integrity(
                username.into(),
                realm.into(),
                password.into(),
            )),
        ];
        m.build(&setters).expect("build");
        let mut decoded = Message::new();
        decoded.raw = m.raw;
        decoded.decode().expect("decode");
        decoded
    }

    #[test]
    fn accepts_good_credentials_and_names_every_failure() {
        let secrets = TurnSecrets::parse("k1=0123456789abcdef0").expect("secrets");
        let auth = Authenticator::new("floe", 600);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let now = 1_000_000;
        let nonce = auth.nonce(ip, now);
        let user = format!("{}:k1:t:r:p", now + 60);
        let pass = turn_password(b"0123456789abcdef0", &user);

        let ok = auth.check(
            &mut request(&user, "floe", &nonce, &pass),
            ip,
            &secrets,
            now,
        );
        assert_eq!(ok.map(|a| a.user.tenant).ok().as_deref(), Some("t"));

        let check = |m: &mut Message, ip, now| auth.check(m, ip, &secrets, now).err();
        assert_eq!(
            check(&mut request(&user, "floe", &nonce, "wrong"), ip, now),
            Some(AuthError::Unauthorized("bad_password"))
        );
        // Stale: past its expiry, another client's, or another realm.
        assert_eq!(
            check(&mut request(&user, "floe", &nonce, &pass), ip, now + 601),
            Some(AuthError::StaleNonce)
        );
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        assert_eq!(
            check(&mut request(&user, "floe", &nonce, &pass), other, now),
            Some(AuthError::StaleNonce)
        );
        assert_eq!(
            check(&mut request(&user, "evil", &nonce, &pass), ip, now),
            Some(AuthError::StaleNonce)
        );
        // Expired credential (correct password).
        let old = format!("{}:k1:t:r:p", now - 1);
        let old_pass = turn_password(b"0123456789abcdef0", &old);
        assert_eq!(
            check(&mut request(&old, "floe", &nonce, &old_pass), ip, now),
            Some(AuthError::Expired)
        );
        // Unknown kid, coturn-style username.
        let unknown = format!("{}:k9:t:r:p", now + 60);
        assert_eq!(
            check(&mut request(&unknown, "floe", &nonce, "x"), ip, now),
            Some(AuthError::Unauthorized("unknown_kid"))
        );
        assert_eq!(
            check(
                &mut request(&format!("{}:user", now + 60), "floe", &nonce, "x"),
                ip,
                now
            ),
            Some(AuthError::Unauthorized("bad_username"))
        );
    }
}
