//! The signaling protocol: REST bodies of the room API and the JSON
//! messages of the per-peer WebSocket. `docs/signaling.md` is the
//! reference for app developers; this module is the source of truth.
//!
//! Payloads (SDP, candidates, app data) are carried as raw JSON and never
//! parsed by the server: it routes them and sets `from`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::IceServers;

/// Body of `POST /v1/rooms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    /// Tenant of an anonymous (public) room; ignored with a join token,
    /// whose key names the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Lifetime in seconds (server default and cap apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Most peers at once (the plan's cap applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_peers: Option<u32>,
    /// Password peers must present to join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Refuse new peers once the first two have connected.
    #[serde(default)]
    pub one_time: bool,
}

/// A room as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomInfo {
    pub room_id: String,
    pub tenant: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub max_peers: u32,
    pub one_time: bool,
    /// Created with no join token (anyone with the id may join).
    pub public: bool,
    pub has_password: bool,
    /// Peers present now.
    pub peer_count: usize,
    /// Peer ids present now: shown only to the room's owner key, its
    /// creator's join token and its tenant's API keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<String>>,
}

/// Answer to `GET /v1/rooms` (a tenant's live rooms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomList {
    pub rooms: Vec<RoomInfo>,
}

/// Answer to `POST /v1/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedRoom {
    #[serde(flatten)]
    pub room: RoomInfo,
    /// Capability to delete the room (`Authorization: Bearer <owner_key>`
    /// on `DELETE /v1/rooms/{id}`); shown only here.
    pub owner_key: String,
}

/// A peer as other peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    /// Changes on every (re)connection; `signal` messages name it so that
    /// messages meant for an older session are dropped.
    pub session_id: String,
}

/// Messages a client sends.
#[derive(Debug)]
pub enum ClientMessage {
    /// Relay `payload` to peer `to`, whose current session must be `sid`
    /// when given.
    Signal {
        to: String,
        sid: Option<String>,
        payload: Box<RawValue>,
    },
    /// Relay a small `payload` to every other peer of the room.
    Broadcast { payload: Box<RawValue> },
    /// Leave the room and close.
    Leave,
    /// Bytes this peer moved since its last report, by path.
    Stats {
        direct_bytes: u64,
        relayed_bytes: u64,
    },
    /// Application-level keepalive; answered with `pong`.
    Ping,
}

/// Why a client message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message is not valid JSON of the expected shape: {0}")]
    Malformed(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("message type {kind:?} needs the field {field:?}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("message type {kind:?} does not take the field {field:?}")]
    UnexpectedField {
        kind: &'static str,
        field: &'static str,
    },
}

/// The wire shape of every client message: one flat object. (Raw payloads
/// cannot sit inside a serde-tagged enum, so the enum is built by hand.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    direct_bytes: Option<u64>,
    #[serde(default)]
    relayed_bytes: Option<u64>,
}

impl ClientMessage {
    /// Parses one client message.
    pub fn parse(text: &str) -> Result<Self, MessageError> {
        let m: Incoming =
            serde_json::from_str(text).map_err(|e| MessageError::Malformed(e.to_string()))?;
        let only = |kind: &'static str, allowed: &[&'static str]| -> Result<(), MessageError> {
            let present = [
                ("to", m.to.is_some()),
                ("sid", m.sid.is_some()),
                ("payload", m.payload.is_some()),
                ("direct_bytes", m.direct_bytes.is_some()),
                ("relayed_bytes", m.relayed_bytes.is_some()),
            ];
            match present
                .iter()
                .find(|(name, set)| *set && !allowed.contains(name))
            {
                Some((field, _)) => Err(MessageError::UnexpectedField { kind, field }),
                None => Ok(()),
            }
        };
        let need =
            |kind: &'static str, field: &'static str| MessageError::MissingField { kind, field };
        match m.kind.as_str() {
            "signal" => {
                only("signal", &["to", "sid", "payload"])?;
                Ok(Self::Signal {
                    to: m.to.ok_or_else(|| need("signal", "to"))?,
                    sid: m.sid,
                    payload: m.payload.ok_or_else(|| need("signal", "payload"))?,
                })
            }
            "broadcast" => {
                only("broadcast", &["payload"])?;
                Ok(Self::Broadcast {
                    payload: m.payload.ok_or_else(|| need("broadcast", "payload"))?,
                })
            }
            "leave" => only("leave", &[]).map(|()| Self::Leave),
            "stats" => {
                only("stats", &["direct_bytes", "relayed_bytes"])?;
                Ok(Self::Stats {
                    direct_bytes: m.direct_bytes.unwrap_or(0),
                    relayed_bytes: m.relayed_bytes.unwrap_or(0),
                })
            }
            "ping" => only("ping", &[]).map(|()| Self::Ping),
            _ => Err(MessageError::UnknownType(m.kind.chars().take(32).collect())),
        }
    }
}

