//! The shutdown signal: a cancellation token that SIGTERM or Ctrl-C fires.
//!
//! Components take a [`Shutdown`] in `run`/`start`; tests cancel it by hand
//! (or by dropping their server handle). A started component keeps its
//! main task in a [`Running`], which stops it on request or when dropped.

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A started component's main task and the token that stops it. Dropping
/// it cancels the token, so a forgotten handle never leaves a server up.
pub struct Running {
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn new(shutdown: Shutdown, task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Fires the token and waits for the task to finish (graceful stop).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Waits for the task to finish (after the token fired elsewhere).
    pub async fn wait(mut self) {
        self.join().await;
    }

    async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A token cancelled on the first SIGTERM or Ctrl-C.
pub fn on_signals() -> Shutdown {
    let token = Shutdown::new();
    let fire = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        fire.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
