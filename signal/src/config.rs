//! Configuration of `floe signal`: flags, each also read from a `FLOE_…`
//! environment variable.

use floe_common::config::in_range;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `floe signal`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the HTTP/WebSocket API (it also answers /healthz and
    /// /readyz, for load balancers).
    #[arg(long = "listen", env = "FLOE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the ops endpoints (/metrics, /healthz, /readyz). Metrics
    /// name tenants, so keep this off the public network.
    #[arg(long, env = "FLOE_OPS_LISTEN", default_value = "0.0.0.0:9080")]
    pub ops_listen: SocketAddr,

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

    /// Redis shared by every signal node: `redis://host:6379`,
    /// `rediss://…` (TLS), or a Sentinel set
    /// `redis+sentinel://sentinel1:26379,sentinel2:26379/master-name`
    /// (`rediss+sentinel://` for TLS). Without it the node keeps rooms in
    /// process and runs alone.
    #[arg(long, env = "FLOE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    #[command(flatten)]
    pub redis: floe_common::redis_link::RedisFlags,

    /// Prefix of every Redis key and channel of the room bus.
    #[arg(long, env = "FLOE_REDIS_PREFIX", default_value = "floe:sig:")]
    pub redis_prefix: String,

    /// This node's id on the room bus (default: host name and a random suffix).
    #[arg(long, env = "FLOE_NODE_ID")]
    pub node_id: Option<String>,

    /// Origins allowed to open WebSockets and call the API from a browser;
    /// repeatable. Empty allows any origin.
    #[arg(
        long = "allowed-origin",
        env = "FLOE_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Largest WebSocket message accepted, bytes.
    #[arg(long, env = "FLOE_MAX_MESSAGE_BYTES", default_value_t = 65_536)]
    pub max_message_bytes: usize,

    /// Messages per second a connection may send (sustained).
    #[arg(long, env = "FLOE_MESSAGES_PER_SEC", default_value_t = 50.0)]
    pub messages_per_sec: f64,

    /// Messages a connection may send in a burst.
    #[arg(long, env = "FLOE_MESSAGE_BURST", default_value_t = 200)]
    pub message_burst: u32,

    /// Concurrent WebSocket connections per client IP.
    #[arg(long, env = "FLOE_MAX_CONNECTIONS_PER_IP", default_value_t = 200)]
    pub max_connections_per_ip: u32,

    /// Reverse proxies (CIDRs, repeatable) whose `Forwarded` /
    /// `X-Forwarded-For` headers name the client for per-IP limits; set it
    /// to your ingress controller's pod range. Headers from anyone else
    /// are ignored.
    #[arg(
        long = "trusted-proxy",
        env = "FLOE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Anonymous room creations per client IP per minute.
    #[arg(long, env = "FLOE_PUBLIC_ROOMS_PER_MIN", default_value_t = 30)]
    pub public_rooms_per_min: u32,

    /// Room lifetime when the creator gives none, seconds.
    #[arg(long, env = "FLOE_ROOM_TTL_SECS", default_value_t = 3_600)]
    pub room_ttl_secs: u64,

    /// Longest room lifetime, seconds.
    #[arg(long, env = "FLOE_MAX_ROOM_TTL_SECS", default_value_t = 86_400)]
    pub max_room_ttl_secs: u64,

    /// Peers per room when the creator gives no limit.
    #[arg(long, env = "FLOE_DEFAULT_MAX_PEERS", default_value_t = 8)]
    pub default_max_peers: u32,

    /// Seconds between WebSocket pings; a peer silent for two is dropped,
    /// and one whose writes stall for one is closed as too slow.
    #[arg(long, env = "FLOE_HEARTBEAT_SECS", default_value_t = 20)]
    pub heartbeat_secs: u64,

    /// Serve the file-share web app at `/` (off by default in production).
    #[arg(long, env = "FLOE_SERVE_APP")]
    pub serve_app: bool,

    /// Tenant whose public rooms the web app creates (needed with
    /// --serve-app; its plan must allow public rooms).
    #[arg(long, env = "FLOE_APP_TENANT")]
    pub app_tenant: Option<String>,

    /// Milliseconds between this node's heartbeats on the Redis bus.
    #[arg(long, env = "FLOE_NODE_BEAT_MS", default_value_t = 1_000)]
    pub node_beat_ms: u64,

    /// Milliseconds without a heartbeat after which a node counts as dead
    /// and its peers leave their rooms.
    #[arg(long, env = "FLOE_NODE_DEAD_AFTER_MS", default_value_t = 5_000)]
    pub node_dead_after_ms: u64,

    /// Milliseconds between polls of the control plane's change feed: how
    /// soon a disabled tenant or a revoked API key closes its connections.
    #[arg(long, env = "FLOE_CHANGES_POLL_MS", default_value_t = 1_000)]
    pub changes_poll_ms: u64,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub control_url: String,
    pub internal_token: String,
    pub redis: Option<floe_common::redis_link::Endpoint>,
    pub redis_prefix: String,
    pub node_id: String,
    pub allowed_origins: Vec<String>,
    pub max_message_bytes: usize,
    pub messages_per_sec: f64,
    pub message_burst: u32,
    pub max_connections_per_ip: u32,
    pub trusted_proxies: floe_common::proxy::TrustedProxies,
    pub public_rooms_per_min: u32,
    pub room_ttl_secs: u64,
    pub max_room_ttl_secs: u64,
    pub default_max_peers: u32,
    pub heartbeat_secs: u64,
    pub node_beat: Duration,
    pub node_dead_after: Duration,
    pub changes_poll: Duration,
    /// Serve the web app, with rooms of this tenant.
    pub app_tenant: Option<String>,
}

