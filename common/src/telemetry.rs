//! Tracing set-up: human-readable logs by default, JSON with `--log-format
//! json`; the level comes from `FLOE_LOG` (or `RUST_LOG`), `info` by
//! default. Text is coloured only on a terminal, and never with `NO_COLOR`
//! set (<https://no-color.org>).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber; a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = std::env::var("FLOE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|s| EnvFilter::try_new(s).ok())
        // The webrtc-rs TURN client (load tester) warns per datagram when
        // its buffer fills under load; that is counted in reports instead.
        .unwrap_or_else(|| EnvFilter::new("info,turn::client=error"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
