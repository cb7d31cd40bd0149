//! ICE servers for joining peers, minted on this node from the control
//! plane's [`IcePolicy`] (URLs, credential lifetime, the active TURN secret,
//! cut-off tenants and revocations) instead of a control-plane round trip
//! per join. The policy is polled with the change feed
//! ([`crate::revoke`]), so a cut-off or a revocation stops new credentials
//! here within one poll interval, as it did when the control plane minted
//! each one; TURN enforces the same lists on its side.
//!
//! [`Policy::issue`] is pure. [`Ice`] keeps the latest policy and fetches
//! one inline only when it has none yet.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use floe_proto::api::{IcePolicy, IceServers, Tenant};
use floe_proto::credential::{IceSource, TurnSecrets};
use floe_proto::usage::Revocation;

use crate::control::{Control, Unavailable};

/// Why TURN is left out when the policy is too old to trust.
const STALE: &str = "control_plane_unavailable";
/// How long joins of a node without any policy wait before asking again.
const RETRY: Duration = Duration::from_secs(2);

/// A fetched [`IcePolicy`], indexed for issuing.
pub(crate) struct Policy {
    stun_urls: Vec<String>,
    turn_urls: Vec<String>,
    ttl: u64,
    secrets: Option<TurnSecrets>,
    cut_off: HashMap<String, &'static str>,
    revocations: Vec<Revocation>,
}

impl Policy {
    pub fn new(p: IcePolicy) -> Self {
        let secrets = p
            .turn_secret
            .as_deref()
            .and_then(|entry| match TurnSecrets::parse(entry) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "the control plane's TURN secret does not parse; issuing STUN only");
                    None
                }
            });
        Self {
            stun_urls: p.stun_urls,
            turn_urls: p.turn_urls,
            ttl: p.credential_ttl_secs,
            secrets,
            cut_off: p
                .cut_off
                .into_iter()
                .map(|c| (c.tenant, c.reason.as_str()))
                .collect(),
            revocations: p.revocations,
        }
    }

    /// Why `tenant` gets no TURN for (room, peer) now, if it does not.
    fn refusal(&self, tenant: &Tenant, room: &str, peer: &str) -> Option<&'static str> {
        if self.secrets.is_none() || self.turn_urls.is_empty() {
            Some("turn_not_configured")
        } else if tenant.disabled {
            Some("tenant_disabled")
        } else if !tenant.plan.turn {
            Some("turn_disabled")
        } else if let Some(reason) = self.cut_off.get(&tenant.id) {
            Some(*reason)
        } else if self
            .revocations
            .iter()
            .any(|r| r.covers(&tenant.id, room, peer))
        {
            Some("revoked")
        } else {
            None
        }
    }

    /// ICE servers for (tenant, room, peer) at `now`: STUN, and TURN with
    /// credentials unless refused (`turn_refused` says why). `stale`
    /// withholds TURN because the policy is too old to trust.
    pub fn issue(
        &self,
        tenant: &Tenant,
        room: &str,
        peer: &str,
        now: u64,
        stale: bool,
    ) -> IceServers {
        let refused = if stale {
            Some(STALE)
        } else {
            self.refusal(tenant, room, peer)
        };
        let source = IceSource {
            stun_urls: &self.stun_urls,
            turn_urls: &self.turn_urls,
            secrets: self.secrets.as_ref(),
        };
        source.servers(&tenant.id, room, peer, self.ttl, now, refused)
    }
}

/// The node's latest policy and when it was fetched.
pub(crate) struct Ice {
    latest: RwLock<Option<(Instant, std::sync::Arc<Policy>)>>,
    /// One inline fetch at a time, and when the last one failed.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// Past this age the policy is refreshed inline, and TURN is withheld
    /// if that fails.
    max_age: Duration,
}

impl Ice {
    pub fn new(max_age: Duration) -> Self {
        Self {
            latest: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(None),
            max_age,
        }
    }

    /// Replaces the policy (from the poll loop or an inline fetch).
    pub fn update(&self, policy: IcePolicy) {
        let fresh = (Instant::now(), std::sync::Arc::new(Policy::new(policy)));
        *self.latest.write().unwrap_or_else(|e| e.into_inner()) = Some(fresh);
    }

