//! Usage-alert webhooks: events raised when a tenant's month crosses 80%
//! and 100% of its quota (100% also cuts it off), queued durably in the
//! store's outbox, and POSTed signed with HMAC-SHA256 until the receiver
//! answers 2xx.
//!
//! Delivery is at least once: an event's id is derived from (tenant,
//! month, level), so re-queuing after a crash or by a second replica
//! yields the same id, and receivers drop duplicates by it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floe_common::Shutdown;
use floe_proto::time::Date;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Notify;

use crate::enforcement::alert_levels;
use crate::metrics::Metrics;
use crate::store::{OutboxEvent, Result, Store};

/// Header carrying `sha256=<hex HMAC-SHA256(webhook_secret, body)>`.
pub const SIGNATURE_HEADER: &str = "x-floe-signature";
/// Header carrying the event id.
pub const EVENT_ID_HEADER: &str = "x-floe-event-id";
/// Events older than this are abandoned (logged and dropped).
const GIVE_UP_AFTER_SECS: u64 = 3 * 86_400;
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The body of a webhook POST.
#[derive(Debug, Clone, Serialize)]
struct EventBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    tenant: &'a str,
    month: &'a str,
    /// Percent of quota reached.
    level: u32,
    used_bytes: u64,
    quota_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    at: u64,
}

/// `sha256=<hex>` signature of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    digest.iter().fold(String::from("sha256="), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Pause before attempt `attempts + 1`: 1 s, 2 s, 4 s … capped at 5 min.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(16)).min(MAX_BACKOFF)
}

/// Queues the alerts that `tenants` have newly reached this month.
/// Returns how many events were queued.
pub(crate) async fn raise_alerts(
    store: &dyn Store,
    tenants: &BTreeSet<String>,
    now: u64,
) -> Result<usize> {
    let month = Date::from_unix(now).month_key();
    let mut queued = 0;
    for id in tenants {
        let Some(tenant) = store.get_tenant(id).await? else {
            continue;
        };
        let quota = tenant.plan.monthly_relay_bytes;
        let used = store.month_bytes(id, &month).await?;
        for level in alert_levels(used, quota) {
            if store.alert_raised(id, &month, level).await? {
                continue;
            }
            // Queue first, mark second: a crash in between re-queues the
            // same event id, which is a duplicate, never a loss.
            if let (Some(url), Some(secret)) = (&tenant.webhook_url, &tenant.webhook_secret) {
                let mut kinds = vec![("usage.threshold", None)];
                if level == "100" {
                    kinds.push(("tenant.cut_off", Some("over_quota")));
                }
                for (kind, reason) in kinds {
                    let event_id = format!("evt_{id}_{month}_{level}_{kind}");
                    let body = EventBody {
                        id: &event_id,
                        kind,
                        tenant: id,
                        month: &month,
                        level: level.parse().unwrap_or(0),
                        used_bytes: used,
                        quota_bytes: quota.unwrap_or(0),
                        reason,
                        at: now,
                    };
                    store
                        .push_outbox(&OutboxEvent {
                            id: event_id.clone(),
                            tenant: id.clone(),
                            url: url.clone(),
                            secret: secret.clone(),
                            body: serde_json::to_string(&body)?,
                            created_at: now,
                        })
                        .await?;
                    queued += 1;
                }
            }
            store.mark_alert(id, &month, level).await?;
            tracing::info!(tenant = %id, %month, level, used, "usage alert raised");
        }
    }
    Ok(queued)
}

/// Delivers queued events until `shutdown` fires. `wake` is notified when
/// new events are queued.
pub(crate) async fn deliver(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: Shutdown,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook delivery disabled: no HTTP client");
            return;
        }
    };
    // Per event: attempts so far and when the next may start.
    let mut schedule: HashMap<String, (u32, Instant)> = HashMap::new();
    loop {
        let events = match store.outbox().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook outbox");
                Vec::new()
            }
        };
        let now = Instant::now();
        schedule.retain(|id, _| events.iter().any(|e| &e.id == id));
        for event in events {
            let (attempts, due) = schedule.get(&event.id).copied().unwrap_or((0, now));
            if due > now {
                continue;
            }
            let delivered = attempt(&http, &event).await;
            metrics
                .webhooks
                .with_label_values(&[if delivered { "delivered" } else { "failed" }])
                .inc();
            let too_old =
                floe_proto::time::unix_now().saturating_sub(event.created_at) > GIVE_UP_AFTER_SECS;
            if delivered || too_old {
                if too_old && !delivered {
                    tracing::warn!(event = %event.id, tenant = %event.tenant, "webhook abandoned after 3 days of failures");
                }
                if let Err(e) = store.remove_outbox(&event.id).await {
                    tracing::warn!(error = %e, event = %event.id, "cannot remove a delivered webhook event");
                }
                schedule.remove(&event.id);
            } else {
                schedule.insert(
                    event.id.clone(),
                    (attempts + 1, Instant::now() + backoff(attempts)),
                );
            }
        }
        let next = schedule
            .values()
            .map(|(_, due)| *due)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(5))
            .min(Instant::now() + Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

async fn attempt(http: &reqwest::Client, event: &OutboxEvent) -> bool {
    let result = http
        .post(&event.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            SIGNATURE_HEADER,
            signature(&event.secret, event.body.as_bytes()),
        )
        .header(EVENT_ID_HEADER, &event.id)
        .body(event.body.clone())
        .send()
        .await;
    match result {
        Ok(r) if r.status().is_success() => {
            tracing::info!(event = %event.id, tenant = %event.tenant, "webhook delivered");
            true
        }
        Ok(r) => {
            tracing::warn!(event = %event.id, status = %r.status(), "webhook refused; will retry");
            false
        }
        Err(e) => {
            tracing::warn!(event = %event.id, error = %e, "webhook failed; will retry");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc4231_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
