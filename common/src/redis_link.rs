//! Where Redis is and how to stay connected to it: one server (`redis://`,
//! or `rediss://` over TLS) or a Sentinel set (`redis+sentinel://`,
//! `rediss+sentinel://`) whose master is looked up again after a failover.
//!
//! [`Endpoint`] is the checked configuration, so a component refuses at
//! start (and under `--check-config`) what it could not connect to later.
//! [`Link`] is the connection the signal bus and the control plane's store
//! share: a cloneable [`ConnectionLike`] over a reconnecting
//! [`ConnectionManager`]. Behind Sentinel, an error that says the master
//! moved (`READONLY`, a refused or dropped connection, a timeout) and a
//! check every [`RECHECK`] make it ask the sentinels again and switch to
//! the new master. The command that failed still fails: callers already
//! treat a Redis error as "try again", and replaying a write blindly could
//! apply it twice.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

/// How often a Sentinel-backed [`Link`] asks the sentinels where the
/// master is, even when nothing failed.
pub const RECHECK: Duration = Duration::from_secs(5);

/// How long asking the sentinels for the master may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

const DEFAULT_PORT: u16 = 6379;
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// How to reach Redis beyond its URL, the same flags for every component
/// that uses it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisFlags {
    /// Redis password, set into the Redis URL (so it can come from a
    /// Secret); behind Sentinel, the sentinels' password too.
    #[arg(long, env = "FLOE_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// File holding the Redis password.
    #[arg(long, env = "FLOE_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// PEM file of the CA that signed Redis's TLS certificates (rediss://
    /// URLs), trusted instead of the system's roots.
    #[arg(long, env = "FLOE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
}

impl RedisFlags {
    /// The endpoint of `url` (setting `what`), with the password and CA
    /// these flags give; `None` without a URL, where the flags must not be
    /// given either.
    pub fn endpoint(
        &self,
        what: &'static str,
        url: Option<&str>,
    ) -> Result<Option<Endpoint>, EndpointError> {
        let password = crate::secret::load(
            "Redis password",
            self.redis_password.as_deref(),
            self.redis_password_file.as_deref(),
        )?;
        let Some(url) = url else {
            if password.is_some() || self.redis_ca_file.is_some() {
                return Err(EndpointError::FlagsWithoutUrl(what));
            }
            return Ok(None);
        };
        let ca =
            match &self.redis_ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    EndpointError::CaFile(path.display().to_string(), e.to_string())
                })?),
                None => None,
            };
        Endpoint::parse(what, url, password.as_deref(), ca).map(Some)
    }
}

/// A Redis setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "{0} must be a redis://, rediss://, redis+sentinel:// or rediss+sentinel:// URL \
         (a Unix socket or a Redis Cluster is not supported)"
    )]
    Scheme(&'static str),
    #[error("{0} is not a valid URL: {1}")]
    Parse(&'static str, String),
    #[error("{0}: {1}")]
    Invalid(&'static str, &'static str),
    #[error(
        "{0}: TLS certificate checks cannot be turned off (#insecure); give the server's CA \
         with --redis-ca-file instead"
    )]
    Insecure(&'static str),
    #[error("--redis-ca-file needs a rediss:// or rediss+sentinel:// URL")]
    CaWithoutTls,
    #[error("--redis-ca-file holds no PEM certificate")]
    BadCa,
    #[error("cannot read --redis-ca-file {0}: {1}")]
    CaFile(String, String),
    #[error("--redis-password and --redis-ca-file need a Redis URL in {0}")]
    FlagsWithoutUrl(&'static str),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
}

/// Where Redis is, checked: one server or a Sentinel set, the database,
/// credentials and TLS trust. `Display` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The server, or the sentinels.
    hosts: Vec<(String, u16)>,
    /// The master's name, when `hosts` are sentinels.
    master: Option<String>,
    tls: bool,
    db: i64,
    username: Option<String>,
    password: Option<String>,
    /// PEM certificates trusted instead of the system's roots.
    ca: Option<Vec<u8>>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({self})")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.tls, self.master.is_some()) {
            (false, false) => "redis",
            (true, false) => "rediss",
            (false, true) => "redis+sentinel",
            (true, true) => "rediss+sentinel",
        };
        write!(f, "{scheme}://")?;
        for (i, (host, port)) in self.hosts.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            if host.contains(':') {
                write!(f, "{sep}[{host}]:{port}")?;
            } else {
                write!(f, "{sep}{host}:{port}")?;
            }
        }
        if let Some(master) = &self.master {
            write!(f, "/{master}")?;
        }
        write!(f, "/{}", self.db)
    }
}

