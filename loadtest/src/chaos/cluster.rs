//! The deployment a chaos run drives: a Redis with an append-only file,
//! two control-plane replicas on it, two signal nodes on it (the second
//! through a path the runner can cut), and two TURN servers with data
//! dirs, all separate `floe` processes on loopback. Signal and TURN reach
//! the control plane through the runner's balancer ([`super::lb`]), as
//! they would through a Kubernetes Service.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use floe_common::netfault::TcpFault;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::lb::Lb;

/// Tokens and secrets of the run (loopback only).
pub(crate) const ADMIN: &str = "chaos-admin-token-0123456789";
const INTERNAL: &str = "chaos-internal-token-0123456789";
const TURN_SECRETS: &str = "k1=chaos-turn-secret-0123456789";

/// One process of the deployment, restartable with the same arguments.
pub(crate) struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Where readiness is asked: an HTTP `/readyz`, or a Redis PING.
    ready: Ready,
    /// Its Prometheus page, if it has one.
    pub metrics_url: Option<String>,
}

enum Ready {
    Http(String),
    Redis(SocketAddr),
}

impl Proc {
    fn new(name: &str, program: &Path, args: Vec<String>, dir: &Path, ready: Ready) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_owned(),
            args,
            log: dir.join("logs").join(format!("{name}.log")),
            child: None,
            ready,
            metrics_url: None,
        }
    }

    /// Starts the process (its output appended to its log).
    fn spawn(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot start {} ({}): {e}",
                        self.name,
                        self.program.display()
                    ),
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `within` for a graceful exit (SIGKILL
    /// after that).
    pub async fn terminate(&mut self, within: Duration) {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while let Some(c) = self.child.as_mut() {
            if matches!(c.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn pause(&self, stop: bool) {
        self.signal(if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        });
    }

    /// Waits until it answers ready.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| e.to_string())?;
        loop {
            let ok = match &self.ready {
                Ready::Http(url) => {
                    matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
                }
                Ready::Redis(addr) => redis_ping(*addr).await,
            };
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not ready within {within:?} (log: {})",
                    self.name,
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The relayed totals (out, in) a TURN server logged as it stopped
    /// last.
    pub fn exit_totals(&self) -> Option<(u64, u64)> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        log.lines().rev().find_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            v["message"]
                .as_str()?
                .starts_with("stopped: relayed bytes")
                .then(|| Some((v["relayed_out"].as_u64()?, v["relayed_in"].as_u64()?)))?
        })
    }

    /// (Re)starts it and waits until it is ready.
    pub async fn start(&mut self) -> Result<(), String> {
        self.spawn().map_err(|e| e.to_string())?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// `kill -9`, `pause`, start again.
    pub async fn kill_and_restart(&mut self, pause: Duration) -> Result<(), String> {
        self.kill();
        tokio::time::sleep(pause).await;
        self.start().await
    }

    /// SIGTERM (see [`Proc::terminate`]), start again.
    pub async fn terminate_and_restart(&mut self, within: Duration) -> Result<(), String> {
        self.terminate(within).await;
        self.start().await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A paused process would not die of SIGKILL until continued.
        self.pause(false);
        self.kill();
    }
}

/// Whether a Redis at `addr` answers PING.
async fn redis_ping(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

/// A port free on loopback now (for TCP and UDP alike, as TURN needs).
fn free_port() -> std::io::Result<u16> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port on loopback"))
}

/// Timing knobs of the deployment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub usage_interval_secs: u64,
    pub node_beat_ms: u64,
    pub node_dead_after_ms: u64,
}

/// The running deployment.
pub(crate) struct Cluster {
    pub redis: Proc,
    pub controls: [Proc; 2],
    pub signals: [Proc; 2],
    pub turns: [Proc; 2],
    pub lb: Lb,
    /// The second signal node's path to Redis.
    pub redis_path: TcpFault,
    pub control_url: String,
    pub signal_urls: [String; 2],
    http: reqwest::Client,
}

impl Cluster {
    /// Starts everything under `dir`, with `floe` and `redis_server` as
    /// the programs; returns once every process answers ready.
    pub async fn start(
        floe: &Path,
        redis_server: &Path,
        dir: &Path,
        timing: Timing,
    ) -> Result<Self, String> {
        let io = |e: std::io::Error| e.to_string();
        for sub in ["logs", "redis", "turn-0", "turn-1"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io)?;
        }
        let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let port = || free_port().map_err(io);

        let redis_port = port()?;
        let redis_addr: SocketAddr = ([127, 0, 0, 1], redis_port).into();
        let mut redis = Proc::new(
            "redis",
            redis_server,
            s(&[
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir.join("redis").display().to_string(),
                // The ledger lives here: every write on disk before its
                // answer, as a production control-plane Redis should be.
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]),
            dir,
            Ready::Redis(redis_addr),
        );
        redis.start().await?;
        let redis_url = format!("redis://{redis_addr}");
        let redis_path = TcpFault::start("127.0.0.1:0".parse().map_err(|_| "addr")?, redis_addr)
            .await
            .map_err(io)?;