    fn current(&self) -> Option<(Instant, std::sync::Arc<Policy>)> {
        self.latest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// ICE servers for (tenant, room, peer). Fails only when this node has
    /// never had a policy and cannot fetch one. A stale policy is not
    /// refreshed here (the poll loop keeps trying): it withholds TURN.
    pub async fn servers(
        &self,
        control: &Control,
        tenant: &Tenant,
        room: &str,
        peer: &str,
        now: u64,
    ) -> Result<IceServers, Unavailable> {
        if let Some((at, p)) = self.current() {
            return Ok(p.issue(tenant, room, peer, now, at.elapsed() >= self.max_age));
        }
        // No policy yet (the node just started): one join fetches it, the
        // others wait for that answer rather than each asking again.
        let mut last_failure = self.fetching.lock().await;
        if self.current().is_none() && last_failure.is_none_or(|t| t.elapsed() >= RETRY) {
            match control.ice_policy().await {
                Ok(p) => self.update(p),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch the ICE policy");
                    *last_failure = Some(Instant::now());
                }
            }
        }
        match self.current() {
            Some((_, p)) => Ok(p.issue(tenant, room, peer, now, false)),
            None => Err(Unavailable(
                "no ICE policy from the control plane yet".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floe_proto::api::Plan;
    use floe_proto::credential::{TurnUsername, turn_password};
    use floe_proto::usage::{CutOff, CutOffReason};

    fn tenant(id: &str, turn: bool, disabled: bool) -> Tenant {
        Tenant {
            id: id.into(),
            name: id.into(),
            plan: Plan {
                turn,
                ..Plan::default()
            },
            disabled,
            webhook_url: None,
            webhook_secret: None,
            created_at: 0,
        }
    }

    fn policy() -> Policy {
        Policy::new(IcePolicy {
            stun_urls: vec!["stun:s:3478".into()],
            turn_urls: vec!["turn:s:3478?transport=udp".into()],
            credential_ttl_secs: 600,
            turn_secret: Some("k9=signal-side-secret-0123".into()),
            cut_off: vec![CutOff {
                tenant: "over".into(),
                reason: CutOffReason::OverQuota,
            }],
            revocations: vec![Revocation {
                tenant: "t".into(),
                room: Some("r".into()),
                peer: Some("mallory".into()),
                until: u64::MAX,
            }],
        })
    }

    #[test]
    fn issues_credentials_the_turn_server_accepts() {
        let ice = policy().issue(&tenant("t", true, false), "r", "alice", 1_000, false);
        assert_eq!((ice.ttl, ice.expires, ice.turn_refused), (600, 1_600, None));
        let turn = &ice.ice_servers[1];
        let user = turn.username.as_deref().expect("username");
        let parsed = TurnUsername::parse(user).expect("floe username");
        assert_eq!(
            (parsed.expires, parsed.kid.as_str(), parsed.tenant.as_str()),
            (1_600, "k9", "t")
        );
        assert_eq!(
            turn.credential.as_deref(),
            Some(turn_password(b"signal-side-secret-0123", user).as_str())
        );
    }

    #[test]
    fn refuses_turn_with_the_reason() {
        let p = policy();
        let reason = |t: &Tenant, peer: &str| p.issue(t, "r", peer, 1_000, false).turn_refused;
        assert_eq!(
            reason(&tenant("t", true, false), "mallory").as_deref(),
            Some("revoked")
        );
        assert_eq!(
            reason(&tenant("over", true, false), "a").as_deref(),
            Some("over_quota")
        );
        assert_eq!(
            reason(&tenant("t", false, false), "a").as_deref(),
            Some("turn_disabled")
        );
        assert_eq!(
            reason(&tenant("t", true, true), "a").as_deref(),
            Some("tenant_disabled")
        );
        let stale = p.issue(&tenant("t", true, false), "r", "a", 1_000, true);
        assert_eq!(stale.turn_refused.as_deref(), Some(STALE));
        assert_eq!(stale.ice_servers.len(), 1, "STUN only");
        let no_turn = Policy::new(IcePolicy {
            stun_urls: vec!["stun:s".into()],
            ..IcePolicy::default()
        });
        let ice = no_turn.issue(&tenant("t", true, false), "r", "a", 1_000, false);
        assert_eq!(ice.turn_refused.as_deref(), Some("turn_not_configured"));
        assert_eq!(ice.expires, 0);
    }

    #[tokio::test]
    async fn a_stale_policy_withholds_turn_without_asking_per_join() {
        // A control plane that is not there: asking would fail.
        let control = Control::new("http://127.0.0.1:9", "token").expect("client");
        let ice = Ice::new(Duration::ZERO);
        assert!(
            ice.servers(&control, &tenant("t", true, false), "r", "a", 1)
                .await
                .is_err(),
            "no policy at all: the join cannot be served"
        );
        ice.update(IcePolicy {
            stun_urls: vec!["stun:s".into()],
            turn_urls: vec!["turn:s".into()],
            credential_ttl_secs: 600,
            turn_secret: Some("k9=signal-side-secret-0123".into()),
            ..IcePolicy::default()
        });
        let got = ice
            .servers(&control, &tenant("t", true, false), "r", "a", 1)
            .await
            .expect("served from the stale policy");
        assert_eq!(got.turn_refused.as_deref(), Some(STALE));
        assert_eq!(got.ice_servers.len(), 1, "STUN only");
    }
}
