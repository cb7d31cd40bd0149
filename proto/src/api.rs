//! REST bodies of the control-plane API, shared by its clients (signal,
//! TURN, the operator CLI, the load tester).

use serde::{Deserialize, Serialize};

use crate::token::Grants;

/// What a tenant's plan allows. `None` limits mean "unlimited".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plan {
    /// Whether the tenant may use the TURN relay at all.
    pub turn: bool,
    /// Relayed bytes (both directions) allowed per calendar month (UTC).
    pub monthly_relay_bytes: Option<u64>,
    /// Bit rate cap per TURN allocation, bits per second.
    pub max_bitrate_bps: Option<u64>,
    /// Concurrent TURN allocations across the tenant.
    pub max_allocations: Option<u32>,
    /// Concurrent rooms created with a join token.
    pub max_rooms: Option<u32>,
    /// Concurrent public rooms (created with no token); counted apart from
    /// `max_rooms`, so anonymous browsers cannot use up the rooms the
    /// tenant's own back end needs.
    pub max_public_rooms: Option<u32>,
    /// Peers in one room.
    pub max_peers_per_room: Option<u32>,
    /// Whether browsers may create and join rooms with no join token.
    pub public_rooms: bool,
    /// Longest lifetime of the TURN credentials the tenant may ask for
    /// (`POST /v1/ice-servers`), seconds; none: the control plane's
    /// `--credential-ttl-secs`.
    pub max_credential_ttl_secs: Option<u64>,
}

/// A tenant as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub plan: Plan,
    pub disabled: bool,
    /// Where usage alerts are POSTed, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Key of the `X-Floe-Signature` HMAC-SHA256 on webhook bodies; set
    /// with the webhook URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
}

/// Body of `POST /v1/tenants`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Chosen id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub plan: Plan,
    #[serde(default)]
    pub webhook_url: Option<String>,
}

/// Body of `PATCH /v1/tenants/{id}`: only the fields present change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// `Some("")` removes the webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// An API key as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub created_at: u64,
    pub revoked: bool,
}

/// Answer to key creation: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedApiKey {
    pub id: String,
    pub tenant: String,
    pub secret: String,
}

/// Internal: what signal needs to verify join tokens signed with a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVerification {
    pub key_id: String,
    pub tenant: String,
    pub secret: String,
    pub plan: Plan,
    pub tenant_disabled: bool,
}

/// Body of `POST /v1/tokens`: mint a join token with an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintToken {
    /// Peer identity (`sub`).
    pub peer: String,
    #[serde(default)]
    pub room: Option<String>,
    #[serde(default)]
    pub grants: Grants,
    /// Lifetime in seconds; the server caps it.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A minted join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintedToken {
    pub token: String,
    pub expires: u64,
}

/// One entry of `RTCConfiguration.iceServers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// ICE servers for one (tenant, room, peer), shaped so that
/// `new RTCPeerConnection(body)` accepts it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServers {
    pub ice_servers: Vec<IceServer>,
    /// Seconds the TURN credentials stay valid.
    pub ttl: u64,
    /// Unix time the TURN credentials expire (0 when STUN only).
    pub expires: u64,
    /// Why TURN was left out, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_refused: Option<String>,
}

/// What a signal node needs to hand out ICE servers itself (internal
/// `GET /internal/v1/ice-policy`, polled): the URLs, the credential
/// lifetime, the TURN secret new credentials are signed with, and who may
/// not relay now. Minting locally spares every join a round trip to the
/// control plane; the node polls this as often as the change feed, so a
/// cut-off or a revocation reaches it within a poll interval.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IcePolicy {
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    pub credential_ttl_secs: u64,
    /// `kid=secret` of the active TURN secret; absent without TURN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_secret: Option<String>,
    pub cut_off: Vec<crate::usage::CutOff>,
    pub revocations: Vec<crate::usage::Revocation>,
}

impl std::fmt::Debug for IcePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches logs.
        f.debug_struct("IcePolicy")
            .field("stun_urls", &self.stun_urls)
            .field("turn_urls", &self.turn_urls)
            .field("credential_ttl_secs", &self.credential_ttl_secs)
            .field("turn_secret", &self.turn_secret.as_ref().map(|_| "…"))
            .field("cut_off", &self.cut_off.len())
            .field("revocations", &self.revocations.len())
            .finish()
    }
}

/// Body of the public `POST /v1/ice-servers` (API key): TURN credentials
/// for a tenant's own signaling. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnCredentialsRequest {
    /// Label the relayed bytes are metered under (default `default`).
    pub room: Option<String>,
    /// Label of the peer, for revocations (default: a random one).
    pub peer: Option<String>,
    /// Credential lifetime, seconds, capped by the plan.
    pub ttl_secs: Option<u64>,
}

/// One entry of the control plane's change feed: something that may take
/// access away happened to a tenant (updated, disabled, deleted) or to one
/// of its API keys (revoked). Services that cache tenants and keys drop
/// those entries and check again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub tenant: String,
    /// The API key, for a key change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Answer of the internal `GET /internal/v1/changes?after=N`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Changes {
    /// The newest sequence number; ask with `after` set to it next time.
    pub seq: u64,
    /// Changes after `after` were pruned (or the feed restarted): drop
    /// every cached tenant and key.
    pub reset: bool,
    /// Changes after `after`, oldest first.
    pub changes: Vec<Change>,
}
