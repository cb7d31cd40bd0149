//! Room rules as plain functions: who may join a room given who is in it,
//! when a one-time room seals, and how room passwords are stored and
//! checked. Both bus backends apply exactly these rules (the Redis one in
//! a Lua script that mirrors [`admit`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A room as the bus stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RoomRecord {
    pub id: String,
    pub tenant: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    pub max_peers: u32,
    pub one_time: bool,
    /// Salted password hash, when the room has a password.
    pub password: Option<Salted>,
    /// Salted hash of the owner key returned at creation.
    pub owner: Salted,
    /// Peer identity of the creator when a join token created it.
    pub creator: Option<String>,
}

/// A salted SHA-256 hash of a secret, both hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Salted {
    pub salt: String,
    pub hash: String,
}

impl Salted {
    /// Hashes `secret` under a fresh random salt.
    pub fn new(secret: &str) -> Self {
        let salt = floe_common::secret::random_token(16);
        let hash = Self::digest(&salt, secret);
        Self { salt, hash }
    }

    fn digest(salt: &str, secret: &str) -> String {
        use std::fmt::Write as _;
        let mut h = Sha256::new();
        h.update(salt.as_bytes());
        h.update([0u8]);
        h.update(secret.as_bytes());
        h.finalize()
            .iter()
            .fold(String::with_capacity(64), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }

    /// Whether `secret` matches, compared in constant time.
    pub fn verify(&self, secret: &str) -> bool {
        floe_common::http::secret_eq(&Self::digest(&self.salt, secret), &self.hash)
    }
}

/// A peer in a room, wherever it is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    pub peer_id: String,
    pub session_id: String,
    /// Node holding the peer's WebSocket.
    pub node: String,
}

/// How a join went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A new peer in the room.
    Joined,
    /// The peer was already present (a reconnect): its previous
    /// connection is replaced.
    Replaced { previous: Member },
}

/// Why a peer may not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Sealed,
    Expired,
}

/// The decision for `joining` entering `room` (with `members`) at `now`,
/// and whether the room seals (one-time rooms seal once two peers have
/// been in it together).
pub(crate) fn admit(
    room: &RoomRecord,
    members: &[Member],
    sealed: bool,
    joining: &Member,
    now: u64,
) -> Result<(Admission, bool), Refusal> {
    if now >= room.expires_at {
        return Err(Refusal::Expired);
    }
    if let Some(previous) = members.iter().find(|m| m.peer_id == joining.peer_id) {
        return Ok((
            Admission::Replaced {
                previous: previous.clone(),
            },
            sealed,
        ));
    }
    if sealed {
        return Err(Refusal::Sealed);
    }
    if members.len() >= room.max_peers as usize {
        return Err(Refusal::Full);
    }
    let seal = room.one_time && members.len() + 1 >= 2;
    Ok((Admission::Joined, seal))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn record(max_peers: u32, one_time: bool) -> RoomRecord {
        RoomRecord {
            id: "r".into(),
            tenant: "t".into(),
            created_at: 0,
            expires_at: 100,
            max_peers,
            one_time,
            password: None,
            owner: Salted::new("owner"),
            creator: None,
        }
    }

    pub fn member(peer: &str, session: &str) -> Member {
        Member {
            peer_id: peer.into(),
            session_id: session.into(),
            node: "n1".into(),
        }
    }

    #[test]
    fn capacity_and_replacement() {
        let room = record(2, false);
        let a = member("a", "s1");
        assert_eq!(
            admit(&room, &[], false, &a, 0),
            Ok((Admission::Joined, false))
        );
        let members = [a.clone(), member("b", "s2")];
        assert_eq!(
            admit(&room, &members, false, &member("c", "s3"), 0),
            Err(Refusal::Full)
        );
        // A reconnect of a present peer replaces it even when full.
        assert_eq!(
            admit(&room, &members, false, &member("a", "s9"), 0),
            Ok((Admission::Replaced { previous: a }, false))
        );
        assert_eq!(
            admit(&room, &[], false, &member("x", "s"), 100),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn one_time_rooms_seal_after_the_first_pair() {
        let room = record(10, true);
        let a = member("a", "s1");
        assert_eq!(
            admit(&room, &[], false, &a, 0),
            Ok((Admission::Joined, false))
        );
        let (adm, seal) = admit(
            &room,
            std::slice::from_ref(&a),
            false,
            &member("b", "s2"),
            0,
        )
        .expect("second peer joins");
        assert_eq!((adm, seal), (Admission::Joined, true));
        // Sealed: strangers are refused, even after someone left ...
        assert_eq!(
            admit(&room, &[], true, &member("c", "s3"), 0),
            Err(Refusal::Sealed)
        );
        // ... but the pair may reconnect.
        assert!(matches!(
            admit(&room, &[a], true, &member("a", "s4"), 0),
            Ok((Admission::Replaced { .. }, true))
        ));
    }

    #[test]
    fn salted_secrets_verify() {
        let s = Salted::new("correct horse");
        assert!(s.verify("correct horse"));
        assert!(!s.verify("correct horsf"));
        assert!(!s.verify(""));
        assert_ne!(Salted::new("x").salt, Salted::new("x").salt);
    }
}