impl Endpoint {
    /// Checks the URL given as setting `what`. `password`, when given (from
    /// a mounted Secret, so it never has to be written into the URL),
    /// replaces the URL's; behind Sentinel it is used for the sentinels
    /// too. `ca_pem` is trusted instead of the system's roots (TLS only).
    pub fn parse(
        what: &'static str,
        url: &str,
        password: Option<&str>,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, EndpointError> {
        let (scheme, rest) = url.split_once("://").ok_or(EndpointError::Scheme(what))?;
        let (tls, sentinel) = match scheme.to_ascii_lowercase().as_str() {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+sentinel" => (false, true),
            "rediss+sentinel" => (true, true),
            _ => return Err(EndpointError::Scheme(what)),
        };
        let mut endpoint = if sentinel {
            Self::parse_sentinel(what, rest)?
        } else {
            Self::parse_server(what, url)?
        };
        endpoint.tls = tls;
        if let Some(password) = password {
            endpoint.password = Some(password.to_owned());
        }
        if let Some(pem) = ca_pem {
            if !tls {
                return Err(EndpointError::CaWithoutTls);
            }
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| EndpointError::BadCa)?;
            if certs.is_empty() {
                return Err(EndpointError::BadCa);
            }
            endpoint.ca = Some(pem);
        }
        Ok(endpoint)
    }

    fn parse_server(what: &'static str, url: &str) -> Result<Self, EndpointError> {
        let parsed = url::Url::parse(url).map_err(|e| EndpointError::Parse(what, e.to_string()))?;
        if parsed.fragment().is_some_and(|f| f.contains("insecure")) {
            return Err(EndpointError::Insecure(what));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(EndpointError::Invalid(
                what,
                "options after ? or # are not supported",
            ));
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(EndpointError::Scheme(what)),
        };
        let username = Some(parsed.username())
            .filter(|u| !u.is_empty())
            .map(percent_decode);
        let password = parsed.password().map(percent_decode);
        Ok(Self {
            hosts: vec![(host, parsed.port().unwrap_or(DEFAULT_PORT))],
            master: None,
            tls: false,
            db: parse_db(what, parsed.path().trim_start_matches('/'))?,
            username,
            password,
            ca: None,
        })
    }