        let turn_ports = [port()?, port()?];
        let turn_urls: Vec<String> = turn_ports
            .iter()
            .map(|p| format!("turn:127.0.0.1:{p}?transport=udp"))
            .collect();
        let mut control_addrs = Vec::new();
        let controls = [0, 1].map(|i| {
            let p = free_port().unwrap_or(0);
            control_addrs.push(format!("http://127.0.0.1:{p}"));
            let mut args = s(&[
                "control-plane",
                "--log-format",
                "json",
                "--listen",
                &format!("127.0.0.1:{p}"),
                "--store",
                &redis_url,
                "--redis-prefix",
                "chaos:cp:",
                "--admin-token",
                ADMIN,
                "--internal-token",
                INTERNAL,
                "--turn-secrets",
                TURN_SECRETS,
                "--stun-url",
                &format!("stun:127.0.0.1:{}", turn_ports[0]),
                "--enforcement-refresh-ms",
                "500",
            ]);
            for u in &turn_urls {
                args.extend(s(&["--turn-url", u]));
            }
            let mut p = Proc::new(
                &format!("control-{i}"),
                floe,
                args,
                dir,
                Ready::Http(format!("http://127.0.0.1:{p}/readyz")),
            );
            p.metrics_url = Some(format!("{}/metrics", control_addrs[i]));
            p
        });
        let lb = Lb::start(control_addrs.clone()).await.map_err(io)?;
        let control_url = format!("http://{}", lb.addr());

