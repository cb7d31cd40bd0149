//! The conversation with the control plane: every interval, gather the
//! allocations' traffic into a usage batch, send queued batches oldest
//! first, and apply the enforcement state each acknowledgement carries
//! (polled when there is nothing to send). Failures, refusals included,
//! back off and retry; batches stay queued until acknowledged.

use std::sync::Arc;
use std::time::Duration;

use floe_common::{Check, Shutdown};
use floe_proto::time::unix_now;
use floe_proto::usage::{Enforcement, UsageAck};

use crate::policy::Policy;
use crate::turn::Turn;

/// Longest pause after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Client of the control plane's internal API.
pub(crate) struct Control {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Control {
    pub fn new(base: &str, token: &str) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            base: base.to_owned(),
            token: token.to_owned(),
        })
    }

    async fn enforcement(&self) -> Result<Enforcement, String> {
        let r = self
            .http
            .get(format!("{}/internal/v1/enforcement", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("enforcement: answered {}", r.status()));
        }
        r.json().await.map_err(|e| e.to_string())
    }
}

/// Gathers traffic of every allocation (and of those closed since the
/// last cut, for bytes counted after their final accounting) into the
/// meter and cuts a batch dated `at` (its day and month in the ledger).
pub(crate) fn collect(turn: &Turn, at: u64) {
    for a in turn.allocations().iter().chain(&turn.take_closed()) {
        turn.account(a);
    }
    if let Err(e) = turn.meter.cut(at) {
        tracing::error!(error = %e, "cannot persist usage");
    }
    turn.metrics.usage_pending.set(turn.meter.pending() as i64);
}

/// Sends queued batches oldest first until the queue is empty or a send
/// fails. Returns `Ok(true)` if anything was acknowledged.
pub(crate) async fn flush(turn: &Turn, control: &Control) -> Result<bool, String> {
    let mut any = false;
    while let Some(batch) = turn.meter.oldest() {
        turn.metrics
            .usage_batches
            .with_label_values(&["sent"])
            .inc();
        let resp = control
            .http
            .post(format!("{}/internal/v1/usage", control.base))
            .bearer_auth(&control.token)
            .json(&batch)
            .send()
            .await;
        let ack: UsageAck = match resp {
            Ok(r) if r.status().is_success() => r.json().await.map_err(|e| e.to_string())?,
            Ok(r) => {
                // Never dropped, whatever the answer: a batch is money. A
                // 401 during an internal-token rotation, say, clears by
                // itself; anything else keeps the queue (and the
                // FloeTurnUsageBatchesPiling alert) up until fixed.
                let status = r.status();
                if status.is_client_error() {
                    turn.metrics
                        .usage_batches
                        .with_label_values(&["rejected"])
                        .inc();
                }
                let body = r.text().await.unwrap_or_default();
                let code = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                return Err(format!(
                    "usage batch {}: answered {status} {code}",
                    batch.seq
                ));
            }
            Err(e) => return Err(e.to_string()),
        };
        turn.meter
            .acked(&ack.server_id, ack.seq)
            .map_err(|e| e.to_string())?;
        turn.metrics
            .usage_batches
            .with_label_values(&["acked"])
            .inc();
        turn.metrics.usage_pending.set(turn.meter.pending() as i64);
        turn.apply_policy(Policy::from_enforcement(ack.enforcement));
        any = true;
    }
    Ok(any)
}

/// Fetches the enforcement state once (at start), briefly.
pub(crate) async fn prime(turn: &Turn, control: &Control, ok: &Check) {
    match tokio::time::timeout(Duration::from_secs(3), control.enforcement()).await {
        Ok(Ok(e)) => {
            turn.apply_policy(Policy::from_enforcement(e));
            ok.set(true);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "control plane unreachable at start; retrying in the background")
        }
        Err(_) => {
            tracing::warn!("control plane did not answer at start; retrying in the background")
        }
    }
}

/// The first UTC midnight after `now` (unix seconds).
fn next_midnight(now: u64) -> u64 {
    (now / 86_400 + 1) * 86_400
}

/// The date of a cut taken at `now` by a wake-up scheduled for at most
/// `midnight`: a cut that crossed midnight holds the ending day's traffic
/// (all but the last second at most), so it is dated that day's last
/// second.
fn cut_time(now: u64, midnight: u64) -> u64 {
    if now >= midnight { midnight - 1 } else { now }
}

/// Runs until `stop` fires.
pub(crate) async fn run(turn: Arc<Turn>, control: Option<Control>, ok: Check, stop: Shutdown) {
    let interval = turn.settings.usage_interval;
    let mut backoff = Duration::ZERO;
    loop {
        // A cut is taken at every UTC midnight too, so a day's traffic is
        // not dated the next day (nor a month's the next month), however
        // long the interval or the backoff.
        let midnight = next_midnight(unix_now());
        let to_midnight = Duration::from_secs(midnight.saturating_sub(unix_now()).max(1));
        let pause = interval.max(backoff).min(to_midnight);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        turn.sweep(std::time::Instant::now());
        collect(&turn, cut_time(unix_now(), midnight));
        let Some(control) = &control else { continue };
        let result = match flush(&turn, control).await {
            Ok(true) => Ok(()),
            // Nothing to send: poll, so revocations arrive without traffic.
            Ok(false) => control
                .enforcement()
                .await
                .map(|e| turn.apply_policy(Policy::from_enforcement(e))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if !ok.get() {
                    tracing::info!("control plane reachable again");
                }
                ok.set(true);
                backoff = Duration::ZERO;
            }
            Err(e) => {
                turn.metrics
                    .usage_batches
                    .with_label_values(&["failed"])
                    .inc();
                if ok.get() {
                    tracing::warn!(error = %e, pending = turn.meter.pending(), "control plane unreachable; usage kept for retry");
                }
                ok.set(false);
                backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_that_cross_midnight_belong_to_the_ending_day() {
        use floe_proto::time::Date;
        // 2026-11-30 23:59:58 UTC, and the midnight that starts December.
        let late = 1_796_083_198;
        let midnight = next_midnight(late);
        assert_eq!(midnight, late + 2);
        assert_eq!(Date::from_unix(midnight).month_key(), "2026-12");
        assert_eq!(cut_time(late, midnight), late);
        let at = cut_time(midnight + 1, midnight);
        assert_eq!(Date::from_unix(at).day_key(), "2026-11-30");
        assert_eq!(next_midnight(midnight), midnight + 86_400);
    }
}
