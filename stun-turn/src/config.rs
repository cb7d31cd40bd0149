//! Configuration of `floe turn`: flags, each also read from a `FLOE_…`
//! environment variable, resolved into validated [`Settings`].

use floe_common::config::in_range;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use floe_proto::credential::{CredentialError, TurnSecrets};
use ipnet::IpNet;

/// Longest `--server-id`: the meter adds 9 characters and the control
/// plane takes ids of up to 64.
const MAX_SERVER_ID_LEN: usize = 55;
/// Most shards (`--udp-sockets`, and the one-per-core default); a relay
/// port's owning shard is kept in one byte.
pub(crate) const MAX_UDP_SOCKETS: usize = 64;

/// Flags of `floe turn`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address for STUN/TURN over UDP and TCP.
    #[arg(long = "listen", env = "FLOE_LISTEN", default_value = "0.0.0.0:3478")]
    pub listen: SocketAddr,

    /// Address of the ops HTTP endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "FLOE_HTTP_LISTEN", default_value = "0.0.0.0:9478")]
    pub http_listen: SocketAddr,

    /// A second IP address of this host, for NAT behaviour discovery (RFC
    /// 5780): Binding is then answered on four addresses (--listen's and
    /// --alt-ip's IP, each with --listen's and --alt-port's port), with
    /// OTHER-ADDRESS and RESPONSE-ORIGIN, and CHANGE-REQUEST and
    /// RESPONSE-PORT are honoured over UDP. Needs --listen on a specific
    /// address of the same family; both must be reachable without NAT.
    #[arg(long, env = "FLOE_ALT_IP")]
    pub alt_ip: Option<IpAddr>,

    /// The second port for NAT behaviour discovery (default: the listen
    /// port plus one; any free port when the listen port is 0).
    #[arg(long, env = "FLOE_ALT_PORT", requires = "alt_ip")]
    pub alt_port: Option<u16>,

    /// Shards: each with its own UDP socket on the listen address
    /// (SO_REUSEPORT), serving the allocations of the clients the kernel
    /// hashes to it; 0: one per core. As many threads run them, packed
    /// onto fewer while the load is light.
    #[arg(long, env = "FLOE_UDP_SOCKETS", default_value_t = 0)]
    pub udp_sockets: usize,

    /// Most concurrent TCP connections.
    #[arg(long, env = "FLOE_MAX_TCP_CONNECTIONS", default_value_t = 10_000)]
    pub max_tcp_connections: usize,

    /// Realm of the long-term credentials.
    #[arg(long, env = "FLOE_REALM", default_value = "floe")]
    pub realm: String,

    /// TURN secrets as `kid=secret` entries separated by commas (shared
    /// with the control plane). Without secrets the server does STUN only.
    #[arg(long, env = "FLOE_TURN_SECRETS", hide_env_values = true)]
    pub turn_secrets: Option<String>,

    /// File holding TURN secrets, one `kid=secret` per line. Read again
    /// every 5 s and on SIGHUP: a changed file applies without a restart
    /// (an unreadable or invalid one is logged and the secrets in use are
    /// kept).
    #[arg(long, env = "FLOE_TURN_SECRETS_FILE")]
    pub turn_secrets_file: Option<PathBuf>,

    /// Base URL of the control plane (usage reports and enforcement).
    #[arg(long, env = "FLOE_CONTROL_URL")]
    pub control_url: Option<String>,

    /// Bearer token for the control plane's internal API.
    #[arg(long, env = "FLOE_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,

    /// File holding the internal token.
    #[arg(long, env = "FLOE_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,

    /// IP addresses relay sockets bind to (one IPv4 and/or one IPv6);
    /// default: the listen address, or 127.0.0.1 when that is unspecified.
    #[arg(long = "relay-ip", env = "FLOE_RELAY_IPS", value_delimiter = ',')]
    pub relay_ips: Vec<IpAddr>,

    /// Address advertised in XOR-RELAYED-ADDRESS instead of the relay IP
    /// (the public IP behind a 1:1 NAT or load balancer).
    #[arg(long, env = "FLOE_EXTERNAL_IP", conflicts_with = "external_ip_stun")]
    pub external_ip: Option<IpAddr>,

    /// Learn --external-ip at start by asking this STUN server (`host:port`,
    /// outside the NAT) how it sees the relay address: for nodes whose
    /// public address is a 1:1 NAT of a private one (EC2, GCE, Azure VMs).
    /// TURN does not start without an answer.
    #[arg(long, env = "FLOE_EXTERNAL_IP_STUN")]
    pub external_ip_stun: Option<String>,

    /// Lowest relay port.
    #[arg(long, env = "FLOE_RELAY_PORT_MIN", default_value_t = 49_152)]
    pub relay_port_min: u16,

    /// Highest relay port.
    #[arg(long, env = "FLOE_RELAY_PORT_MAX", default_value_t = 65_535)]
    pub relay_port_max: u16,

    /// Peer range to allow although it is loopback/private/link-local
    /// (e.g. 127.0.0.0/8 in tests); repeatable.
    #[arg(long = "allow-peer", env = "FLOE_ALLOW_PEERS", value_delimiter = ',')]
    pub allow_peers: Vec<IpNet>,

    /// Most allocations on this server at once (508 beyond).
    #[arg(long, env = "FLOE_MAX_ALLOCATIONS", default_value_t = 50_000)]
    pub max_allocations: usize,

    /// Longest allocation lifetime a client may ask for, seconds.
    #[arg(long, env = "FLOE_MAX_LIFETIME_SECS", default_value_t = 3_600)]
    pub max_lifetime_secs: u64,

    /// How long a nonce stays valid, seconds (438 Stale Nonce after).
    #[arg(long, env = "FLOE_NONCE_SECS", default_value_t = 600)]
    pub nonce_secs: u64,

    /// Failed authentications per source IP per minute before the server
    /// stops answering it for a while.
    #[arg(long, env = "FLOE_AUTH_FAILURES_PER_MIN", default_value_t = 30)]
    pub auth_failures_per_min: u32,

    /// Seconds between usage reports to the control plane.
    #[arg(long, env = "FLOE_USAGE_INTERVAL_SECS", default_value_t = 2)]
    pub usage_interval_secs: u64,

    /// Prefix of this server's id in usage batches (default: host name);
    /// each process adds a random suffix, so ids never collide.
    #[arg(long, env = "FLOE_SERVER_ID")]
    pub server_id: Option<String>,

    /// Folder where unacknowledged usage batches and the batch sequence
    /// survive restarts (recommended: a persistent volume).
    #[arg(long, env = "FLOE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// On SIGTERM, keep relaying existing allocations for at most this
    /// many seconds while refusing new ones.
    #[arg(long, env = "FLOE_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,

    /// Relay between two allocations of this server through the kernel,
    /// as if the peer were elsewhere, instead of handing each datagram
    /// from one allocation to the other in memory (the default: half the
    /// system calls; permissions, rate caps and metering are the same).
    #[arg(long, env = "FLOE_KERNEL_HAIRPIN")]
    pub kernel_hairpin: bool,

    /// Address for STUN/TURN over TLS (served when a certificate is given).
    #[arg(long, env = "FLOE_TLS_LISTEN", default_value = "0.0.0.0:5349")]
    pub tls_listen: SocketAddr,

    /// PEM certificate chain for TLS.
    #[arg(long, env = "FLOE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key for TLS.
    #[arg(long, env = "FLOE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
}