impl Settings {
    /// Defaults for a node that talks to the control plane at
    /// `control_url` (used by `floe dev` and tests).
    pub fn new(listen: SocketAddr, control_url: &str, internal_token: &str) -> Self {
        Self {
            listen,
            ops_listen: SocketAddr::new(listen.ip(), 0),
            control_url: control_url.trim_end_matches('/').to_owned(),
            internal_token: internal_token.to_owned(),
            redis: None,
            redis_prefix: "floe:sig:".into(),
            node_id: default_node_id(),
            allowed_origins: Vec::new(),
            max_message_bytes: 65_536,
            messages_per_sec: 50.0,
            message_burst: 200,
            max_connections_per_ip: 200,
            trusted_proxies: Default::default(),
            public_rooms_per_min: 30,
            room_ttl_secs: 3_600,
            max_room_ttl_secs: 86_400,
            default_max_peers: 8,
            heartbeat_secs: 20,
            node_beat: Duration::from_secs(1),
            node_dead_after: Duration::from_secs(5),
            changes_poll: Duration::from_secs(1),
            app_tenant: None,
        }
    }
}

/// Host name (or "signal") and a random suffix.
fn default_node_id() -> String {
    format!(
        "{}-{}",
        floe_common::host_name("signal"),
        floe_common::secret::random_token(3)
    )
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
    #[error(transparent)]
    Redis(#[from] floe_common::redis_link::EndpointError),
    #[error("--serve-app needs --app-tenant (the tenant whose public rooms the app creates)")]
    AppWithoutTenant,
    #[error("--app-tenant: {0}")]
    BadAppTenant(floe_proto::id::IdError),
    #[error("--node-id")]
    BadNodeId(#[from] floe_proto::id::IdError),
    #[error(transparent)]
    OutOfRange(#[from] floe_common::config::OutOfRange),
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
        let redis = self
            .redis
            .endpoint("--redis-url", self.redis_url.as_deref())?;
        let node_id = match &self.node_id {
            Some(id) => {
                floe_proto::id::validate("node id", id)?;
                id.clone()
            }
            None => default_node_id(),
        };
        in_range(
            "--max-message-bytes",
            self.max_message_bytes as u64,
            1_024,
            1 << 20,
        )?;
        in_range(
            "--messages-per-sec",
            self.messages_per_sec as u64,
            1,
            100_000,
        )?;
        in_range("--message-burst", u64::from(self.message_burst), 1, 100_000)?;
        in_range(
            "--max-connections-per-ip",
            u64::from(self.max_connections_per_ip),
            1,
            1_000_000,
        )?;
        in_range(
            "--max-room-ttl-secs",
            self.max_room_ttl_secs,
            60,
            30 * 86_400,
        )?;
        in_range(
            "--room-ttl-secs",
            self.room_ttl_secs,
            60,
            self.max_room_ttl_secs,
        )?;
        in_range(
            "--default-max-peers",
            u64::from(self.default_max_peers),
            2,
            1_000,
        )?;
        in_range("--heartbeat-secs", self.heartbeat_secs, 1, 300)?;
        in_range("--node-beat-ms", self.node_beat_ms, 50, 60_000)?;
        in_range(
            "--node-dead-after-ms",
            self.node_dead_after_ms,
            3 * self.node_beat_ms,
            600_000,
        )?;
        in_range("--changes-poll-ms", self.changes_poll_ms, 100, 60_000)?;
        let app_tenant = match (self.serve_app, &self.app_tenant) {
            (false, _) => None,
            (true, None) => return Err(ConfigError::AppWithoutTenant),
            (true, Some(t)) => {
                floe_proto::id::validate("tenant", t).map_err(ConfigError::BadAppTenant)?;
                Some(t.clone())
            }
        };
        Ok(Settings {
            listen: self.listen,
            ops_listen: self.ops_listen,
            control_url: url.to_owned(),
            internal_token,
            redis,
            redis_prefix: self.redis_prefix.clone(),
            node_id,
            allowed_origins: self.allowed_origins.clone(),
            max_message_bytes: self.max_message_bytes,
            messages_per_sec: self.messages_per_sec,
            message_burst: self.message_burst,
            max_connections_per_ip: self.max_connections_per_ip,
            trusted_proxies: floe_common::proxy::TrustedProxies::new(self.trusted_proxies.clone()),
            public_rooms_per_min: self.public_rooms_per_min,
            room_ttl_secs: self.room_ttl_secs,
            max_room_ttl_secs: self.max_room_ttl_secs,
            default_max_peers: self.default_max_peers,
            heartbeat_secs: self.heartbeat_secs,
            node_beat: Duration::from_millis(self.node_beat_ms),
            node_dead_after: Duration::from_millis(self.node_dead_after_ms),
            changes_poll: Duration::from_millis(self.changes_poll_ms),
            app_tenant,
        })
    }
}
