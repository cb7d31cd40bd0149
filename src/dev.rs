//! `floe dev`: every component in one process on embedded defaults.
//!
//! Secrets are generated on first start and kept in the data folder with
//! the control plane's embedded store, so a second start reuses the same
//! admin token, tenant and API key. Components are composed here through
//! their public `start` functions and talk to each other over loopback,
//! exactly as separate processes would.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use floe_common::Shutdown;
use floe_common::secret::random_token;
use floe_proto::api::Plan;
use floe_proto::token::{Grants, JoinClaims};
use serde::Serialize;

/// Flags of `floe dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevConfig {
    /// Folder for the embedded store and generated secrets.
    #[arg(long, env = "FLOE_DATA_DIR", default_value = "floe-data")]
    pub data_dir: PathBuf,

    /// Address every component binds and advertises.
    #[arg(long, env = "FLOE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Signal API port (0: any free port).
    #[arg(long, env = "FLOE_SIGNAL_PORT", default_value_t = 8080)]
    pub signal_port: u16,

    /// Control plane API port (0: any free port).
    #[arg(long, env = "FLOE_CONTROL_PORT", default_value_t = 8090)]
    pub control_port: u16,

    /// STUN/TURN port, UDP and TCP (0: any free port).
    #[arg(long, env = "FLOE_TURN_PORT", default_value_t = 3478)]
    pub turn_port: u16,

    /// TURN ops HTTP port (0: any free port).
    #[arg(long, env = "FLOE_TURN_HTTP_PORT", default_value_t = 9478)]
    pub turn_http_port: u16,

    /// Lowest UDP port of TURN relay addresses.
    #[arg(long, env = "FLOE_RELAY_PORT_MIN", default_value_t = 49_152)]
    pub relay_port_min: u16,

    /// Highest UDP port of TURN relay addresses.
    #[arg(long, env = "FLOE_RELAY_PORT_MAX", default_value_t = 65_535)]
    pub relay_port_max: u16,

    /// Keep the control plane's store and the room bus in this Redis
    /// (`redis://host:port`) instead of the data folder and memory, as a
    /// multi-node deployment does (keys under `floe-dev:`).
    #[arg(long, env = "FLOE_DEV_REDIS_URL")]
    pub redis_url: Option<String>,
}

/// Id of the tenant `floe dev` creates.
const DEV_TENANT: &str = "default";

impl DevConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            anyhow::bail!("--data-dir must not be empty");
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            anyhow::bail!(
                "--data-dir {} is not a directory (it is a file; pick another path)",
                self.data_dir.display()
            );
        }
        if let Some(url) = &self.redis_url {
            floe_common::redis_link::Endpoint::parse("--redis-url", url, None, None)?;
        }
        if self.relay_port_min < 1_024 || self.relay_port_min > self.relay_port_max {
            anyhow::bail!(
                "--relay-port-min ({}) must be at least 1024 and at most --relay-port-max ({})",
                self.relay_port_min,
                self.relay_port_max
            );
        }
        Ok(())
    }
}

impl DevConfig {
    /// Fails, naming the flag to change, when a fixed port is taken:
    /// before anything starts, rather than after some components have
    /// already said they are listening.
    fn check_ports(&self) -> anyhow::Result<()> {
        let tcp = |port| std::net::TcpListener::bind((self.host, port)).map(drop);
        let udp = |port| std::net::UdpSocket::bind((self.host, port)).map(drop);
        let checks: [(u16, &str, bool); 4] = [
            (self.signal_port, "--signal-port", false),
            (self.control_port, "--control-port", false),
            (self.turn_port, "--turn-port", true),
            (self.turn_http_port, "--turn-http-port", false),
        ];
        for (port, flag, with_udp) in checks {
            if port == 0 {
                continue;
            }
            let taken = tcp(port).and_then(|()| if with_udp { udp(port) } else { Ok(()) });
            if let Err(e) = taken {
                anyhow::bail!(
                    "port {port} on {} ({flag}) is not free: {e}; pick another with {flag} (0: any free port)",
                    self.host
                );
            }
        }
        Ok(())
    }
}

