//! Follows the control plane's change feed: drops cached tenants and keys
//! that changed, and closes (code 4005) the connections of a tenant that
//! was disabled or deleted, or that joined with a token signed by a
//! revoked API key. A node learns of either within one poll interval.
//! The same loop refreshes the ICE policy ([`crate::ice`]), so cut-offs
//! and TURN revocations stop new credentials within that interval too.

use std::sync::Arc;

use floe_common::Shutdown;

use crate::hub::close;
use crate::state::App;

/// Polls the feed and the ICE policy until `stop` fires.
pub(crate) async fn follow_changes(app: Arc<App>, stop: Shutdown) {
    let every = app.settings.changes_poll;
    // `None` until the first answer: changes before this node started
    // are already reflected in what it will fetch.
    let mut seen: Option<u64> = None;
    loop {
        match app.control.changes(seen.unwrap_or(u64::MAX)).await {
            Ok(feed) => {
                if let Some(after) = seen {
                    apply(&app, after, &feed).await;
                }
                seen = Some(feed.changes.last().map_or(feed.seq, |c| c.seq));
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the change feed; retrying"),
        }
        match app.control.ice_policy().await {
            Ok(policy) => app.ice.update(policy),
            Err(e) => tracing::debug!(error = %e, "cannot read the ICE policy; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Acts on one answer of the feed.
async fn apply(app: &App, after: u64, feed: &floe_proto::api::Changes) {
    if feed.reset {
        tracing::info!(
            after,
            newest = feed.seq,
            "change feed restarted; checking every tenant again"
        );
        app.control.forget_all();
        for tenant in app.hub.tenants() {
            check_tenant(app, &tenant).await;
        }
        return;
    }
    for change in &feed.changes {
        match &change.key {
            Some(kid) => {
                app.control.forget_key(kid);
                if matches!(app.control.key(kid).await, Ok(None)) {
                    let n = app.hub.close_where(
                        |_, key| key == Some(kid.as_str()),
                        close::REVOKED,
                        "API key revoked",
                    );
                    tracing::info!(key = %kid, connections = n, "API key revoked: its peers closed");
                }
            }
            None => {
                app.control.forget_tenant(&change.tenant);
                check_tenant(app, &change.tenant).await;
            }
        }
    }
}

/// Closes the tenant's connections if it is disabled or gone.
async fn check_tenant(app: &App, tenant: &str) {
    let lost = match app.control.tenant(tenant).await {
        Ok(Some(t)) => t.disabled,
        Ok(None) => true,
        Err(e) => {
            tracing::warn!(error = %e, tenant, "cannot check a changed tenant");
            false
        }
    };
    if lost {
        let n = app.hub.close_where(
            |room, _| room.tenant == tenant,
            close::REVOKED,
            "tenant disabled",
        );
        tracing::info!(
            tenant,
            connections = n,
            "tenant disabled or deleted: its peers closed"
        );
    }
}
