//! Presence probes: pairs of peers that stay in their rooms for the whole
//! chaos run, one peer homed on each signal node. Each reconnects as the
//! SDK does (full-jitter backoff from 250 ms, capped at 2 s here, with its
//! reconnect secret), trying its home node first and then the other, as a
//! Service would send it. They answer pings, so the runner can time when
//! signalling works again, and they know whether they are connected, so
//! the runner can compare what rooms list with who is really there.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::join::{join_token, ws_url};

/// What a probe peer's task is asked to do.
enum Cmd {
    /// Send a ping to the partner and answer when its pong arrives.
    Ping(oneshot::Sender<()>),
}

/// One probe peer, as the runner sees it.
struct Peer {
    id: String,
    connected: Arc<AtomicBool>,
    /// Connections of this peer that ended.
    drops: Arc<AtomicU64>,
    cmds: mpsc::Sender<Cmd>,
}

/// The probes of a run.
pub(crate) struct Probes {
    rooms: Vec<(String, [Peer; 2])>,
    key: (String, String),
    signal_urls: [String; 2],
    stop: CancellationToken,
    http: reqwest::Client,
}

impl Probes {
    /// Creates `rooms` rooms of tenant `key` and starts their peers.
    pub async fn start(
        signal_urls: &[String; 2],
        key: (String, String),
        rooms: usize,
    ) -> Result<Self, String> {
        let stop = CancellationToken::new();
        let http = reqwest::Client::new();
        let mut all = Vec::new();
        for r in 0..rooms {
            let room = format!("probe-{r}");
            let token = join_token(&key.0, &key.1, &room, &format!("probe{r}-0"))
                .map_err(|e| e.to_string())?;
            let created = http
                .post(format!("{}/v1/rooms", signal_urls[0]))
                .bearer_auth(&token)
                .json(&json!({"ttl_secs": 86_400}))
                .send()
                .await
                .map_err(|e| format!("create probe room: {e}"))?;
            if !created.status().is_success() {
                return Err(format!("create probe room: {}", created.status()));
            }
            let peers = [0usize, 1].map(|home| {
                let id = format!("probe{r}-{home}");
                let partner = format!("probe{r}-{}", 1 - home);
                let connected = Arc::new(AtomicBool::new(false));
                let drops = Arc::new(AtomicU64::new(0));
                let (cmds, rx) = mpsc::channel(16);
                let token = join_token(&key.0, &key.1, &room, &id).unwrap_or_default();
                let urls = [0, 1].map(|k| {
                    format!(
                        "{}&token={token}",
                        ws_url(&signal_urls[(home + k) % 2], &room, &id)
                    )
                });
                let link = Link {
                    connected: connected.clone(),
                    drops: drops.clone(),
                };
                tokio::spawn(run_peer(urls, partner, link, rx, stop.clone()));
                Peer {
                    id,
                    connected,
                    drops,
                    cmds,
                }
            });
            all.push((room, peers));
        }
        Ok(Self {
            rooms: all,
            key,
            signal_urls: signal_urls.clone(),
            stop,
            http,
        })
    }

