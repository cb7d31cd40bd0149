//! The running TURN server as the rest of the process sees it: the
//! shards ([`crate::driver`], each around a [`crate::core::Core`]) and
//! what they share, with the orders that reach all of them (new
//! enforcement, new secrets, usage cuts, the final close).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use floe_common::Check;
use floe_proto::credential::TurnSecrets;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::core::Shared;
use crate::driver::{self, Control, ShardHandle};
use crate::meter::Meter;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::server::Discovery;
use crate::workers::{Packing, Pool};

/// The TURN server shared by every task of the process.
pub(crate) struct Turn {
    shared: Arc<Shared>,
    /// The TURN secrets in use (reloaded from their file).
    secrets: Mutex<Option<Arc<TurnSecrets>>>,
    /// What the control plane last said; `None` until it (or a saved
    /// copy) is known. Held while shards start, so none misses an update.
    policy: Mutex<Option<Arc<Policy>>>,
    shards: OnceLock<Vec<ShardHandle>>,
    pool: Mutex<Option<Pool>>,
    /// Fails (and with it liveness) when a shard's thread ends unasked.
    shards_alive: Check,
}

/// `turn.settings`, `turn.metrics`, `turn.meter`: the shared parts.
impl std::ops::Deref for Turn {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Turn {
    /// `shards_alive` is the vital health check the shards fail if one
    /// of them dies.
    pub fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        meter: Arc<Meter>,
        shards_alive: Check,
    ) -> Self {
        let secrets = settings.secrets.clone().map(Arc::new);
        Self {
            shared: Arc::new(Shared::new(settings, metrics, meter)),
            secrets: Mutex::new(secrets),
            policy: Mutex::default(),
            shards: OnceLock::new(),
            pool: Mutex::default(),
            shards_alive,
        }
    }

    /// Starts a shard on each UDP socket of the listening address.
    pub fn spawn_shards(
        &self,
        sockets: Vec<std::net::UdpSocket>,
        discovery: Option<Arc<Discovery>>,
    ) -> std::io::Result<()> {
        self.spawn_packed_shards(sockets, discovery, Packing::default())
    }

    /// [`Self::spawn_shards`], with `packing` deciding their threads.
    pub(crate) fn spawn_packed_shards(
        &self,
        sockets: Vec<std::net::UdpSocket>,
        discovery: Option<Arc<Discovery>>,
        packing: Packing,
    ) -> std::io::Result<()> {
        let policy = lock(&self.policy);
        let secrets = lock(&self.secrets).clone();
        let (handles, pool) = driver::spawn(
            &self.shared,
            sockets,
            discovery,
            secrets,
            policy.clone(),
            &self.shards_alive,
            packing,
        )?;
        if self.shards.set(handles).is_err() {
            return Err(std::io::Error::other("TURN shards started twice"));
        }
        *lock(&self.pool) = Some(pool);
        Ok(())
    }

    fn shards(&self) -> &[ShardHandle] {
        self.shards.get().map_or(&[], Vec::as_slice)
    }

