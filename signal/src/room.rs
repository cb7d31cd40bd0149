//! Room rules as plain functions: who may join a room given who is in it
//! and who it was sealed for, how a reconnect proves it is the same client,
//! and how room passwords and reconnect secrets are stored and checked.
//! Both bus backends decide joins with [`admit`]; the Redis one reads the
//! room's state, decides here, and commits only if nothing changed since.

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
    /// Created with no join token: counted against the plan's public-room
    /// limit, and the only kind of room peers may join with no token.
    #[serde(default)]
    pub public: bool,
    /// The id was chosen by the tenant (a join token's `room` claim): it
    /// exists only inside the tenant's namespace. Server-chosen ids are
    /// random, global, and found without knowing the tenant.
    #[serde(default)]
    pub named: bool,
    /// Salted password hash, when the room has a password.
    pub password: Option<Salted>,
    /// Salted hash of the owner key returned at creation.
    pub owner: Salted,
    /// Peer identity of the creator when a join token created it.
    pub creator: Option<String>,
}

impl RoomRecord {
    /// The room's key on the bus and in the hub: unique per tenant, so two
    /// tenants may use the same room name.
    pub fn key(&self) -> String {
        room_key(&self.tenant, &self.id)
    }
}

/// The bus key of room `id` of `tenant` (ids never contain `/`).
pub(crate) fn room_key(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

/// A salted SHA-256 hash of a secret, both hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Salted {
    pub salt: String,
    pub hash: String,
}

fn hex_sha256(parts: &[&[u8]]) -> String {
    use std::fmt::Write as _;
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl Salted {
    /// Hashes `secret` under a fresh random salt.
    pub fn new(secret: &str) -> Self {
        let salt = floe_common::secret::random_token(16);
        let hash = Self::digest(&salt, secret);
        Self { salt, hash }
    }

    fn digest(salt: &str, secret: &str) -> String {
        hex_sha256(&[salt.as_bytes(), &[0u8], secret.as_bytes()])
    }

    /// Whether `secret` matches, compared in constant time.
    pub fn verify(&self, secret: &str) -> bool {
        floe_common::http::secret_eq(&Self::digest(&self.salt, secret), &self.hash)
    }
}

/// Shortest and longest reconnect secret a client may present.
pub(crate) const SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=128;

/// The stored form of a reconnect secret. The secret is random and long
/// (at least [`SECRET_LEN`] characters), so an unsalted hash is enough:
/// it only keeps the secret itself out of Redis.
pub(crate) fn secret_hash(secret: &str) -> String {
    hex_sha256(&[b"floe-reconnect\0", secret.as_bytes()])
}

/// A peer in a room, wherever it is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    pub peer_id: String,
    pub session_id: String,
    /// Node holding the peer's WebSocket.
    pub node: String,
    /// [`secret_hash`] of the peer's reconnect secret: a connection that
    /// replaces this one must present the secret (or a join token).
    #[serde(default)]
    pub secret: String,
}

/// One of the two clients a one-time room was sealed for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PairMember {
    pub peer_id: String,
    /// [`secret_hash`] of its reconnect secret.
    pub secret: String,
}

/// What a join is decided on: the members present now and, for one-time
/// rooms, the distinct clients that have been admitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoomState {
    pub members: Vec<Member>,
    pub pair: Vec<PairMember>,
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

/// A join's outcome and what the room's state becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub admission: Admission,
    /// The one-time pair after this join, when it changed.
    pub pair: Option<Vec<PairMember>>,
}

/// Why a peer may not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Sealed,
    Expired,
    /// The peer id is connected, and the joiner proved neither with a join
    /// token nor with that peer's reconnect secret that it is that client.
    PeerIdTaken,
}

