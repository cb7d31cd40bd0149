//! The conversation with the control plane: every interval, gather the
//! allocations' traffic into a usage batch, send queued batches oldest
//! first, and apply the enforcement state each acknowledgement carries
//! (polled when there is nothing to send, or when sending fails).
//! Failures, refusals included, back off and retry; batches stay queued
//! until acknowledged. The last enforcement is saved in the data dir, so
//! a restart while the control plane is away still knows who is cut off.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floe_common::{Check, Shutdown};
use floe_proto::time::unix_now;
use floe_proto::usage::{Enforcement, UsageAck};

use crate::policy::Policy;
use crate::turn::Turn;

/// Longest pause after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Client of the control plane's internal API, and keeper of the
/// enforcement it answers.
pub(crate) struct Control {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Where the last enforcement is saved (in the data dir), if anywhere.
    saved: Option<PathBuf>,
    /// What was saved last, to write only changes.
    last_saved: Mutex<Option<Enforcement>>,
}

/// The saved enforcement's file name in the data dir.
const ENFORCEMENT_FILE: &str = "enforcement.json";

impl Control {
    pub fn new(
        base: &str,
        token: &str,
        data_dir: Option<&std::path::Path>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            base: base.to_owned(),
            token: token.to_owned(),
            saved: data_dir.map(|d| d.join(ENFORCEMENT_FILE)),
            last_saved: Mutex::new(None),
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

    /// Applies enforcement from the control plane and saves it if it
    /// changed (best effort: a failed save costs only the restart case).
    fn enforce(&self, turn: &Turn, e: Enforcement) {
        if let Some(path) = &self.saved {
            let mut last = self.last_saved.lock().unwrap_or_else(|p| p.into_inner());
            if last.as_ref() != Some(&e) {
                match save(path, &e) {
                    Ok(()) => *last = Some(e.clone()),
                    Err(err) => {
                        tracing::warn!(error = %err, path = %path.display(), "cannot save the enforcement state")
                    }
                }
            }
        }
        turn.apply_policy(Policy::from_enforcement(e));
    }

    /// Applies the saved enforcement, if there is one.
    fn restore(&self, turn: &Turn) -> bool {
        let Some(path) = &self.saved else {
            return false;
        };
        let e = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Enforcement>(&bytes) {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(error = %err, path = %path.display(), "saved enforcement state is unreadable; ignored");
                    return false;
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return false,
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "cannot read the saved enforcement state");
                return false;
            }
        };
        tracing::info!(
            cut_off = e.cut_off.len(),
            revocations = e.revocations.len(),
            "using the saved enforcement state until the control plane answers"
        );
        *self.last_saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        turn.apply_policy(Policy::from_enforcement(e));
        true
    }
}

/// Writes `e` to `path` whole or not at all (a temporary file renamed).
fn save(path: &std::path::Path, e: &Enforcement) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(e)?)?;
    std::fs::rename(&tmp, path)
}

/// Gathers traffic of every allocation (and of those closed since the
/// last cut, for bytes counted after their final accounting) into the
/// meter and cuts a batch dated `at` (its day and month in the ledger).
pub(crate) async fn collect(turn: &Turn, at: u64) {
    turn.collect().await;
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
        control.enforce(turn, ack.enforcement);
        any = true;
    }
    Ok(any)
}

/// Fetches the enforcement state once (at start), briefly; failing
/// that, uses the saved one. With neither, allocations are refused until
/// the control plane answers.
pub(crate) async fn prime(turn: &Turn, control: &Control, ok: &Check) {
    let why = match tokio::time::timeout(Duration::from_secs(3), control.enforcement()).await {
        Ok(Ok(e)) => {
            control.enforce(turn, e);
            ok.set(true);
            return;
        }
        Ok(Err(e)) => e,
        Err(_) => "no answer in 3 s".to_owned(),
    };
    if control.restore(turn) {
        tracing::warn!(error = %why, "control plane unreachable at start; retrying in the background");
    } else {
        tracing::warn!(error = %why, "control plane unreachable at start and no saved enforcement state: allocations are refused (508) until it answers");
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

/// Doubles a backoff, from 1 s up to [`MAX_BACKOFF`].
fn next_backoff(b: Duration) -> Duration {
    (b * 2).clamp(Duration::from_secs(1), MAX_BACKOFF)
}

/// Runs until `stop` fires. Sending batches and polling enforcement back
/// off apart: a control plane that refuses batches but answers polls
/// still delivers cut-offs every interval.
pub(crate) async fn run(turn: Arc<Turn>, control: Option<Control>, ok: Check, stop: Shutdown) {
    let interval = turn.settings.usage_interval;
    // Backoff while the control plane does not answer at all.
    let mut backoff = Duration::ZERO;
    // Backoff of batch sending, and the first moment of the next try.
    let (mut send_backoff, mut send_after) = (Duration::ZERO, std::time::Instant::now());
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
        collect(&turn, cut_time(unix_now(), midnight)).await;
        let Some(control) = &control else { continue };
        let mut acked = false;
        if std::time::Instant::now() >= send_after {
            match flush(&turn, control).await {
                Ok(any) => {
                    acked = any;
                    send_backoff = Duration::ZERO;
                }
                Err(e) => {
                    turn.metrics
                        .usage_batches
                        .with_label_values(&["failed"])
                        .inc();
                    if send_backoff.is_zero() {
                        tracing::warn!(error = %e, pending = turn.meter.pending(), "usage not delivered; kept for retry");
                    }
                    send_backoff = next_backoff(send_backoff);
                    send_after = std::time::Instant::now() + send_backoff;
                }
            }
        }
        // Nothing acknowledged (so no enforcement came with an ack): poll,
        // so revocations arrive without traffic and while batches fail.
        let reached = if acked {
            Ok(())
        } else {
            control
                .enforcement()
                .await
                .map(|e| control.enforce(&turn, e))
        };
        match reached {
            Ok(()) => {
                if !ok.get() {
                    tracing::info!("control plane reachable again");
                }
                ok.set(true);
                backoff = Duration::ZERO;
            }
            Err(e) => {
                if ok.get() {
                    tracing::warn!(error = %e, pending = turn.meter.pending(), "control plane unreachable; usage kept for retry, last enforcement kept");
                }
                ok.set(false);
                backoff = next_backoff(backoff);
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