    /// `[user[:password]@]host[:port][,host[:port]]…/master[/db]`
    fn parse_sentinel(what: &'static str, rest: &str) -> Result<Self, EndpointError> {
        if rest.contains(['?', '#']) {
            return Err(EndpointError::Invalid(
                what,
                "options after ? or # are not supported",
            ));
        }
        let (authority, path) = rest.split_once('/').ok_or(EndpointError::Invalid(
            what,
            "a Sentinel URL names its master: redis+sentinel://host:26379/master",
        ))?;
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                (
                    Some(percent_decode(user)).filter(|u| !u.is_empty()),
                    pass.map(percent_decode),
                )
            }
        };
        let mut hosts = Vec::new();
        for entry in hostlist.split(',') {
            hosts.push(parse_host_port(what, entry, DEFAULT_SENTINEL_PORT)?);
        }
        let (master, db) = match path.split_once('/') {
            Some((m, db)) => (m, parse_db(what, db)?),
            None => (path, 0),
        };
        if master.is_empty()
            || !master
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(EndpointError::Invalid(
                what,
                "the master's name must be letters, digits, '-', '_' or '.'",
            ));
        }
        Ok(Self {
            hosts,
            master: Some(master.to_owned()),
            tls: false,
            db,
            username,
            password,
            ca: None,
        })
    }

    /// Whether this endpoint is a Sentinel set (a master with replicas).
    pub fn is_sentinel(&self) -> bool {
        self.master.is_some()
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        self.ca.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        })
    }

    fn redis_info(&self) -> RedisConnectionInfo {
        let mut info = RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            info = info.set_username(user);
        }
        if let Some(password) = &self.password {
            info = info.set_password(password);
        }
        info
    }

    fn addr(&self, host: &str, port: u16) -> ConnectionAddr {
        if self.tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        }
    }

    /// The client of a single server.
    fn server_client(&self) -> RedisResult<Client> {
        let (host, port) = &self.hosts[0];
        let info: ConnectionInfo = self
            .addr(host, *port)
            .into_connection_info()?
            .set_redis_settings(self.redis_info());
        match self.certificates() {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        }
    }

    fn sentinel_client(&self, master: &str) -> RedisResult<SentinelClient> {
        let addrs = self.hosts.iter().map(|(h, p)| self.addr(h, *p));
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
            .set_client_to_redis_db(self.db);
        if let Some(user) = &self.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &self.password {
            builder = builder
                .set_client_to_redis_password(password)
                .set_client_to_sentinel_password(password);
        }
        if self.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(certs) = self.certificates() {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs);
        }
        builder.build()
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_db(what: &'static str, db: &str) -> Result<i64, EndpointError> {
    if db.is_empty() {
        return Ok(0);
    }
    db.parse::<u16>()
        .map(i64::from)
        .map_err(|_| EndpointError::Invalid(what, "the database must be a number"))
}

fn parse_host_port(
    what: &'static str,
    entry: &str,
    default_port: u16,
) -> Result<(String, u16), EndpointError> {
    let bad = || EndpointError::Invalid(what, "each sentinel is host or host:port");
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(bad()),
        }
    } else {
        match entry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    if !valid_host {
        return Err(bad());
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
    };
    Ok((host.to_owned(), port))
}

/// The master currently in use.
struct Current {
    client: Client,
    conn: ConnectionManager,
    /// `host:port`, for logs and to see whether the master moved.
    addr: String,
}

struct Shared {
    endpoint: Endpoint,
    config: ConnectionManagerConfig,
    current: RwLock<Arc<Current>>,
    /// The sentinels' client, when the endpoint is a Sentinel set.
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    /// Set while a lookup of the master runs, so errors start at most one.
    looking_up: AtomicBool,
    switches: AtomicU64,
}

/// A connection to Redis that survives reconnects and, behind Sentinel,
/// failovers. Clones share it.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

impl Link {
    /// Connects to `endpoint` (behind Sentinel: asks the sentinels for the
    /// master first). `config` sets the connection's timeouts and retries.
    pub async fn connect(
        endpoint: &Endpoint,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let (sentinel, current) = match &endpoint.master {
            None => {
                let client = endpoint.server_client()?;
                let current = Self::open(client, &config).await?;
                (None, current)
            }
            Some(master) => {
                let mut sentinel = endpoint.sentinel_client(master)?;
                let client = tokio::time::timeout(LOOKUP_TIMEOUT, sentinel.async_get_client())
                    .await
                    .map_err(|_| {
                        RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the sentinels did not name the master in {LOOKUP_TIMEOUT:?}"),
                        ))
                    })??;
                let current = Self::open(client, &config).await?;
                (Some(tokio::sync::Mutex::new(sentinel)), current)
            }
        };
        tracing::info!(redis = %endpoint, master = %current.addr, "connected to Redis");
        let shared = Arc::new(Shared {
            endpoint: endpoint.clone(),
            config,
            current: RwLock::new(Arc::new(current)),
            sentinel,
            looking_up: AtomicBool::new(false),
            switches: AtomicU64::new(0),
        });
        if shared.sentinel.is_some() {
            tokio::spawn(recheck(Arc::downgrade(&shared)));
        }
        Ok(Self { shared })
    }

    async fn open(client: Client, config: &ConnectionManagerConfig) -> RedisResult<Current> {
        let addr = match client.get_connection_info().addr() {
            ConnectionAddr::Tcp(h, p)
            | ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => {
                format!("{h}:{p}")
            }
            other => format!("{other:?}"),
        };
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
        Ok(Current { client, conn, addr })
    }

    fn current(&self) -> Arc<Current> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The address of the server in use (`host:port`).
    pub fn server(&self) -> String {
        self.current().addr.clone()
    }

    /// How many times the link moved to a new master.
    pub fn switches(&self) -> u64 {
        self.shared.switches.load(Ordering::Relaxed)
    }

    /// A new pub/sub connection to the server in use. Messages published
    /// on a master reach its replicas' subscribers too, so a subscription
    /// outlives a failover that leaves its server running as a replica.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let result = self.current().client.get_async_pubsub().await;
        if let Err(e) = &result {
            self.after_error(e);
        }
        result
    }

    /// Looks the master up again after an error that may mean it moved.
    fn after_error(&self, e: &RedisError) {
        if self.shared.sentinel.is_none() || !master_may_have_moved(e) {
            return;
        }
        if self.shared.looking_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            lookup(&shared).await;
            shared.looking_up.store(false, Ordering::Release);
        });
    }
}

