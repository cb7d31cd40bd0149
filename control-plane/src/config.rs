//! Configuration of `floe control-plane`: flags, each also read from a
//! `FLOE_…` environment variable, resolved into validated [`Settings`].

use floe_common::config::in_range;
use std::net::SocketAddr;
use std::path::PathBuf;

use floe_proto::credential::{CredentialError, TurnSecrets};

/// Flags of `floe control-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the HTTP API (admin, internal and ops endpoints).
    #[arg(long = "listen", env = "FLOE_LISTEN", default_value = "0.0.0.0:8090")]
    pub listen: SocketAddr,

    /// Store: a redb file path (embedded, single node) or Redis (several
    /// replicas): `redis://host:6379`, `rediss://…` (TLS), or a Sentinel
    /// set `redis+sentinel://sentinel1:26379,sentinel2:26379/master-name`
    /// (`rediss+sentinel://` for TLS).
    #[arg(long, env = "FLOE_STORE", default_value = "floe-data/control.redb")]
    pub store: String,

    #[command(flatten)]
    pub redis: floe_common::redis_link::RedisFlags,

    /// Prefix of every Redis key, so deployments can share a Redis.
    #[arg(long, env = "FLOE_REDIS_PREFIX", default_value = "floe:cp:")]
    pub redis_prefix: String,

    /// Redis replicas that must hold a write (a usage batch, a key)
    /// before the control plane acknowledges it, so it survives a
    /// failover; a write they do not take within a second is refused and
    /// retried. Default: 1 behind Sentinel, 0 otherwise.
    #[arg(long, env = "FLOE_STORE_REPLICAS")]
    pub store_replicas: Option<u32>,

    /// Bearer token of the admin API.
    #[arg(long, env = "FLOE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the admin token (instead of --admin-token).
    #[arg(long, env = "FLOE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Bearer token that signal and TURN present on the internal API.
    #[arg(long, env = "FLOE_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,

    /// File holding the internal token.
    #[arg(long, env = "FLOE_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,

    /// TURN secrets as `kid=secret` entries separated by commas; the first
    /// issues new credentials, the others stay valid (rotation).
    #[arg(long, env = "FLOE_TURN_SECRETS", hide_env_values = true)]
    pub turn_secrets: Option<String>,

    /// File holding TURN secrets, one `kid=secret` per line.
    #[arg(long, env = "FLOE_TURN_SECRETS_FILE")]
    pub turn_secrets_file: Option<PathBuf>,

    /// STUN URLs handed to every peer (`stun:host:port`); repeatable.
    #[arg(long = "stun-url", env = "FLOE_STUN_URLS", value_delimiter = ',')]
    pub stun_urls: Vec<String>,

    /// TURN URLs handed to peers whose plan allows TURN
    /// (`turn:host:3478?transport=udp`, `turns:host:5349?transport=tcp`); repeatable.
    #[arg(long = "turn-url", env = "FLOE_TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Vec<String>,

    /// Lifetime of issued TURN credentials, seconds.
    #[arg(long, env = "FLOE_CREDENTIAL_TTL_SECS", default_value_t = 600)]
    pub credential_ttl_secs: u64,

    /// Longest lifetime of a join token minted through the API, seconds.
    #[arg(long, env = "FLOE_MAX_TOKEN_TTL_SECS", default_value_t = 86_400)]
    pub max_token_ttl_secs: u64,

    /// Requests per second per client IP on the admin and token endpoints.
    #[arg(long, env = "FLOE_API_RATE", default_value_t = 50.0)]
    pub api_rate: f64,

    /// Reverse proxies (CIDRs, repeatable) whose `Forwarded` /
    /// `X-Forwarded-For` headers name the client for --api-rate; set it to
    /// your ingress controller's pod range. Headers from anyone else are
    /// ignored.
    #[arg(
        long = "trusted-proxy",
        env = "FLOE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// How often the in-memory enforcement state (cut-offs, policies,
    /// revocations) is rebuilt from the store, milliseconds. Changes made
    /// through this replica apply at once; this bounds how long one made
    /// through another replica takes.
    #[arg(long, env = "FLOE_ENFORCEMENT_REFRESH_MS", default_value_t = 2_000)]
    pub enforcement_refresh_ms: u64,
}

/// Where the control plane keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Embedded(PathBuf),
    Redis(floe_common::redis_link::Endpoint),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub store: StoreLocation,
    pub redis_prefix: String,
    /// Replicas that must hold a Redis write before it is acknowledged
    /// (`None`: 1 behind Sentinel, 0 otherwise).
    pub store_replicas: Option<u32>,
    pub admin_token: String,
    pub internal_token: String,
    pub turn_secrets: Option<TurnSecrets>,
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    pub credential_ttl_secs: u64,
    pub max_token_ttl_secs: u64,
    pub api_rate: f64,
    pub trusted_proxies: floe_common::proxy::TrustedProxies,
    pub enforcement_refresh: std::time::Duration,
}