/// Where and with what certificate TLS is served.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// NAT behaviour discovery's second IP and port (0: any free port).
    pub alt: Option<(IpAddr, u16)>,
    pub udp_sockets: usize,
    pub max_tcp_connections: usize,
    pub realm: String,
    pub secrets: Option<TurnSecrets>,
    /// Where the secrets came from, if a file: it is read again every
    /// `secrets_reload` and on SIGHUP, so a rotation needs no restart.
    pub secrets_file: Option<PathBuf>,
    pub secrets_reload: Duration,
    pub control_url: Option<String>,
    pub internal_token: Option<String>,
    pub relay_ips: Vec<IpAddr>,
    pub external_ip: Option<IpAddr>,
    /// STUN server (`host:port`) that tells the external address at start.
    pub external_ip_stun: Option<String>,
    pub relay_ports: (u16, u16),
    pub allow_peers: Vec<IpNet>,
    pub max_allocations: usize,
    pub max_lifetime: Duration,
    pub nonce_lifetime: Duration,
    pub auth_failures_per_min: u32,
    pub usage_interval: Duration,
    pub server_id: String,
    pub data_dir: Option<PathBuf>,
    pub drain: Duration,
    pub kernel_hairpin: bool,
    pub tls: Option<TlsSettings>,
}