/// Whether `e` may mean that the master is now elsewhere.
fn master_may_have_moved(e: &RedisError) -> bool {
    e.code() == Some("READONLY")
        || e.to_string().contains("READONLY")
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
}

/// Asks the sentinels where the master is and switches to it if it moved.
async fn lookup(shared: &Shared) {
    let Some(sentinel) = &shared.sentinel else {
        return;
    };
    let client = {
        let mut sentinel = sentinel.lock().await;
        match tokio::time::timeout(LOOKUP_TIMEOUT, sentinel.async_get_client()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                tracing::warn!(redis = %shared.endpoint, error = %e, "cannot find the Redis master");
                return;
            }
            Err(_) => {
                tracing::warn!(redis = %shared.endpoint, "the sentinels did not name the master in time");
                return;
            }
        }
    };
    let old = shared
        .current
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if client.get_connection_info().addr() == old.client.get_connection_info().addr() {
        return;
    }
    match Link::open(client, &shared.config).await {
        Ok(new) => {
            tracing::warn!(
                redis = %shared.endpoint,
                from = %old.addr,
                to = %new.addr,
                "the Redis master moved; switched to the new one"
            );
            *shared.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
            shared.switches.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!(redis = %shared.endpoint, error = %e, "cannot connect to the new Redis master");
        }
    }
}

