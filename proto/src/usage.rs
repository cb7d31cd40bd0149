//! Usage metering contract between TURN servers and the control plane.
//!
//! A TURN server sends deltas in batches keyed by `(server_id, seq)`; `seq`
//! grows by one per batch and survives restarts (the server persists it), so
//! the control plane can apply each batch exactly once. The ack carries the
//! enforcement state the TURN server must apply: tenants cut off and
//! revocations in force.

use serde::{Deserialize, Serialize};

/// Relayed traffic of one (tenant, room) during a batch interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub tenant: String,
    pub room: String,
    /// Bytes from the TURN client towards its peers.
    pub bytes_out: u64,
    /// Bytes from peers towards the TURN client.
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
}

impl UsageRecord {
    pub fn bytes(&self) -> u64 {
        self.bytes_out.saturating_add(self.bytes_in)
    }
}

/// Most records one usage batch may carry; TURN splits larger cuts.
pub const MAX_BATCH_RECORDS: usize = 10_000;

/// A batch of usage deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBatch {
    pub server_id: String,
    pub seq: u64,
    /// Unix seconds when the batch was cut; it picks the ledger day.
    pub at: u64,
    pub records: Vec<UsageRecord>,
}

/// Why a tenant may not relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutOffReason {
    OverQuota,
    TurnDisabled,
    TenantDisabled,
    UnknownTenant,
}

impl CutOffReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OverQuota => "over_quota",
            Self::TurnDisabled => "turn_disabled",
            Self::TenantDisabled => "tenant_disabled",
            Self::UnknownTenant => "unknown_tenant",
        }
    }
}

/// A tenant that must get no relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutOff {
    pub tenant: String,
    pub reason: CutOffReason,
}

/// A revocation of TURN access before credential expiry. `room` and `peer`
/// narrow the scope; absent means the whole tenant (or room).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Revocation {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Unix seconds after which the revocation no longer matters (every
    /// credential issued before it has expired by then).
    pub until: u64,
}

impl Revocation {
    /// Whether this revocation covers (tenant, room, peer).
    pub fn covers(&self, tenant: &str, room: &str, peer: &str) -> bool {
        self.tenant == tenant
            && self.room.as_deref().is_none_or(|r| r == room)
            && self.peer.as_deref().is_none_or(|p| p == peer)
    }
}

/// Per-tenant relay policy a TURN server enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantPolicy {
    pub tenant: String,
    pub max_bitrate_bps: Option<u64>,
    pub max_allocations: Option<u32>,
}

/// Enforcement state: the answer to a batch, and to a policy poll.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Enforcement {
    pub cut_off: Vec<CutOff>,
    pub revocations: Vec<Revocation>,
    pub policies: Vec<TenantPolicy>,
}

/// Answer to a usage batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAck {
    pub server_id: String,
    pub seq: u64,
    /// False when the batch had been applied before (a duplicate).
    pub applied: bool,
    #[serde(flatten)]
    pub enforcement: Enforcement,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_scopes() {
        let tenant = Revocation {
            tenant: "t".into(),
            room: None,
            peer: None,
            until: 0,
        };
        assert!(tenant.covers("t", "any", "one"));
        assert!(!tenant.covers("u", "any", "one"));
        let peer = Revocation {
            room: Some("r".into()),
            peer: Some("p".into()),
            ..tenant
        };
        assert!(peer.covers("t", "r", "p"));
        assert!(!peer.covers("t", "r", "q"));
        assert!(!peer.covers("t", "s", "p"));
    }

    #[test]
    fn ack_serializes_flat() {
        let ack = UsageAck {
            server_id: "s".into(),
            seq: 3,
            applied: true,
            enforcement: Enforcement {
                cut_off: vec![CutOff {
                    tenant: "t".into(),
                    reason: CutOffReason::OverQuota,
                }],
                ..Enforcement::default()
            },
        };
        let v = serde_json::to_value(&ack).expect("serialize");
        assert_eq!(v["cut_off"][0]["reason"], "over_quota");
        let back: UsageAck = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, ack);
    }
}