/// A configuration `floe turn` cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    OutOfRange(#[from] floe_common::config::OutOfRange),
    #[error(transparent)]
    Secret(#[from] floe_common::secret::SecretError),
    #[error("TURN secrets")]
    TurnSecrets(#[from] CredentialError),
    #[error("the relay port range {0}-{1} is empty or inverted")]
    PortRange(u16, u16),
    #[error(
        "--alt-ip {0} needs --listen on another address of the same family, not {1} \
         (NAT behaviour discovery answers from both IPs)"
    )]
    AltIp(IpAddr, SocketAddr),
    #[error("--alt-port {0} must differ from the listen port and fit below 65536")]
    AltPort(u16),
    #[error("--control-url and an internal token go together")]
    ControlWithoutToken,
    #[error("--relay-ip takes at most one IPv4 and one IPv6 address")]
    RelayIps,
    #[error("--server-id")]
    ServerId(#[from] floe_proto::id::IdError),
    #[error("--server-id is longer than {0} characters")]
    ServerIdTooLong(usize),
    #[error("--control-url must be an http(s) URL")]
    ControlUrl,
    #[error("--tls-cert-file and --tls-key-file go together")]
    TlsHalf,
    #[error("TLS: {0}")]
    Tls(String),
}

impl Config {
    /// Loads secrets and checks every value.
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        in_range(
            "--udp-sockets",
            self.udp_sockets as u64,
            0,
            MAX_UDP_SOCKETS as u64,
        )?;
        in_range(
            "--max-tcp-connections",
            self.max_tcp_connections as u64,
            1,
            1_000_000,
        )?;
        in_range(
            "--max-allocations",
            self.max_allocations as u64,
            1,
            1_000_000,
        )?;
        in_range("--max-lifetime-secs", self.max_lifetime_secs, 60, 86_400)?;
        in_range("--nonce-secs", self.nonce_secs, 10, 86_400)?;
        in_range("--usage-interval-secs", self.usage_interval_secs, 1, 300)?;
        in_range("--drain-secs", self.drain_secs, 0, 86_400)?;
        if self.relay_port_min > self.relay_port_max || self.relay_port_min == 0 {
            return Err(ConfigError::PortRange(
                self.relay_port_min,
                self.relay_port_max,
            ));
        }
        let secrets = floe_common::secret::load(
            "TURN secrets",
            self.turn_secrets.as_deref(),
            self.turn_secrets_file.as_deref(),
        )?
        .map(|s| TurnSecrets::parse(&s))
        .transpose()?;
        let internal_token = floe_common::secret::load(
            "internal token",
            self.internal_token.as_deref(),
            self.internal_token_file.as_deref(),
        )?;
        if self.control_url.is_some() != internal_token.is_some() {
            return Err(ConfigError::ControlWithoutToken);
        }
        if let Some(u) = &self.control_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(ConfigError::ControlUrl);
        }
        let v4 = self.relay_ips.iter().filter(|i| i.is_ipv4()).count();
        let v6 = self.relay_ips.len() - v4;
        if v4 > 1 || v6 > 1 {
            return Err(ConfigError::RelayIps);
        }
        let relay_ips = if self.relay_ips.is_empty() {
            let ip = self.listen.ip();
            vec![if ip.is_unspecified() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                ip
            }]
        } else {
            self.relay_ips.clone()
        };
        let server_id = match &self.server_id {
            Some(id) => {
                floe_proto::id::validate("server id", id)?;
                // The meter adds `-` and 8 characters, and the control
                // plane refuses ids over 64.
                if id.len() > MAX_SERVER_ID_LEN {
                    return Err(ConfigError::ServerIdTooLong(MAX_SERVER_ID_LEN));
                }
                id.clone()
            }
            None => floe_common::host_name("turn"),
        };
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                let tls = TlsSettings {
                    listen: self.tls_listen,
                    cert_file: cert.clone(),
                    key_file: key.clone(),
                };
                // Fail now, not at start, on unreadable or bad PEM files.
                crate::tls::acceptor(&tls)?;
                Some(tls)
            }
            (None, None) => None,
            _ => return Err(ConfigError::TlsHalf),
        };
        let alt = match self.alt_ip {
            None => None,
            Some(ip) => {
                let listen = self.listen;
                if listen.ip().is_unspecified()
                    || listen.is_ipv4() != ip.is_ipv4()
                    || listen.ip() == ip
                {
                    return Err(ConfigError::AltIp(ip, listen));
                }
                let port = match (self.alt_port, listen.port()) {
                    (Some(p), l) if p == l && l != 0 => return Err(ConfigError::AltPort(p)),
                    (Some(p), _) => p,
                    (None, 0) => 0,
                    (None, l) => l.checked_add(1).ok_or(ConfigError::AltPort(l))?,
                };
                Some((ip, port))
            }
        };
        Ok(Settings {
            tls,
            listen: self.listen,
            http_listen: self.http_listen,
            alt,
            udp_sockets: self.udp_sockets,
            max_tcp_connections: self.max_tcp_connections,
            realm: self.realm.clone(),
            secrets,
            secrets_file: self.turn_secrets_file.clone(),
            secrets_reload: Duration::from_secs(5),
            control_url: self
                .control_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_owned()),
            internal_token,
            relay_ips,
            external_ip: self.external_ip,
            external_ip_stun: self.external_ip_stun.clone(),
            relay_ports: (self.relay_port_min, self.relay_port_max),
            allow_peers: self.allow_peers.clone(),
            max_allocations: self.max_allocations,
            max_lifetime: Duration::from_secs(self.max_lifetime_secs),
            nonce_lifetime: Duration::from_secs(self.nonce_secs),
            auth_failures_per_min: self.auth_failures_per_min,
            usage_interval: Duration::from_secs(self.usage_interval_secs),
            server_id,
            data_dir: self.data_dir.clone(),
            drain: Duration::from_secs(self.drain_secs),
            kernel_hairpin: self.kernel_hairpin,
        })
    }
}