/// What `floe dev` started, also written to `<data-dir>/endpoints.json`.
#[derive(Debug, Serialize)]
struct Endpoints {
    signal_url: String,
    signal_ops_url: String,
    control_url: String,
    turn_addr: SocketAddr,
    turn_ops_url: String,
    admin_token: String,
    tenant: String,
    api_key_id: String,
    api_key_secret: String,
    join_token: String,
}

/// Reads the secret in `dir/name`, creating it with `make` the first time
/// (mode 0600).
fn persistent_secret(
    dir: &Path,
    name: &str,
    make: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let value = make();
    write_private(&path, &value)?;
    Ok(value)
}

/// A port free for both UDP and TCP on `host`.
fn free_udp_tcp_port(host: IpAddr) -> anyhow::Result<u16> {
    // Below the kernel's ephemeral range (32768+ by default): a port the
    // kernel hands out for a later "port 0" bind in this process (the
    // control plane's, TURN's ops listener) cannot be this one, which is
    // released before TURN binds it.
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..100 {
        let port = rng.random_range(20_000..32_000);
        if std::net::UdpSocket::bind((host, port)).is_ok()
            && std::net::TcpListener::bind((host, port)).is_ok()
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on {host}")
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// Runs every component until `shutdown` fires.
pub async fn run(config: DevConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    config.validate()?;
    config.check_ports()?;
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let endpoints_file = dir.join("endpoints.json");
    let _ = std::fs::remove_file(&endpoints_file);
    let admin_token = persistent_secret(dir, "admin-token", || random_token(24))?;
    let internal_token = persistent_secret(dir, "internal-token", || random_token(24))?;
    let turn_secrets =
        persistent_secret(dir, "turn-secrets", || format!("k1={}", random_token(24)))?;
    let host = config.host;

    // The control plane advertises TURN's address and TURN reports to the
    // control plane: fix TURN's port first.
    let turn_addr = SocketAddr::new(
        host,
        match config.turn_port {
            0 => free_udp_tcp_port(host)?,
            p => p,
        },
    );
    let turn_host = match turn_addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };

    let control = floe_control::Config {
        listen: SocketAddr::new(host, config.control_port),
        store: match &config.redis_url {
            Some(url) => url.clone(),
            None => dir.join("control.redb").display().to_string(),
        },
        redis_prefix: "floe-dev:cp:".into(),
        store_replicas: None,
        redis: Default::default(),
        admin_token: Some(admin_token.clone()),
        admin_token_file: None,
        internal_token: Some(internal_token.clone()),
        internal_token_file: None,
        turn_secrets: Some(turn_secrets.clone()),
        turn_secrets_file: None,
        stun_urls: vec![format!("stun:{turn_host}")],
        turn_urls: vec![
            format!("turn:{turn_host}?transport=udp"),
            format!("turn:{turn_host}?transport=tcp"),
        ],
        credential_ttl_secs: 600,
        max_token_ttl_secs: 86_400,
        api_rate: 200.0,
        trusted_proxies: Vec::new(),
        enforcement_refresh_ms: 2_000,
    };
    // The control plane stops last: TURN reports its final usage to it.
    let control_stop = Shutdown::new();
    let control = floe_control::start(control.resolve()?, control_stop.clone())
        .await
        .context("starting the control plane")?;
    let (tenant, key) = control
        .ensure_tenant(
            DEV_TENANT,
            "Default (dev)",
            Plan {
                turn: true,
                public_rooms: true,
                ..Plan::default()
            },
        )
        .await
        .context("creating the default tenant")?;

    let mut turn =
        floe_turn::Settings::new(turn_addr, SocketAddr::new(host, config.turn_http_port));
    turn.secrets = Some(floe_proto::credential::TurnSecrets::parse(&turn_secrets)?);
    turn.control_url = Some(control.url());
    turn.internal_token = Some(internal_token.clone());
    turn.data_dir = Some(dir.join("turn"));
    turn.relay_ports = (config.relay_port_min, config.relay_port_max);
    turn.server_id = "dev-turn".into();
    // Local peers are the point of a dev setup.
    turn.allow_peers = vec!["127.0.0.0/8".parse()?, "::1/128".parse()?];
    turn.drain = std::time::Duration::from_secs(2);
    let turn = floe_turn::start(turn, shutdown.clone())
        .await
        .context("starting TURN")?;

    let mut signal = floe_signal::Settings::new(
        SocketAddr::new(host, config.signal_port),
        &control.url(),
        &internal_token,
    );
    // Every client of a dev node comes from this machine: per-IP limits
    // sized for the internet would stop a local load test.
    signal.max_connections_per_ip = 50_000;
    signal.public_rooms_per_min = 60_000;
    // The file-share app, on the default tenant's public rooms.
    signal.app_tenant = Some(DEV_TENANT.to_owned());
    if let Some(url) = &config.redis_url {
        signal.redis = Some(floe_common::redis_link::Endpoint::parse(
            "--redis-url",
            url,
            None,
            None,
        )?);
        signal.redis_prefix = "floe-dev:sig:".into();
    }
    let signal = floe_signal::start(signal, shutdown.clone())
        .await
        .context("starting signal")?;

    let now = floe_proto::time::unix_now();
    let join_token = floe_proto::token::mint(
        &JoinClaims {
            iss: key.id.clone(),
            sub: "alice".into(),
            room: None,
            grants: Grants {
                create: true,
                join: true,
            },
            exp: now + 86_400,
            iat: now,
            nbf: None,
        },
        key.secret.as_bytes(),
    )?;
    let endpoints = Endpoints {
        signal_url: format!("http://{}", signal.addr()),
        signal_ops_url: format!("http://{}", signal.ops_addr()),
        control_url: control.url(),
        turn_addr,
        turn_ops_url: format!("http://{}", turn.http_addr()),
        admin_token,
        tenant: tenant.id,
        api_key_id: key.id,
        api_key_secret: key.secret,
        join_token,
    };
    write_private(&endpoints_file, &serde_json::to_string_pretty(&endpoints)?)?;
    print_banner(&endpoints, dir);

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    signal.wait().await;
    turn.wait().await;
    control_stop.cancel();
    control.wait().await;
    Ok(())
}

/// How to run this binary again: its path (`cargo run` leaves no `floe`
/// on the PATH), shell-quoted when it needs to be.
fn floe_path() -> String {
    let path = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "floe".to_owned());
    if path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        path
    } else {
        format!("'{}'", path.replace('\'', r"'\''"))
    }
}