/// Re-checks the master every [`RECHECK`] while the link is in use.
async fn recheck(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(RECHECK).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.looking_up.swap(true, Ordering::AcqRel) {
            lookup(&shared).await;
            shared.looking_up.store(false, Ordering::Release);
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.current().conn.clone();
            let result = conn.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.after_error(e);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut conn = self.current().conn.clone();
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &result {
                self.after_error(e);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.endpoint.db
    }
}

/// Support for tests against the Redis servers `scripts/test-redis.sh`
/// starts (`scripts/test.sh` runs it). Every function panics with a clear
/// message when those servers are not there.
pub mod testing {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use super::Endpoint;

    fn env(var: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| {
            panic!(
                "{var} is not set: run the suite through scripts/test.sh, which starts the \
                 test Redis servers"
            )
        })
    }

    /// The test Redis whose URL is in the environment variable `var`:
    /// `FLOE_TEST_REDIS_URL` (plain), `FLOE_TEST_REDIS_TLS_URL` (its CA in
    /// `FLOE_TEST_REDIS_CA_FILE`) or `FLOE_TEST_REDIS_SENTINEL_URL`.
    pub fn endpoint(var: &str) -> Endpoint {
        let url = env(var);
        let ca = url.starts_with("rediss").then(|| {
            let path = env("FLOE_TEST_REDIS_CA_FILE");
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        });
        Endpoint::parse("test Redis", &url, None, ca).unwrap_or_else(|e| panic!("{var}={url}: {e}"))
    }

    /// The test Sentinel set: one sentinel watching master `floe` and its
    /// replica.
    pub struct SentinelSet {
        sentinel: String,
        dir: String,
    }

    impl SentinelSet {
        pub fn from_env() -> Self {
            let url = env("FLOE_TEST_REDIS_SENTINEL_URL");
            let sentinel = url
                .trim_start_matches("redis+sentinel://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            Self {
                sentinel,
                dir: env("FLOE_TEST_REDIS_DIR"),
            }
        }

        async fn ask<T: redis::FromRedisValue>(
            &self,
            cmd: &mut redis::Cmd,
        ) -> redis::RedisResult<T> {
            let client = redis::Client::open(format!("redis://{}", self.sentinel))?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            cmd.query_async(&mut conn).await
        }

        /// Where the sentinel says the master is (`host:port`).
        pub async fn master(&self) -> String {
            let (host, port): (String, String) = self
                .ask(
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg("floe"),
                )
                .await
                .expect("the sentinel names the master");
            format!("{host}:{port}")
        }

        /// Stops the master for good (`SHUTDOWN NOSAVE`) and waits (10 s
        /// at most) until it no longer answers; returns its address.
        pub async fn stop_master(&self) -> String {
            let master = self.master().await;
            let client = redis::Client::open(format!("redis://{master}")).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("the master answers");
            let _ = redis::cmd("SHUTDOWN")
                .arg("NOSAVE")
                .query_async::<()>(&mut conn)
                .await;
            let start = Instant::now();
            while client.get_multiplexed_async_connection().await.is_ok() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{master} did not stop"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            master
        }

        /// Waits (30 s at most) until the sentinel names a master other
        /// than `old`; returns it.
        pub async fn wait_failover(&self, old: &str) -> String {
            let start = Instant::now();
            loop {
                let now = self
                    .ask::<(String, String)>(
                        redis::cmd("SENTINEL")
                            .arg("get-master-addr-by-name")
                            .arg("floe"),
                    )
                    .await
                    .map(|(h, p)| format!("{h}:{p}"));
                if let Ok(now) = now
                    && now != old
                {
                    return now;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no failover in 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// Starts the stopped server at `old` again as a replica of the
        /// current master (its pid file where `scripts/test-redis.sh stop`
        /// finds it) and waits (30 s at most) until the sentinel sees it
        /// healthy, so the set can fail over again.
        pub async fn restore(&self, old: &str) {
            let master = self.master().await;
            let (host, port) = old.rsplit_once(':').expect("host:port");
            let (master_host, master_port) = master.rsplit_once(':').expect("host:port");
            let dir = &self.dir;
            let status = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    port,
                    "--bind",
                    host,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args([
                    "--replicaof",
                    master_host,
                    master_port,
                    "--daemonize",
                    "yes",
                ])
                .args(["--dir", dir])
                .args(["--pidfile", &format!("{dir}/restarted-{port}.pid")])
                .args(["--logfile", &format!("{dir}/restarted-{port}.log")])
                .status()
                .expect("redis-server runs");
            assert!(status.success(), "redis-server did not start");
            let start = Instant::now();
            loop {
                let replicas: Vec<HashMap<String, String>> = self
                    .ask(redis::cmd("SENTINEL").arg("replicas").arg("floe"))
                    .await
                    .unwrap_or_default();
                let healthy = replicas.iter().any(|r| {
                    r.get("port").map(String::as_str) == Some(port)
                        && r.get("flags").is_some_and(|f| !f.contains("down"))
                        && r.get("master-link-status").map(String::as_str) == Some("ok")
                });
                if healthy {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{old} did not rejoin as a replica: {replicas:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse("--redis-url", url, None, None)
    }

    #[test]
    fn servers_parse_with_defaults_and_credentials() {
        let e = parse("redis://cache").expect("valid");
        assert_eq!(e.to_string(), "redis://cache:6379/0");
        let e = parse("rediss://u%40x:p%40ss%2Fw%3Ard@cache:6380/3").expect("valid");
        assert_eq!(e.to_string(), "rediss://cache:6380/3");
        assert_eq!(e.username.as_deref(), Some("u@x"));
        assert_eq!(e.password.as_deref(), Some("p@ss/w:rd"));
        assert!(e.tls && e.master.is_none());
        let e = parse("redis://:a+b@[::1]:7000").expect("valid");
        assert_eq!(e.password.as_deref(), Some("a+b"));
        assert_eq!(e.to_string(), "redis://[::1]:7000/0");
    }

    #[test]
    fn a_password_from_a_secret_replaces_the_urls() {
        let e = Endpoint::parse("--store", "redis://:old@cache/0", Some("p@ss/w:rd"), None)
            .expect("valid");
        assert_eq!(e.password.as_deref(), Some("p@ss/w:rd"));
        assert!(!format!("{e} {e:?}").contains("p@ss"), "never displayed");
    }

    #[test]
    fn sentinel_sets_parse() {
        let e =
            parse("redis+sentinel://:pw@s1,s2:26380,[fd00::1]:5000/floe-main/2").expect("valid");
        assert_eq!(
            e.hosts,
            vec![
                ("s1".into(), 26379),
                ("s2".into(), 26380),
                ("fd00::1".into(), 5000)
            ]
        );
        assert_eq!(e.master.as_deref(), Some("floe-main"));
        assert_eq!(e.db, 2);
        assert_eq!(e.password.as_deref(), Some("pw"));
        assert_eq!(
            e.to_string(),
            "redis+sentinel://s1:26379,s2:26380,[fd00::1]:5000/floe-main/2"
        );
        let e = parse("rediss+sentinel://s1:26379/m").expect("valid");
        assert!(e.tls && e.master.is_some());
    }

    #[test]
    fn what_cannot_be_used_is_refused() {
        for (url, expect) in [
            ("http://cache:6379", "must be a redis://"),
            ("unix:///run/redis.sock", "must be a redis://"),
            ("redis+unix:///run/redis.sock", "must be a redis://"),
            ("not a url", "must be a redis://"),
            ("redis://", "must be a redis://"),
            ("rediss://cache/#insecure", "cannot be turned off"),
            ("redis://cache/?protocol=resp3", "not supported"),
            ("redis://cache/zero", "must be a number"),
            ("redis+sentinel://s1:26379", "names its master"),
            ("redis+sentinel://s1:26379/", "master's name"),
            ("redis+sentinel://s1:0/m", "host:port"),
            ("redis+sentinel://s1,,s2/m", "host:port"),
            ("redis+sentinel://s1:x/m", "host:port"),
        ] {
            let err = parse(url).expect_err(url).to_string();
            assert!(err.contains(expect), "{url}: {err}");
        }
    }

    #[test]
    fn a_ca_file_needs_tls_and_certificates() {
        let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_vec();
        assert!(matches!(
            Endpoint::parse("--redis-url", "redis://cache", None, Some(pem.clone())),
            Err(EndpointError::CaWithoutTls)
        ));
        assert!(matches!(
            Endpoint::parse(
                "--redis-url",
                "rediss://cache",
                None,
                Some(b"junk".to_vec())
            ),
            Err(EndpointError::BadCa)
        ));
        let e = Endpoint::parse("--redis-url", "rediss://cache", None, Some(pem)).expect("valid");
        assert!(e.ca.is_some());
    }

    #[test]
    fn flags_without_a_url_are_refused() {
        let flags = RedisFlags {
            redis_password: Some("pw".into()),
            ..RedisFlags::default()
        };
        assert!(matches!(
            flags.endpoint("--store", None),
            Err(EndpointError::FlagsWithoutUrl("--store"))
        ));
        let e = flags
            .endpoint("--store", Some("redis://cache"))
            .expect("valid");
        assert_eq!(e.and_then(|e| e.password).as_deref(), Some("pw"));
        assert!(matches!(
            RedisFlags::default().endpoint("--store", None),
            Ok(None)
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(url in "\\PC{0,80}") {
            let _ = parse(&url);
            let _ = parse(&format!("redis+sentinel://{url}"));
            let _ = parse(&format!("rediss://{url}"));
        }
    }
}