impl Settings {
    /// Defaults for a server on `listen` (used by `floe dev` and tests).
    pub fn new(listen: SocketAddr, http_listen: SocketAddr) -> Self {
        let relay = if listen.ip().is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            listen.ip()
        };
        Self {
            listen,
            http_listen,
            alt: None,
            udp_sockets: 0,
            max_tcp_connections: 10_000,
            realm: "floe".into(),
            secrets: None,
            secrets_file: None,
            secrets_reload: Duration::from_secs(5),
            control_url: None,
            internal_token: None,
            relay_ips: vec![relay],
            external_ip: None,
            external_ip_stun: None,
            relay_ports: (49_152, 65_535),
            allow_peers: Vec::new(),
            max_allocations: 50_000,
            max_lifetime: Duration::from_secs(3_600),
            nonce_lifetime: Duration::from_secs(600),
            auth_failures_per_min: 30,
            usage_interval: Duration::from_secs(2),
            server_id: floe_common::host_name("turn"),
            data_dir: None,
            drain: Duration::from_secs(30),
            kernel_hairpin: false,
            tls: None,
        }
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

    #[test]
    fn a_server_id_leaves_room_for_the_meters_suffix() {
        let resolve = |id: &str| {
            Cli::try_parse_from(["turn", "--server-id", id])
                .expect("flags parse")
                .config
                .resolve()
        };
        assert!(resolve(&"a".repeat(MAX_SERVER_ID_LEN)).is_ok());
        assert!(matches!(
            resolve(&"a".repeat(MAX_SERVER_ID_LEN + 1)),
            Err(ConfigError::ServerIdTooLong(_))
        ));
    }

    #[test]
    fn discovery_needs_two_addresses_of_one_family() {
        let resolve = |args: &[&str]| {
            let mut all = vec!["turn"];
            all.extend(args);
            Cli::try_parse_from(all)
                .expect("flags parse")
                .config
                .resolve()
        };
        let alt = |args: &[&str]| resolve(args).map(|s| s.alt);
        assert_eq!(
            alt(&["--listen", "203.0.113.10:3478", "--alt-ip", "203.0.113.11"]).ok(),
            Some(Some(("203.0.113.11".parse().expect("ip"), 3479)))
        );
        assert_eq!(
            alt(&["--listen", "127.0.0.1:0", "--alt-ip", "127.0.0.2"]).ok(),
            Some(Some(("127.0.0.2".parse().expect("ip"), 0)))
        );
        for bad in [
            &["--alt-ip", "203.0.113.11"][..],
            &["--listen", "203.0.113.10:3478", "--alt-ip", "203.0.113.10"],
            &["--listen", "203.0.113.10:3478", "--alt-ip", "2001:db8::1"],
        ] {
            assert!(
                matches!(resolve(bad), Err(ConfigError::AltIp(..))),
                "{bad:?}"
            );
        }
        for bad in [
            &[
                "--listen",
                "203.0.113.10:3478",
                "--alt-ip",
                "203.0.113.11",
                "--alt-port",
                "3478",
            ][..],
            &["--listen", "203.0.113.10:65535", "--alt-ip", "203.0.113.11"],
        ] {
            assert!(
                matches!(resolve(bad), Err(ConfigError::AltPort(_))),
                "{bad:?}"
            );
        }
        assert!(
            Cli::try_parse_from(["turn", "--alt-port", "3479"]).is_err(),
            "needs --alt-ip"
        );
    }
}