/// Messages the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    Welcome {
        room_id: String,
        peer_id: String,
        session_id: String,
        peers: Vec<PeerInfo>,
        ice_servers: IceServers,
        /// Unix seconds when the room closes.
        room_expires_at: u64,
        /// Proof that a later connection is this client: present it as
        /// `reconnect_secret` to replace this connection (keep it beside
        /// the client id).
        reconnect_secret: String,
    },
    PeerJoined {
        peer_id: String,
        session_id: String,
    },
    PeerLeft {
        peer_id: String,
        session_id: String,
        reason: String,
    },
    Signal {
        from: String,
        from_sid: String,
        payload: Box<RawValue>,
    },
    Broadcast {
        from: String,
        payload: Box<RawValue>,
    },
    IceServers {
        ice_servers: IceServers,
    },
    Error {
        code: String,
        message: String,
    },
    RoomClosed {
        reason: String,
    },
    Pong,
}

impl ServerMessage {
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_and_keep_payload_raw() {
        let m = ClientMessage::parse(
            r#"{"type":"signal","to":"p2","sid":"s9","payload":{"type":"offer","sdp":"v=0\r\n"}}"#,
        )
        .expect("valid");
        match m {
            ClientMessage::Signal { to, sid, payload } => {
                assert_eq!((to.as_str(), sid.as_deref()), ("p2", Some("s9")));
                assert_eq!(payload.get(), r#"{"type":"offer","sdp":"v=0\r\n"}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"leave"}"#),
            Ok(ClientMessage::Leave)
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"stats","relayed_bytes":5}"#),
            Ok(ClientMessage::Stats {
                direct_bytes: 0,
                relayed_bytes: 5
            })
        ));
        assert_eq!(
            ClientMessage::parse(r#"{"type":"nope"}"#).err(),
            Some(MessageError::UnknownType("nope".into()))
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"signal","payload":1}"#).err(),
            Some(MessageError::MissingField {
                kind: "signal",
                field: "to"
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"leave","payload":1}"#).err(),
            Some(MessageError::UnexpectedField {
                kind: "leave",
                field: "payload"
            })
        );
        for bad in [
            r#"{"type":"signal","to":"p","payload":1,"from":"forged"}"#,
            r#"not json"#,
            r#"{"type":"signal","to":"p","payload":{"#,
            r#"[]"#,
        ] {
            assert!(
                matches!(ClientMessage::parse(bad), Err(MessageError::Malformed(_))),
                "{bad}"
            );
        }
    }

    proptest::proptest! {
        /// The parser faces the network: any text gives a message or an
        /// error, never a panic.
        #[test]
        fn parse_never_panics(text in ".{0,400}") {
            let _ = ClientMessage::parse(&text);
        }

        /// Arbitrary JSON objects with the known keys never panic either.
        #[test]
        fn parse_structured_never_panics(
            kind in proptest::sample::select(vec!["signal", "broadcast", "leave", "stats", "ping", "x"]),
            to in proptest::option::of("[a-z]{0,8}"),
            payload in proptest::option::of(proptest::prelude::any::<i64>()),
            bytes in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let mut v = serde_json::json!({"type": kind});
            if let Some(t) = to { v["to"] = t.into(); }
            if let Some(p) = payload { v["payload"] = p.into(); }
            if let Some(b) = bytes { v["direct_bytes"] = b.into(); }
            let _ = ClientMessage::parse(&v.to_string());
        }
    }

    #[test]
    fn server_messages_use_kebab_case_tags() {
        let m = ServerMessage::PeerJoined {
            peer_id: "p".into(),
            session_id: "s".into(),
        };
        assert_eq!(
            m.to_json(),
            r#"{"type":"peer-joined","peer_id":"p","session_id":"s"}"#
        );
        let payload = RawValue::from_string(r#"{"candidate":"a"}"#.into()).expect("raw");
        let s = ServerMessage::Signal {
            from: "a".into(),
            from_sid: "s1".into(),
            payload,
        };
        assert_eq!(
            s.to_json(),
            r#"{"type":"signal","from":"a","from_sid":"s1","payload":{"candidate":"a"}}"#
        );
    }
}
