//! Configuration of `floe signal`: flags, each also read from a `FLOE_…`
//! environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `floe signal`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the HTTP/WebSocket API and the ops endpoints.
    #[arg(long = "listen", env = "FLOE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Base URL of the control plane's API.
    #[arg(
        long,
        env = "FLOE_CONTROL_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub control_url: String,

    /// Bearer token for the control plane's internal API.
    #[arg(long, env = "FLOE_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,

    /// File holding the internal token.
    #[arg(long, env = "FLOE_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub control_url: String,
    pub internal_token: String,
}

/// A configuration `floe signal` cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Secret(#[from] floe_common::secret::SecretError),
    #[error("{0} is required (flag, env or file)")]
    Missing(&'static str),
    #[error("--control-url must be an http(s) URL, got {0:?}")]
    BadControlUrl(String),
}

impl Config {
    /// Loads secrets and checks every value.
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        let internal_token = floe_common::secret::load(
            "internal token",
            self.internal_token.as_deref(),
            self.internal_token_file.as_deref(),
        )?
        .ok_or(ConfigError::Missing("internal token"))?;
        let url = self.control_url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::BadControlUrl(self.control_url.clone()));
        }
        Ok(Settings {
            listen: self.listen,
            control_url: url.to_owned(),
            internal_token,
        })
    }
}