    /// Waits (up to `within`) until every probe peer is connected; the
    /// time it took, or `None`.
    pub async fn all_connected(&self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.connected_now() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Whether every probe peer is connected now.
    fn connected_now(&self) -> bool {
        self.rooms
            .iter()
            .flat_map(|(_, p)| p)
            .all(|p| p.connected.load(Ordering::Relaxed))
    }

    /// Connections of probe peers that ended, so far.
    fn drops(&self) -> u64 {
        self.rooms
            .iter()
            .flat_map(|(_, p)| p)
            .map(|p| p.drops.load(Ordering::Relaxed))
            .sum()
    }

    /// One ping from every probe peer to its partner at once; whether
    /// every pong came back within `wait`.
    async fn ping_all(&self, wait: Duration) -> bool {
        let pings = self.rooms.iter().flat_map(|(_, p)| p).map(|p| async move {
            let (tx, rx) = oneshot::channel();
            p.cmds.send(Cmd::Ping(tx)).await.is_ok()
                && matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())))
        });
        futures_util::future::join_all(pings)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// Watches the probes from a fault's start (`t_fault`) until they are
    /// well again: how long until every probe was back in its room, and
    /// until every pair signalled both ways, after the fault first
    /// disturbed each (zero when it did not within 10 s of `injected`,
    /// the fault's end; `None` when not well within 60 s of it).
    pub async fn watch(
        &self,
        t_fault: Instant,
        injected: &CancellationToken,
    ) -> (Option<Duration>, Option<Duration>) {
        let (mut back, mut signalling) = (None, None);
        let (mut left, mut silent) = (false, false);
        let drops_before = self.drops();
        let mut ended: Option<Instant> = None;
        loop {
            let signals = self.ping_all(Duration::from_millis(500)).await;
            let connected = self.connected_now();
            let at = t_fault.elapsed();
            if !connected || self.drops() > drops_before {
                left = true;
            }
            if left && connected {
                back.get_or_insert(at);
            }
            if !signals {
                silent = true;
            } else if silent {
                signalling.get_or_insert(at);
            }
            if injected.is_cancelled() {
                let since = ended.get_or_insert_with(Instant::now).elapsed();
                if since > Duration::from_secs(10) {
                    if !left {
                        back.get_or_insert(Duration::ZERO);
                    }
                    if !silent {
                        signalling.get_or_insert(Duration::ZERO);
                    }
                }
                if since > Duration::from_secs(60) {
                    break;
                }
            }
            if back.is_some() && signalling.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (back, signalling)
    }

    /// Rooms that list a peer that is not connected, or miss one that is:
    /// `(room, listed, connected)` for each, as signal node `node` sees
    /// them.
    pub async fn mismatches(
        &self,
        node: usize,
    ) -> Result<Vec<(String, Vec<String>, Vec<String>)>, String> {
        let listing = list_rooms(&self.http, &self.signal_urls[node], &self.key).await?;
        let listed: HashMap<String, BTreeSet<String>> = listing["rooms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let peers = r["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
                (r["room_id"].as_str().unwrap_or_default().to_owned(), peers)
            })
            .collect();
        let mut bad = Vec::new();
        for (room, peers) in &self.rooms {
            let connected: BTreeSet<String> = peers
                .iter()
                .filter(|p| p.connected.load(Ordering::Relaxed))
                .map(|p| p.id.clone())
                .collect();
            let shown = listed.get(room).cloned().unwrap_or_default();
            if shown != connected {
                bad.push((
                    room.clone(),
                    shown.into_iter().collect(),
                    connected.into_iter().collect(),
                ));
            }
        }
        Ok(bad)
    }
}

/// `GET /v1/rooms` of the key's tenant on the signal node at `base`.
pub(crate) async fn list_rooms(
    http: &reqwest::Client,
    base: &str,
    key: &(String, String),
) -> Result<Value, String> {
    http.get(format!("{base}/v1/rooms"))
        .basic_auth(&key.0, Some(&key.1))
        .send()
        .await
        .map_err(|e| format!("list rooms: {e}"))?
        .json()
        .await
        .map_err(|e| format!("list rooms: {e}"))
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a probe peer's task tells the runner about its connection.
struct Link {
    connected: Arc<AtomicBool>,
    drops: Arc<AtomicU64>,
}

impl Link {
    fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }

    fn down(&self) {
        if self.connected.swap(false, Ordering::Relaxed) {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Keeps one probe peer in its room until `stop`.
async fn run_peer(
    urls: [String; 2],
    partner: String,
    link: Link,
    mut cmds: mpsc::Receiver<Cmd>,
    stop: CancellationToken,
) {
    let mut secret = String::new();
    let mut attempt = 0u32;
    let mut pending: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut n = 0u64;
    while !stop.is_cancelled() {
        if attempt > 0 {
            let cap_ms = 2_000f64.min(250.0 * 2f64.powi(attempt.min(8) as i32));
            let wait = Duration::from_secs_f64(rand::random::<f64>() * cap_ms / 1_000.0);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let base = &urls[(attempt as usize) % 2];
        let url = if secret.is_empty() {
            base.clone()
        } else {
            format!("{base}&reconnect_secret={secret}")
        };
        attempt += 1;
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            continue;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = ws.close(None).await;
                    link.down();
                    return;
                }
                cmd = cmds.recv() => {
                    let Some(Cmd::Ping(done)) = cmd else { return };
                    // Pings whose asker gave up wait no longer.
                    pending.retain(|(_, tx)| !tx.is_closed());
                    n += 1;
                    let ping = json!({"type": "signal", "to": partner, "payload": {"ping": n}});
                    if ws.send(Message::text(ping.to_string())).await.is_err() {
                        break;
                    }
                    pending.push((n, done));
                }
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    let Ok(m) = serde_json::from_str::<Value>(&text) else { continue };
                    match m["type"].as_str() {
                        Some("welcome") => {
                            secret = m["reconnect_secret"].as_str().unwrap_or_default().to_owned();
                            link.up();
                            attempt = 0;
                        }
                        Some("signal") => {
                            if let Some(k) = m["payload"]["ping"].as_u64() {
                                let pong = json!({"type": "signal", "to": m["from"], "payload": {"pong": k}});
                                let _ = ws.send(Message::text(pong.to_string())).await;
                            } else if let Some(k) = m["payload"]["pong"].as_u64()
                                && let Some(i) = pending.iter().position(|(p, _)| *p == k)
                            {
                                let (_, done) = pending.swap_remove(i);
                                let _ = done.send(());
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        link.down();
        pending.clear();
        if attempt == 0 {
            attempt = 1;
        }
    }
}
