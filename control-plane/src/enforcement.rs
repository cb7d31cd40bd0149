//! What the TURN servers must enforce, derived from tenants and the ledger.
//!
//! Pure functions: given a tenant and its relayed bytes this month, decide
//! whether it may relay, which limits apply, and which usage alerts are due.
//! [`Snapshot`] keeps that state for every tenant in memory, so a usage ack
//! or a credential request reads it instead of the whole store; the API
//! updates it as batches land and tenants change, and rebuilds it on a tick.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use floe_proto::api::Tenant;
use floe_proto::usage::{CutOff, CutOffReason, Enforcement, Revocation, TenantPolicy};

/// Every tenant with its relayed bytes in `month`, the revocations in
/// force, and the [`Enforcement`] they add up to.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub month: String,
    tenants: BTreeMap<String, (Tenant, u64)>,
    revocations: Vec<Revocation>,
    enforcement: Arc<Enforcement>,
}

impl Snapshot {
    pub fn new(
        month: String,
        tenants: impl IntoIterator<Item = (Tenant, u64)>,
        revocations: Vec<Revocation>,
    ) -> Self {
        let mut s = Self {
            month,
            tenants: tenants
                .into_iter()
                .map(|(t, b)| (t.id.clone(), (t, b)))
                .collect(),
            revocations,
            enforcement: Arc::default(),
        };
        s.recompute();
        s
    }

    fn recompute(&mut self) {
        self.enforcement = Arc::new(enforcement(self.tenants.values(), self.revocations.clone()));
    }

    /// The enforcement every TURN server gets with its next ack.
    pub fn enforcement(&self) -> Arc<Enforcement> {
        self.enforcement.clone()
    }

    /// Tenants cut off for being over quota.
    pub fn over_quota(&self) -> usize {
        self.enforcement
            .cut_off
            .iter()
            .filter(|c| c.reason == CutOffReason::OverQuota)
            .count()
    }

    /// Sets the month's bytes of tenants the ledger just counted.
    pub fn set_bytes(&mut self, bytes: impl IntoIterator<Item = (String, u64)>) {
        for (id, b) in bytes {
            if let Some(entry) = self.tenants.get_mut(&id) {
                entry.1 = entry.1.max(b);
            }
        }
        self.recompute();
    }

    /// Replaces (or, with `None`, removes) one tenant.
    pub fn set_tenant(&mut self, id: &str, tenant: Option<(Tenant, u64)>) {
        match tenant {
            Some(t) => self.tenants.insert(id.to_owned(), t),
            None => self.tenants.remove(id),
        };
        self.recompute();
    }

    /// Replaces the revocations in force.
    pub fn set_revocations(&mut self, revocations: Vec<Revocation>) {
        self.revocations = revocations;
        self.recompute();
    }

    /// Why (tenant, room, peer) may not have TURN credentials now, if it may not.
    pub fn refusal(&self, tenant: &str, room: &str, peer: &str) -> Option<&'static str> {
        match self.tenants.get(tenant) {
            None => Some(CutOffReason::UnknownTenant.as_str()),
            Some((t, bytes)) => match cut_off_reason(t, *bytes) {
                Some(reason) => Some(reason.as_str()),
                None => self
                    .revocations
                    .iter()
                    .any(|r| r.covers(tenant, room, peer))
                    .then_some("revoked"),
            },
        }
    }

    /// This snapshot, rebuilt from the store as `fresh` while `self` took
    /// edits: tenants in `touched` (and the revocations, if
    /// `revocations_touched`) keep the edited values, and within one month
    /// bytes never go down (the ledger only grows).
    pub fn merge_rebuild(
        &self,
        mut fresh: Snapshot,
        touched: &HashSet<String>,
        revocations_touched: bool,
    ) -> Snapshot {
        for id in touched {
            match self.tenants.get(id) {
                Some(t) => fresh.tenants.insert(id.clone(), t.clone()),
                None => fresh.tenants.remove(id),
            };
        }
        if fresh.month == self.month {
            for (id, entry) in &mut fresh.tenants {
                if let Some((_, old)) = self.tenants.get(id) {
                    entry.1 = entry.1.max(*old);
                }
            }
        }
        if revocations_touched {
            fresh.revocations = self.revocations.clone();
        }
        fresh.recompute();
        fresh
    }
}

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
pub(crate) fn enforcement<'a>(
    tenants: impl IntoIterator<Item = &'a (Tenant, u64)>,
    revocations: Vec<Revocation>,
) -> Enforcement {
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

    fn named(id: &str, quota: Option<u64>) -> Tenant {
        Tenant {
            id: id.into(),
            ..tenant(true, quota, false)
        }
    }

    #[test]
    fn snapshot_follows_bytes_tenants_and_revocations() {
        let mut s = Snapshot::new(
            "2026-12".into(),
            [(named("a", Some(100)), 50), (named("b", None), 0)],
            Vec::new(),
        );
        assert!(s.enforcement().cut_off.is_empty());
        assert_eq!(s.refusal("a", "r", "p"), None);
        assert_eq!(s.refusal("zz", "r", "p"), Some("unknown_tenant"));
        s.set_bytes([("a".to_owned(), 100), ("nobody".to_owned(), 5)]);
        assert_eq!(s.enforcement().cut_off[0].tenant, "a");
        assert_eq!(s.refusal("a", "r", "p"), Some("over_quota"));
        // Bytes of a month only grow: a late, smaller read does not undo it.
        s.set_bytes([("a".to_owned(), 10)]);
        assert_eq!(s.refusal("a", "r", "p"), Some("over_quota"));
        s.set_tenant(
            "b",
            Some((
                Tenant {
                    disabled: true,
                    ..named("b", None)
                },
                0,
            )),
        );
        assert_eq!(s.refusal("b", "r", "p"), Some("tenant_disabled"));
        s.set_tenant("b", None);
        assert_eq!(s.refusal("b", "r", "p"), Some("unknown_tenant"));
        s.set_revocations(vec![Revocation {
            tenant: "c".into(),
            room: Some("r".into()),
            peer: None,
            until: u64::MAX,
        }]);
        s.set_tenant("c", Some((named("c", None), 0)));
        assert_eq!(s.refusal("c", "r", "p"), Some("revoked"));
        assert_eq!(s.refusal("c", "other", "p"), None);
        assert_eq!(s.enforcement().revocations.len(), 1);
    }

    #[test]
    fn a_rebuild_keeps_edits_made_while_it_read_the_store() {
        let mut live = Snapshot::new(
            "2026-12".into(),
            [(named("a", Some(100)), 10), (named("b", None), 0)],
            Vec::new(),
        );
        // The rebuild read the store before these edits landed.
        let fresh = Snapshot::new(
            "2026-12".into(),
            [(named("a", Some(100)), 5), (named("b", None), 0)],
            Vec::new(),
        );
        live.set_tenant(
            "b",
            Some((
                Tenant {
                    disabled: true,
                    ..named("b", None)
                },
                0,
            )),
        );
        let touched = HashSet::from(["b".to_owned()]);
        let merged = live.merge_rebuild(fresh, &touched, false);
        assert_eq!(merged.tenants.get("a").map(|t| t.1), Some(10));
        assert_eq!(merged.refusal("b", "r", "p"), Some("tenant_disabled"));
        // A new month starts from what the store says.
        let next = Snapshot::new("2027-01".into(), [(named("a", Some(100)), 0)], Vec::new());
        let merged = live.merge_rebuild(next, &HashSet::new(), false);
        assert_eq!(merged.tenants.get("a").map(|t| t.1), Some(0));
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