    /// The shard serving stream connections from `from`.
    pub fn shard_for(&self, from: SocketAddr) -> Option<&ShardHandle> {
        let shards = self.shards();
        if shards.is_empty() {
            return None;
        }
        let h = from.port().wrapping_mul(31).wrapping_add(match from.ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[3].into(),
            std::net::IpAddr::V6(ip) => ip.octets()[15].into(),
        });
        shards.get(usize::from(h) % shards.len())
    }

    /// The TURN secrets in use.
    pub fn secrets(&self) -> Option<Arc<TurnSecrets>> {
        lock(&self.secrets).clone()
    }

    /// Puts new TURN secrets in use (credentials under a kid they no
    /// longer hold are refused from the next request).
    pub fn replace_secrets(&self, secrets: TurnSecrets) {
        let secrets = Arc::new(secrets);
        let mut held = lock(&self.secrets);
        *held = Some(secrets.clone());
        for s in self.shards() {
            s.control(Control::Secrets(secrets.clone()));
        }
    }

    /// Applies new enforcement state: every shard closes the allocations
    /// it no longer allows and refuses them from now on.
    pub fn apply_policy(&self, policy: Policy) {
        let policy = Arc::new(policy);
        let mut held = lock(&self.policy);
        *held = Some(policy.clone());
        for s in self.shards() {
            s.control(Control::Policy(policy.clone()));
        }
    }

    /// Sends `order` to every shard and waits until all have carried it out.
    async fn everywhere(&self, order: fn(oneshot::Sender<()>) -> Control) {
        let mut waits = Vec::new();
        for s in self.shards() {
            let (tx, rx) = oneshot::channel();
            s.control(order(tx));
            waits.push(rx);
        }
        for w in waits {
            let _ = w.await;
        }
    }

    /// Moves every allocation's unreported traffic into the meter.
    pub async fn collect(&self) {
        self.everywhere(Control::Collect).await;
    }

    /// Closes every allocation (the server is stopping).
    pub async fn close_all(&self) {
        self.everywhere(Control::CloseAll).await;
    }

    /// Stops the shards and waits for their threads.
    pub async fn stop(&self) {
        let pool = lock(&self.pool).take();
        if let Some(pool) = pool {
            let _ = tokio::task::spawn_blocking(move || pool.stop()).await;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A server on 127.0.0.1 with one shard (its UDP socket bound to a
    /// free port, returned), default policy, for driving by hand.
    pub(crate) fn server() -> (Arc<Turn>, SocketAddr) {
        let (turn, addr, _) = server_with_health();
        (turn, addr)
    }

    /// [`server`], with the health its shards report to.
    pub(crate) fn server_with_health() -> (Arc<Turn>, SocketAddr, floe_common::Health) {
        server_on(1, Packing::default())
    }

    /// A STUN Binding request with a fresh transaction id.
    pub(crate) fn binding_request() -> Vec<u8> {
        let mut m = stun::message::Message::new();
        m.build(&[
            Box::new(stun::message::BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        m.raw
    }

    /// A server with `shards` shards on one free port, packed onto
    /// threads by `packing`.
    fn server_on(shards: usize, packing: Packing) -> (Arc<Turn>, SocketAddr, floe_common::Health) {
        let mut s = Settings::new(
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        );
        s.secrets = Some(TurnSecrets::parse("k1=0123456789abcdef0").expect("secrets"));
        let meter = Arc::new(Meter::open("test", None).expect("meter"));
        let metrics = Arc::new(Metrics::new(s.max_allocations, 16_384));
        let health = floe_common::Health::new("turn");
        let alive = health.vital("shards", true);
        let turn = Arc::new(Turn::new(s, metrics, meter, alive));
        turn.apply_policy(Policy::default());
        let first = crate::server::udp_socket("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = first.local_addr().expect("addr");
        let mut udp = vec![first];
        for _ in 1..shards {
            udp.push(crate::server::udp_socket(addr).expect("bind the group"));
        }
        turn.spawn_packed_shards(udp, None, packing)
            .expect("shards");
        (turn, addr, health)
    }

    /// A shard whose thread dies (a panic here) fails liveness and its
    /// gauge; one stopped on purpose does neither.
    #[test]
    fn a_dead_shard_fails_liveness() {
        let (turn, _, health) = server_with_health();
        assert_eq!(turn.metrics.shards_running.get(), 1);
        turn.shards()[0].control(Control::Crash);
        for _ in 0..500 {
            if !health.dead().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(health.dead(), vec!["shards"]);
        assert_eq!(turn.metrics.shards_running.get(), 0);

        let (turn, _, health) = server_with_health();
        lock(&turn.pool).take().expect("pool").stop();
        assert_eq!(turn.metrics.shards_running.get(), 0);
        assert!(health.dead().is_empty(), "asked to stop: not a death");
    }

    /// Shards moving between threads all the time (a packing that splits
    /// a shared thread and packs separate ones every 5 ms) answer every
    /// request that reaches them, from clients spread over all shards.
    #[test]
    fn shards_serve_while_they_move() {
        let flapping = Packing {
            period: std::time::Duration::from_millis(5),
            split: -1.0,
            backlog: 0,
            behind: 0,
            merge: f64::INFINITY,
            merge_after: 1,
        };
        let (turn, addr, health) = server_on(3, flapping);
        let clients: Vec<std::net::UdpSocket> = (0..12)
            .map(|_| {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
                c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .expect("timeout");
                c
            })
            .collect();
        let started = std::time::Instant::now();
        let mut answered = 0u32;
        for round in 0u32..20_000 {
            if turn.metrics.shard_moves.get() >= 60 && round >= 500
                || started.elapsed() > std::time::Duration::from_secs(20)
            {
                break;
            }
            let client = &clients[round as usize % clients.len()];
            let req = binding_request();
            client.send_to(&req, addr).expect("send");
            let mut buf = [0u8; 512];
            let n = client
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("request {round} unanswered: {e}"));
            assert_eq!(&buf[..2], &[1, 1], "a Binding success");
            assert_eq!(&buf[8..20], &req[8..20], "to request {round}");
            assert!(n > 20);
            answered += 1;
        }
        let moves = turn.metrics.shard_moves.get();
        assert!(moves >= 60, "only {moves} moves in {answered} requests");
        assert_eq!(turn.metrics.shards_running.get(), 3);
        lock(&turn.pool).take().expect("pool").stop();
        assert!(health.dead().is_empty());
    }
}
