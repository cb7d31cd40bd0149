//! Relay policy: which peer addresses may be relayed to, and what the
//! control plane says about tenants (cut off, revoked scopes, limits).
//! Plain data and functions; the server consults them per request.

use std::collections::HashMap;
use std::net::IpAddr;

use floe_proto::credential::TurnUsername;
use floe_proto::usage::{CutOffReason, Enforcement, Revocation, TenantPolicy};
use ipnet::IpNet;

/// Whether relaying to `ip` is refused: loopback, private (RFC 1918, RFC
/// 4193), carrier-grade NAT, link-local, multicast, unspecified and
/// broadcast addresses are, unless an operator range in `allow` covers it.
pub(crate) fn peer_denied(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if allow.iter().any(|net| net.contains(&ip)) {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xFE00) == 0xFC00
                || (seg[0] & 0xFFC0) == 0xFE80
        }
    }
}

/// Why the control plane refuses a credential's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    CutOff(CutOffReason),
    Revoked,
}

/// The enforcement state last received from the control plane.
#[derive(Debug, Default)]
pub(crate) struct Policy {
    cut_off: HashMap<String, CutOffReason>,
    revocations: Vec<Revocation>,
    limits: HashMap<String, TenantPolicy>,
}

impl Policy {
    pub fn from_enforcement(e: Enforcement) -> Self {
        Self {
            cut_off: e
                .cut_off
                .into_iter()
                .map(|c| (c.tenant, c.reason))
                .collect(),
            revocations: e.revocations,
            limits: e
                .policies
                .into_iter()
                .map(|p| (p.tenant.clone(), p))
                .collect(),
        }
    }

    /// Whether `user` may relay now.
    pub fn check(&self, user: &TurnUsername) -> Result<(), Refused> {
        if let Some(reason) = self.cut_off.get(&user.tenant) {
            return Err(Refused::CutOff(*reason));
        }
        if self
            .revocations
            .iter()
            .any(|r| r.covers(&user.tenant, &user.room, &user.peer))
        {
            return Err(Refused::Revoked);
        }
        Ok(())
    }

    /// The tenant's allocation cap and bit-rate cap.
    pub fn limits(&self, tenant: &str) -> (Option<u32>, Option<u64>) {
        self.limits
            .get(tenant)
            .map_or((None, None), |p| (p.max_allocations, p.max_bitrate_bps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_proto::usage::CutOff;

    #[test]
    fn private_and_special_peers_are_denied_unless_allowed() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "100.64.0.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(peer_denied(ip(denied), &[]), "{denied} allowed");
        }
        for ok in ["8.8.8.8", "203.0.113.5", "2001:db8::1", "::ffff:8.8.8.8"] {
            assert!(!peer_denied(ip(ok), &[]), "{ok} denied");
        }
        let lo: IpNet = "127.0.0.0/8".parse().expect("net");
        assert!(!peer_denied(ip("127.0.0.1"), &[lo]));
        assert!(peer_denied(ip("10.0.0.1"), &[lo]));
    }

    #[test]
    fn enforcement_refuses_cut_off_and_revoked_scopes() {
        let user = |tenant: &str, room: &str, peer: &str| TurnUsername {
            expires: 0,
            kid: "k".into(),
            tenant: tenant.into(),
            room: room.into(),
            peer: peer.into(),
        };
        let p = Policy::from_enforcement(Enforcement {
            cut_off: vec![CutOff {
                tenant: "broke".into(),
                reason: CutOffReason::OverQuota,
            }],
            revocations: vec![Revocation {
                tenant: "t".into(),
                room: Some("r".into()),
                peer: None,
                until: 0,
            }],
            policies: vec![TenantPolicy {
                tenant: "t".into(),
                max_bitrate_bps: Some(64_000),
                max_allocations: Some(2),
            }],
        });
        assert_eq!(
            p.check(&user("broke", "r", "p")),
            Err(Refused::CutOff(CutOffReason::OverQuota))
        );
        assert_eq!(p.check(&user("t", "r", "p")), Err(Refused::Revoked));
        assert_eq!(p.check(&user("t", "other", "p")), Ok(()));
        assert_eq!(p.limits("t"), (Some(2), Some(64_000)));
        assert_eq!(p.limits("u"), (None, None));
    }
}