fn print_banner(e: &Endpoints, dir: &Path) {
    println!(
        "\nfloe dev is running (data in {dir}; Ctrl-C to stop)\n\n\
         \x20 file-share app  {signal}/      (open it in two browsers; ?relay=1 forces TURN)\n\
         \x20 signal API      {signal}      (health: {signal}/healthz; metrics: {signal_ops}/metrics)\n\
         \x20 control plane   {control}      (health: {control}/healthz)\n\
         \x20 STUN/TURN       {turn} udp+tcp   (ops: {ops}/metrics)\n\n\
         \x20 admin token     {admin}\n\
         \x20 tenant          {tenant}\n\
         \x20 API key id      {kid}\n\
         \x20 API key secret  {secret}\n\
         \x20 join token      {token}\n\
         \x20                 (peer \"alice\", create+join, valid 24 h)\n\n\
         Try:\n\
         \x20 curl -s -H 'Authorization: Bearer {admin}' {control}/v1/tenants\n\
         \x20 curl -s -u {kid}:{secret} -H 'Content-Type: application/json' -d '{{}}' {control}/v1/ice-servers\n\
         \x20 {floe} loadtest stun-binding --target {turn}\n\
         (all of the above is also in {dir}/endpoints.json; `cargo install --path .` puts floe on the PATH)\n",
        dir = dir.display(),
        signal = e.signal_url,
        signal_ops = e.signal_ops_url,
        control = e.control_url,
        turn = e.turn_addr,
        ops = e.turn_ops_url,
        admin = e.admin_token,
        tenant = e.tenant,
        kid = e.api_key_id,
        secret = e.api_key_secret,
        token = e.join_token,
        floe = floe_path(),
    );
}