/// The decision for `joining` entering `room` (in `state`) at `now`.
///
/// `by_token`: the joiner's peer id comes from a verified join token, which
/// is proof enough of identity. Otherwise replacing a present peer, or
/// re-entering a sealed one-time room, needs `joining.secret` to equal the
/// stored hash of that peer's reconnect secret.
pub(crate) fn admit(
    room: &RoomRecord,
    state: &RoomState,
    joining: &Member,
    by_token: bool,
    now: u64,
) -> Result<Decision, Refusal> {
    if now >= room.expires_at {
        return Err(Refusal::Expired);
    }
    let proves = |stored: &str| by_token || floe_common::http::secret_eq(&joining.secret, stored);
    if let Some(previous) = state.members.iter().find(|m| m.peer_id == joining.peer_id) {
        if !proves(&previous.secret) {
            return Err(Refusal::PeerIdTaken);
        }
        return Ok(Decision {
            admission: Admission::Replaced {
                previous: previous.clone(),
            },
            pair: None,
        });
    }
    let mut pair = None;
    if room.one_time {
        match state.pair.iter().find(|p| p.peer_id == joining.peer_id) {
            Some(p) if !proves(&p.secret) => return Err(Refusal::Sealed),
            Some(_) => {}
            None if state.pair.len() >= 2 => return Err(Refusal::Sealed),
            None => {
                let mut next = state.pair.clone();
                next.push(PairMember {
                    peer_id: joining.peer_id.clone(),
                    secret: joining.secret.clone(),
                });
                pair = Some(next);
            }
        }
    }
    if state.members.len() >= room.max_peers as usize {
        return Err(Refusal::Full);
    }
    Ok(Decision {
        admission: Admission::Joined,
        pair,
    })
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
            public: true,
            named: false,
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
            secret: secret_hash(&format!("secret of {peer}")),
        }
    }

    fn state(members: &[Member]) -> RoomState {
        RoomState {
            members: members.to_vec(),
            pair: Vec::new(),
        }
    }

    fn joined(pair: Option<Vec<PairMember>>) -> Result<Decision, Refusal> {
        Ok(Decision {
            admission: Admission::Joined,
            pair,
        })
    }

    #[test]
    fn capacity_and_replacement() {
        let room = record(2, false);
        let a = member("a", "s1");
        assert_eq!(admit(&room, &state(&[]), &a, false, 0), joined(None));
        let members = [a.clone(), member("b", "s2")];
        assert_eq!(
            admit(&room, &state(&members), &member("c", "s3"), false, 0),
            Err(Refusal::Full)
        );
        // A reconnect of a present peer with its secret replaces it, even
        // when the room is full.
        assert_eq!(
            admit(&room, &state(&members), &member("a", "s9"), false, 0),
            Ok(Decision {
                admission: Admission::Replaced { previous: a },
                pair: None
            })
        );
        assert_eq!(
            admit(&room, &state(&[]), &member("x", "s"), false, 100),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn replacing_a_peer_needs_its_secret_or_a_token() {
        let room = record(4, false);
        let victim = member("a", "s1");
        let mut attacker = member("a", "s2");
        attacker.secret = secret_hash("a guess of sixteen+");
        assert_eq!(
            admit(
                &room,
                &state(std::slice::from_ref(&victim)),
                &attacker,
                false,
                0
            ),
            Err(Refusal::PeerIdTaken)
        );
        // A join token for that peer id is proof enough.
        assert!(matches!(
            admit(&room, &state(&[victim]), &attacker, true, 0),
            Ok(Decision {
                admission: Admission::Replaced { .. },
                ..
            })
        ));
    }

    #[test]
    fn one_time_rooms_admit_only_their_first_two_clients() {
        let room = record(10, true);
        let (a, b, c) = (member("a", "s1"), member("b", "s2"), member("c", "s3"));
        let pair_of = |ms: &[&Member]| {
            ms.iter()
                .map(|m| PairMember {
                    peer_id: m.peer_id.clone(),
                    secret: m.secret.clone(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            admit(&room, &state(&[]), &a, false, 0),
            joined(Some(pair_of(&[&a])))
        );
        // A left before B came: B still makes the pair, nobody else can.
        let after_a = RoomState {
            members: vec![],
            pair: pair_of(&[&a]),
        };
        assert_eq!(
            admit(&room, &after_a, &b, false, 0),
            joined(Some(pair_of(&[&a, &b])))
        );
        let sealed = RoomState {
            members: vec![],
            pair: pair_of(&[&a, &b]),
        };
        assert_eq!(admit(&room, &sealed, &c, false, 0), Err(Refusal::Sealed));
        // The pair may come back, with its secret ...
        assert_eq!(admit(&room, &sealed, &a, false, 0), joined(None));
        // ... but not someone who only knows its peer id.
        let mut impostor = member("a", "s9");
        impostor.secret = secret_hash("not the secret of a");
        assert_eq!(
            admit(&room, &sealed, &impostor, false, 0),
            Err(Refusal::Sealed)
        );
    }

    #[test]
    fn salted_secrets_verify() {
        let s = Salted::new("correct horse");
        assert!(s.verify("correct horse"));
        assert!(!s.verify("correct horsf"));
        assert!(!s.verify(""));
        assert_ne!(Salted::new("x").salt, Salted::new("x").salt);
        assert_eq!(secret_hash("x"), secret_hash("x"));
        assert_ne!(secret_hash("x"), secret_hash("y"));
    }
}
