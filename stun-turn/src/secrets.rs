//! Reloading TURN secrets from their file: every `--turn-secrets-file`
//! change (a Kubernetes Secret update lands in the mounted file within the
//! kubelet's sync) applies without a restart, so a new kid can be accepted
//! by every TURN server before the control plane issues it. Read every
//! few seconds and at once on SIGHUP; a file that cannot be read or parsed
//! is logged and the secrets in use are kept.

use std::path::PathBuf;
use std::sync::Arc;

use floe_common::Shutdown;
use floe_proto::credential::TurnSecrets;

use crate::turn::Turn;

/// Runs until `stop` fires.
pub(crate) async fn reload(turn: Arc<Turn>, file: PathBuf, stop: Shutdown) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; TURN secrets are reloaded on a timer only");
            None
        }
    };
    let mut last = std::fs::read_to_string(&file).ok();
    loop {
        let by_signal = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(turn.settings.secrets_reload) => false,
            Some(()) = async { hangup.as_mut()?.recv().await } => true,
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, path = %file.display(), "cannot read the TURN secrets file; keeping the secrets in use");
                continue;
            }
        };
        if !by_signal && last.as_deref() == Some(text.as_str()) {
            continue;
        }
        match TurnSecrets::parse(text.trim()) {
            Ok(secrets) => {
                let kids: Vec<&str> = secrets.kids().collect();
                tracing::info!(?kids, by_signal, "TURN secrets reloaded");
                turn.metrics
                    .secrets_reloads
                    .with_label_values(&["ok"])
                    .inc();
                turn.replace_secrets(secrets);
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %file.display(), "the TURN secrets file is invalid; keeping the secrets in use");
                turn.metrics
                    .secrets_reloads
                    .with_label_values(&["invalid"])
                    .inc();
            }
        }
        last = Some(text);
    }
}
