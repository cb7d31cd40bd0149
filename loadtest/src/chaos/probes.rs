//! Presence probes: pairs of peers that stay in their rooms for the whole
//! chaos run, one peer homed on each signal node. Each reconnects as the
//! SDK does (full-jitter backoff from 250 ms, capped at 2 s here, with its
//! reconnect secret), trying its home node first and then the other, as a
//! Service would send it. They answer pings, so the runner can time when
//! signalling works again, and they know whether they are connected, so
//! the runner can compare what rooms list with who is really there.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
                let (cmds, rx) = mpsc::channel(16);
                let token = join_token(&key.0, &key.1, &room, &id).unwrap_or_default();
                let urls = [0, 1].map(|k| {
                    format!(
                        "{}&token={token}",
                        ws_url(&signal_urls[(home + k) % 2], &room, &id)
                    )
                });
                tokio::spawn(run_peer(urls, partner, connected.clone(), rx, stop.clone()));
                Peer {
                    id,
                    connected,
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
            let all = self
                .rooms
                .iter()
                .flat_map(|(_, p)| p)
                .all(|p| p.connected.load(Ordering::Relaxed));
            if all {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Waits (up to `within`) until every pair has traded a ping and a
    /// pong both ways; the time it took, or `None`.
    pub async fn all_signalling(&self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        for (_, peers) in &self.rooms {
            for p in peers {
                loop {
                    let left = within.checked_sub(started.elapsed())?;
                    let (tx, rx) = oneshot::channel();
                    if p.cmds.send(Cmd::Ping(tx)).await.is_err() {
                        return None;
                    }
                    let wait = left.min(Duration::from_secs(1));
                    if matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(()))) {
                        break;
                    }
                }
            }
        }
        Some(started.elapsed())
    }

    /// Rooms that list a peer that is not connected, or miss one that is:
    /// `(room, listed, connected)` for each, as signal node `node` sees
    /// them.
    pub async fn mismatches(
        &self,
        node: usize,
    ) -> Result<Vec<(String, Vec<String>, Vec<String>)>, String> {
        let listing: Value = self
            .http
            .get(format!("{}/v1/rooms", self.signal_urls[node]))
            .basic_auth(&self.key.0, Some(&self.key.1))
            .send()
            .await
            .map_err(|e| format!("list rooms: {e}"))?
            .json()
            .await
            .map_err(|e| format!("list rooms: {e}"))?;
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

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps one probe peer in its room until `stop`.
async fn run_peer(
    urls: [String; 2],
    partner: String,
    connected: Arc<AtomicBool>,
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
                    connected.store(false, Ordering::Relaxed);
                    return;
                }
                cmd = cmds.recv() => {
                    let Some(Cmd::Ping(done)) = cmd else { return };
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
                            connected.store(true, Ordering::Relaxed);
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
        connected.store(false, Ordering::Relaxed);
        pending.clear();
        if attempt == 0 {
            attempt = 1;
        }
    }
}
