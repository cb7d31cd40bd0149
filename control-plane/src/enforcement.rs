//! What the TURN servers must enforce, derived from tenants and the ledger.
//!
//! Pure functions: given a tenant and its relayed bytes this month, decide
//! whether it may relay, which limits apply, and which usage alerts are due.

use floe_proto::api::Tenant;
use floe_proto::usage::{CutOff, CutOffReason, Enforcement, Revocation, TenantPolicy};

/// Why `tenant` (having relayed `month_bytes` this month) may not relay.
pub(crate) fn cut_off_reason(tenant: &Tenant, month_bytes: u64) -> Option<CutOffReason> {
    if tenant.disabled {
        Some(CutOffReason::TenantDisabled)
    } else if !tenant.plan.turn {
        Some(CutOffReason::TurnDisabled)
    } else if tenant
        .plan
        .monthly_relay_bytes
        .is_some_and(|quota| month_bytes >= quota)
    {
        Some(CutOffReason::OverQuota)
    } else {
        None
    }
}

/// The enforcement state for every tenant with its month's bytes.
pub(crate) fn enforcement(tenants: &[(Tenant, u64)], revocations: Vec<Revocation>) -> Enforcement {
    let mut out = Enforcement {
        revocations,
        ..Enforcement::default()
    };
    for (tenant, bytes) in tenants {
        if let Some(reason) = cut_off_reason(tenant, *bytes) {
            out.cut_off.push(CutOff {
                tenant: tenant.id.clone(),
                reason,
            });
        }
        let plan = &tenant.plan;
        if plan.max_bitrate_bps.is_some() || plan.max_allocations.is_some() {
            out.policies.push(TenantPolicy {
                tenant: tenant.id.clone(),
                max_bitrate_bps: plan.max_bitrate_bps,
                max_allocations: plan.max_allocations,
            });
        }
    }
    out
}

/// Usage alert levels (percent of quota) reached by `used` of `quota`.
pub(crate) fn alert_levels(used: u64, quota: Option<u64>) -> Vec<&'static str> {
    let Some(quota) = quota.filter(|q| *q > 0) else {
        return Vec::new();
    };
    let pct = u128::from(used) * 100 / u128::from(quota);
    [(80, "80"), (100, "100")]
        .into_iter()
        .filter(|(level, _)| pct >= *level)
        .map(|(_, name)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_proto::api::Plan;

    fn tenant(turn: bool, quota: Option<u64>, disabled: bool) -> Tenant {
        Tenant {
            id: "t".into(),
            name: "T".into(),
            plan: Plan {
                turn,
                monthly_relay_bytes: quota,
                max_allocations: Some(3),
                ..Plan::default()
            },
            disabled,
            webhook_url: None,
            webhook_secret: None,
            created_at: 0,
        }
    }

    #[test]
    fn reasons_in_priority_order() {
        assert_eq!(cut_off_reason(&tenant(true, Some(100), false), 99), None);
        assert_eq!(
            cut_off_reason(&tenant(true, Some(100), false), 100),
            Some(CutOffReason::OverQuota)
        );
        assert_eq!(cut_off_reason(&tenant(true, None, false), u64::MAX), None);
        assert_eq!(
            cut_off_reason(&tenant(false, Some(100), false), 0),
            Some(CutOffReason::TurnDisabled)
        );
        assert_eq!(
            cut_off_reason(&tenant(true, Some(100), true), 1_000),
            Some(CutOffReason::TenantDisabled)
        );
    }

    #[test]
    fn enforcement_lists_cut_offs_and_policies() {
        let e = enforcement(&[(tenant(true, Some(10), false), 10)], Vec::new());
        assert_eq!(e.cut_off.len(), 1);
        assert_eq!(e.policies[0].max_allocations, Some(3));
    }

    #[test]
    fn alert_levels_cross_at_80_and_100_percent() {
        assert!(alert_levels(79, Some(100)).is_empty());
        assert_eq!(alert_levels(80, Some(100)), ["80"]);
        assert_eq!(alert_levels(150, Some(100)), ["80", "100"]);
        assert!(alert_levels(150, None).is_empty());
        assert_eq!(alert_levels(u64::MAX, Some(u64::MAX)), ["80", "100"]);
    }
}