/// A configuration the control plane cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Secret(#[from] floe_common::secret::SecretError),
    #[error("{0} is required (flag, env or file)")]
    Missing(&'static str),
    #[error("{what} must be at least {min} characters")]
    TooShort { what: &'static str, min: usize },
    #[error("TURN secrets")]
    TurnSecrets(#[from] CredentialError),
    #[error(transparent)]
    Redis(#[from] floe_common::redis_link::EndpointError),
    #[error("--store-replicas needs a Redis --store")]
    ReplicasWithoutRedis,
    #[error("--turn-url needs TURN secrets to sign credentials with")]
    TurnUrlsWithoutSecrets,
    #[error("{0:?} is not a STUN/TURN URL (stun:, turn:, turns:)")]
    BadIceUrl(String),
    #[error(transparent)]
    OutOfRange(#[from] floe_common::config::OutOfRange),
}

/// Shortest admin or internal token accepted.
const MIN_TOKEN_LEN: usize = 16;

impl Config {
    /// Loads secrets and checks every value.
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        use floe_common::secret::load;
        let admin_token = load(
            "admin token",
            self.admin_token.as_deref(),
            self.admin_token_file.as_deref(),
        )?
        .ok_or(ConfigError::Missing("admin token"))?;
        let internal_token = load(
            "internal token",
            self.internal_token.as_deref(),
            self.internal_token_file.as_deref(),
        )?
        .ok_or(ConfigError::Missing("internal token"))?;
        for (what, token) in [
            ("admin token", &admin_token),
            ("internal token", &internal_token),
        ] {
            if token.len() < MIN_TOKEN_LEN {
                return Err(ConfigError::TooShort {
                    what,
                    min: MIN_TOKEN_LEN,
                });
            }
        }
        let turn_secrets = load(
            "TURN secrets",
            self.turn_secrets.as_deref(),
            self.turn_secrets_file.as_deref(),
        )?
        .map(|s| TurnSecrets::parse(&s))
        .transpose()?;
        if !self.turn_urls.is_empty() && turn_secrets.is_none() {
            return Err(ConfigError::TurnUrlsWithoutSecrets);
        }
        for url in &self.stun_urls {
            check_ice_url(url, &["stun:", "stuns:"])?;
        }
        for url in &self.turn_urls {
            check_ice_url(url, &["turn:", "turns:"])?;
        }
        in_range(
            "--credential-ttl-secs",
            self.credential_ttl_secs,
            60,
            86_400,
        )?;
        in_range(
            "--max-token-ttl-secs",
            self.max_token_ttl_secs,
            60,
            floe_proto::token::MAX_LIFETIME_SECS,
        )?;
        in_range(
            "--enforcement-refresh-ms",
            self.enforcement_refresh_ms,
            100,
            60_000,
        )?;
        // Anything written as a URL is Redis (an unsupported scheme is
        // refused, not taken for a file name); the rest is a path.
        let url = (!self.store.starts_with("file:") && self.store.contains("://"))
            .then_some(self.store.as_str());
        if url.is_none() && self.store_replicas.is_some() {
            return Err(ConfigError::ReplicasWithoutRedis);
        }
        let store = match self.redis.endpoint("--store", url)? {
            Some(endpoint) => StoreLocation::Redis(endpoint),
            None => StoreLocation::Embedded(PathBuf::from(
                self.store.strip_prefix("file:").unwrap_or(&self.store),
            )),
        };
        Ok(Settings {
            listen: self.listen,
            store,
            redis_prefix: self.redis_prefix.clone(),
            store_replicas: self.store_replicas,
            admin_token,
            internal_token,
            turn_secrets,
            stun_urls: self.stun_urls.clone(),
            turn_urls: self.turn_urls.clone(),
            credential_ttl_secs: self.credential_ttl_secs,
            max_token_ttl_secs: self.max_token_ttl_secs,
            api_rate: self.api_rate,
            trusted_proxies: floe_common::proxy::TrustedProxies::new(self.trusted_proxies.clone()),
            enforcement_refresh: std::time::Duration::from_millis(self.enforcement_refresh_ms),
        })
    }
}

fn check_ice_url(url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let ok = schemes.iter().any(|s| {
        url.strip_prefix(s)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadIceUrl(url.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Config {
        let mut full = vec!["cp"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).expect("flags parse").config
    }

    const TOKENS: [&str; 4] = [
        "--admin-token",
        "admin-token-0123456789",
        "--internal-token",
        "internal-token-0123456789",
    ];

    #[test]
    fn resolves_a_good_config() {
        let mut args = TOKENS.to_vec();
        args.extend([
            "--turn-secrets",
            "k1=0123456789abcdef0",
            "--turn-url",
            "turn:example.com:3478?transport=udp",
            "--stun-url",
            "stun:example.com:3478",
            "--store",
            "redis://127.0.0.1:6390",
        ]);
        let s = parse(&args).resolve().expect("valid");
        let StoreLocation::Redis(redis) = s.store else {
            panic!("not Redis: {:?}", s.store)
        };
        assert_eq!(redis.to_string(), "redis://127.0.0.1:6390/0");
        assert_eq!(s.turn_secrets.expect("secrets").active_kid(), "k1");
    }

    #[test]
    fn refuses_bad_configs() {
        assert!(matches!(parse(&[]).resolve(), Err(ConfigError::Missing(_))));
        let mut short = TOKENS.to_vec();
        short[1] = "short";
        assert!(matches!(
            parse(&short).resolve(),
            Err(ConfigError::TooShort { .. })
        ));
        let mut urls = TOKENS.to_vec();
        urls.extend(["--turn-url", "turn:example.com"]);
        assert!(matches!(
            parse(&urls).resolve(),
            Err(ConfigError::TurnUrlsWithoutSecrets)
        ));
        let mut replicas = TOKENS.to_vec();
        replicas.extend(["--store-replicas", "1"]);
        assert!(matches!(
            parse(&replicas).resolve(),
            Err(ConfigError::ReplicasWithoutRedis)
        ));
        let mut bad = TOKENS.to_vec();
        bad.extend(["--stun-url", "http://example.com"]);
        assert!(matches!(
            parse(&bad).resolve(),
            Err(ConfigError::BadIceUrl(_))
        ));
        let mut ttl = TOKENS.to_vec();
        ttl.extend(["--credential-ttl-secs", "5"]);
        assert!(matches!(
            parse(&ttl).resolve(),
            Err(ConfigError::OutOfRange(_))
        ));
    }
}