        let mut signal_urls = Vec::new();
        let signals = [0, 1].map(|i| {
            let (p, ops) = (free_port().unwrap_or(0), free_port().unwrap_or(0));
            signal_urls.push(format!("http://127.0.0.1:{p}"));
            let redis = if i == 0 {
                redis_url.clone()
            } else {
                format!("redis://{}", redis_path.addr())
            };
            let mut proc = Proc::new(
                &format!("signal-{i}"),
                floe,
                s(&[
                    "signal",
                    "--log-format",
                    "json",
                    "--listen",
                    &format!("127.0.0.1:{p}"),
                    "--ops-listen",
                    &format!("127.0.0.1:{ops}"),
                    "--control-url",
                    &control_url,
                    "--internal-token",
                    INTERNAL,
                    "--redis-url",
                    &redis,
                    "--redis-prefix",
                    "chaos:sig:",
                    "--node-id",
                    &format!("signal-{i}"),
                    "--node-beat-ms",
                    &timing.node_beat_ms.to_string(),
                    "--node-dead-after-ms",
                    &timing.node_dead_after_ms.to_string(),
                    "--max-connections-per-ip",
                    "100000",
                    "--public-rooms-per-min",
                    "100000",
                ]),
                dir,
                Ready::Http(format!("http://127.0.0.1:{ops}/readyz")),
            );
            proc.metrics_url = Some(format!("http://127.0.0.1:{ops}/metrics"));
            proc
        });
        // Relay ranges of 2,000 ports each, apart, below the kernel's
        // ephemeral range (32768+) that port-0 binds draw from.
        let relay_base = 20_000 + rand::random::<u16>() % 5 * 2_000;
        let turns = [0, 1].map(|i| {
            let http = free_port().unwrap_or(0);
            let relay_min = relay_base + 2_000 * i as u16;
            let mut proc = Proc::new(
                &format!("turn-{i}"),
                floe,
                s(&[
                    "turn",
                    "--log-format",
                    "json",
                    "--listen",
                    &format!("127.0.0.1:{}", turn_ports[i]),
                    "--http-listen",
                    &format!("127.0.0.1:{http}"),
                    "--turn-secrets",
                    TURN_SECRETS,
                    "--control-url",
                    &control_url,
                    "--internal-token",
                    INTERNAL,
                    "--relay-ip",
                    "127.0.0.1",
                    "--relay-port-min",
                    &relay_min.to_string(),
                    "--relay-port-max",
                    &(relay_min + 1_999).to_string(),
                    "--allow-peer",
                    "127.0.0.0/8",
                    "--usage-interval-secs",
                    &timing.usage_interval_secs.to_string(),
                    "--server-id",
                    &format!("chaos-turn-{i}"),
                    "--data-dir",
                    &dir.join(format!("turn-{i}")).display().to_string(),
                    "--drain-secs",
                    "2",
                ]),
                dir,
                Ready::Http(format!("http://127.0.0.1:{http}/readyz")),
            );
            proc.metrics_url = Some(format!("http://127.0.0.1:{http}/metrics"));
            proc
        });
        let mut cluster = Self {
            redis,
            controls,
            signals,
            turns,
            lb,
            redis_path,
            control_url,
            signal_urls: [signal_urls[0].clone(), signal_urls[1].clone()],
            http: reqwest::Client::new(),
        };
        for p in cluster
            .controls
            .iter_mut()
            .chain(&mut cluster.signals)
            .chain(&mut cluster.turns)
        {
            p.start().await?;
        }
        Ok(cluster)
    }

    /// TURN server `i`'s metrics page.
    pub async fn turn_page(&self, i: usize) -> Option<String> {
        let url = self.turns[i].metrics_url.as_ref()?;
        self.http.get(url).send().await.ok()?.text().await.ok()
    }

    /// Relayed bytes TURN server `i` metered since it started: (out, in).
    pub async fn turn_totals(&self, i: usize) -> Option<(u64, u64)> {
        Some(relayed_totals(&self.turn_page(i).await?))
    }

    /// Usage batches TURN server `i` holds unacknowledged.
    pub async fn turn_pending(&self, i: usize) -> Option<u64> {
        metric(&self.turn_page(i).await?, "floe_turn_usage_batches_pending").map(|v| v as u64)
    }

    /// The ledger's totals for `tenant`: (out, in).
    pub async fn ledger(&self, tenant: &str) -> Option<(u64, u64)> {
        let v: Value = self
            .http
            .get(format!("{}/v1/tenants/{tenant}/usage", self.control_url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some((
            v["total"]["bytes_out"].as_u64()?,
            v["total"]["bytes_in"].as_u64()?,
        ))
    }

    /// Every process, for sampling.
    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        std::iter::once(&self.redis)
            .chain(&self.controls)
            .chain(&self.signals)
            .chain(&self.turns)
    }

    /// Creates tenant `id` (TURN on) with an API key; returns (key id,
    /// secret).
    pub async fn tenant(&self, id: &str) -> Result<(String, String), String> {
        let url = |p: &str| format!("{}{p}", self.control_url);
        let r = self
            .http
            .post(url("/v1/tenants"))
            .bearer_auth(ADMIN)
            .json(&json!({"id": id, "name": id, "plan": {"turn": true}}))
            .send()
            .await
            .map_err(|e| format!("create tenant: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("create tenant: {}", r.status()));
        }
        let key: Value = self
            .http
            .post(url(&format!("/v1/tenants/{id}/keys")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .map_err(|e| format!("create key: {e}"))?
            .json()
            .await
            .map_err(|e| format!("create key: {e}"))?;
        match (key["id"].as_str(), key["secret"].as_str()) {
            (Some(k), Some(s)) => Ok((k.to_owned(), s.to_owned())),
            _ => Err(format!("create key: {key}")),
        }
    }
}

/// Relayed bytes a TURN metrics page counts over all tenants: (out, in).
pub(crate) fn relayed_totals(page: &str) -> (u64, u64) {
    let mut totals = (0, 0);
    for line in page
        .lines()
        .filter(|l| l.starts_with("floe_turn_relayed_bytes_total{"))
    {
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if line.contains("direction=\"out\"") {
            totals.0 += v as u64;
        } else if line.contains("direction=\"in\"") {
            totals.1 += v as u64;
        }
    }
    totals
}

/// The value of an unlabelled metric on a Prometheus page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_totals_sum_every_tenant_by_direction() {
        let page = "# HELP floe_turn_relayed_bytes_total x\n\
            floe_turn_relayed_bytes_total{direction=\"in\",tenant=\"a\"} 10\n\
            floe_turn_relayed_bytes_total{direction=\"out\",tenant=\"a\"} 12\n\
            floe_turn_relayed_bytes_total{direction=\"out\",tenant=\"b\"} 30\n\
            floe_turn_relayed_packets_total{direction=\"out\",tenant=\"b\"} 3\n\
            floe_turn_usage_batches_pending 2\n";
        assert_eq!(relayed_totals(page), (42, 10));
        assert_eq!(metric(page, "floe_turn_usage_batches_pending"), Some(2.0));
    }

    #[test]
    fn exit_totals_come_from_the_last_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Proc::new(
            "turn-0",
            Path::new("floe"),
            Vec::new(),
            dir.path(),
            Ready::Http(String::new()),
        );
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
        let stop = |out: u64| {
            format!(
                "{{\"level\":\"INFO\",\"message\":\"stopped: relayed bytes metered since start\",\"relayed_out\":{out},\"relayed_in\":{}}}\n",
                out / 2
            )
        };
        assert_eq!(p.exit_totals(), None);
        std::fs::write(
            &p.log,
            format!(
                "{}not json\n{}{{\"message\":\"TURN server stopped\"}}\n",
                stop(10),
                stop(40)
            ),
        )
        .expect("log");
        assert_eq!(p.exit_totals(), Some((40, 20)));
    }
}
