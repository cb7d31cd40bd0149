//! Usage metering: traffic deltas gathered from allocations, cut into
//! batches keyed by (server id, sequence), queued until the control plane
//! acknowledges them. With a data folder the queue and the sequence
//! survive restarts, so a batch is neither lost nor counted twice: a
//! re-sent batch keeps its sequence and the control plane drops the copy.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use floe_proto::usage::{MAX_BATCH_RECORDS, UsageBatch, UsageRecord};
use serde::{Deserialize, Serialize};

use crate::allocation::Traffic;

/// Queue length past which a long control-plane outage is logged loudly
/// (batches are never dropped: they carry bills).
const LONG_OUTAGE: usize = 1_000;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Spool {
    server_id: String,
    next_seq: u64,
    pending: VecDeque<UsageBatch>,
}

/// Traffic not yet cut into a batch, by (tenant, room).
type Unbatched = BTreeMap<(String, String), Traffic>;

/// The usage queue of one TURN server.
pub(crate) struct Meter {
    path: Option<PathBuf>,
    state: Mutex<(Spool, Unbatched)>,
}

/// The spool file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("usage spool {path}: {message}")]
pub struct SpoolError {
    pub path: String,
    pub message: String,
}

impl Meter {
    /// Opens the spool in `dir` (creating it), or keeps everything in
    /// memory without one. Without a folder the server id gets a random
    /// suffix, so a restarted process never reuses sequence numbers.
    pub fn open(server_id: &str, dir: Option<&Path>) -> Result<Self, SpoolError> {
        let Some(dir) = dir else {
            let spool = Spool {
                server_id: format!("{server_id}-{}", floe_common::secret::random_token(4)),
                next_seq: 1,
                pending: VecDeque::new(),
            };
            return Ok(Self {
                path: None,
                state: Mutex::new((spool, BTreeMap::new())),
            });
        };
        let path = dir.join("usage-spool.json");
        let err = |m: String| SpoolError {
            path: path.display().to_string(),
            message: m,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let spool = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Spool {
                server_id: server_id.to_owned(),
                next_seq: 1,
                pending: VecDeque::new(),
            },
            Err(e) => return Err(err(e.to_string())),
        };
        if !spool.pending.is_empty() {
            tracing::info!(
                batches = spool.pending.len(),
                "unacknowledged usage batches found; re-sending"
            );
        }
        let meter = Self {
            path: Some(path),
            state: Mutex::new((spool, BTreeMap::new())),
        };
        meter.persist()?;
        Ok(meter)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Spool, Unbatched)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn server_id(&self) -> String {
        self.lock().0.server_id.clone()
    }

    fn persist(&self) -> Result<(), SpoolError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let json = serde_json::to_vec(&self.lock().0).map_err(|e| SpoolError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| SpoolError {
                path: path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// Adds traffic of (tenant, room) to the next batch.
    pub fn add(&self, tenant: &str, room: &str, t: Traffic) {
        if t.is_zero() {
            return;
        }
        let mut s = self.lock();
        let e = s.1.entry((tenant.to_owned(), room.to_owned())).or_default();
        e.bytes_out += t.bytes_out;
        e.bytes_in += t.bytes_in;
        e.packets_out += t.packets_out;
        e.packets_in += t.packets_in;
    }

    /// Turns what was added into a batch (if anything) and persists the
    /// queue. Returns whether a batch was cut.
    pub fn cut(&self, now: u64) -> Result<bool, SpoolError> {
        {
            let mut s = self.lock();
            if s.1.is_empty() {
                return Ok(false);
            }
            let mut records: Vec<UsageRecord> = std::mem::take(&mut s.1)
                .into_iter()
                .map(|((tenant, room), t)| UsageRecord {
                    tenant,
                    room,
                    bytes_out: t.bytes_out,
                    bytes_in: t.bytes_in,
                    packets_out: t.packets_out,
                    packets_in: t.packets_in,
                })
                .collect();
            let spool = &mut s.0;
            if spool.pending.len() == LONG_OUTAGE {
                tracing::error!(
                    batches = LONG_OUTAGE,
                    "usage batches piling up: the control plane has been unreachable for long"
                );
            }
            // One batch per MAX_BATCH_RECORDS records: the control plane
            // refuses larger ones.
            while !records.is_empty() {
                let rest = records.split_off(records.len().min(MAX_BATCH_RECORDS));
                let batch = UsageBatch {
                    server_id: spool.server_id.clone(),
                    seq: spool.next_seq,
                    at: now,
                    records: std::mem::replace(&mut records, rest),
                };
                spool.next_seq += 1;
                spool.pending.push_back(batch);
            }
        }
        self.persist()?;
        Ok(true)
    }

    /// The oldest unacknowledged batch.
    pub fn oldest(&self) -> Option<UsageBatch> {
        self.lock().0.pending.front().cloned()
    }

    /// Drops batch `seq` after the control plane acknowledged it.
    pub fn acked(&self, seq: u64) -> Result<(), SpoolError> {
        self.lock().0.pending.retain(|b| b.seq != seq);
        self.persist()
    }

    pub fn pending(&self) -> usize {
        self.lock().0.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(n: u64) -> Traffic {
        Traffic {
            bytes_out: n,
            bytes_in: 2 * n,
            packets_out: 1,
            packets_in: 1,
        }
    }

    #[test]
    fn batches_accumulate_sequence_and_survive_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Meter::open("turn-a", Some(dir.path())).expect("open");
        assert!(!m.cut(1).expect("cut"), "nothing to report");
        m.add("t", "r", traffic(10));
        m.add("t", "r", traffic(5));
        m.add("t", "other", traffic(1));
        m.add("t", "r", Traffic::default());
        assert!(m.cut(100).expect("cut"));
        m.add("u", "r", traffic(7));
        assert!(m.cut(101).expect("cut"));
        let first = m.oldest().expect("batch");
        assert_eq!(
            (first.server_id.as_str(), first.seq, first.records.len()),
            ("turn-a", 1, 2)
        );
        let r = first
            .records
            .iter()
            .find(|r| r.room == "r")
            .expect("room r");
        assert_eq!((r.bytes_out, r.bytes_in, r.packets_out), (15, 30, 2));
        drop(m);

        // A restart finds both batches and continues the sequence.
        let m = Meter::open("turn-a", Some(dir.path())).expect("reopen");
        assert_eq!(m.pending(), 2);
        m.acked(1).expect("ack");
        assert_eq!(m.oldest().map(|b| b.seq), Some(2));
        m.add("t", "r", traffic(1));
        m.cut(102).expect("cut");
        m.acked(2).expect("ack");
        assert_eq!(m.oldest().map(|b| b.seq), Some(3));
    }

    /// A cut with more (tenant, room) pairs than the control plane takes
    /// in one batch becomes several batches, nothing lost.
    #[test]
    fn a_large_cut_is_split_into_batches_the_control_plane_takes() {
        let m = Meter::open("turn-a", None).expect("open");
        let rooms = MAX_BATCH_RECORDS * 2 + 5;
        for r in 0..rooms {
            m.add("t", &format!("r{r}"), traffic(1));
        }
        assert!(m.cut(1).expect("cut"));
        let mut sizes = Vec::new();
        while let Some(b) = m.oldest() {
            assert!(b.records.len() <= MAX_BATCH_RECORDS);
            sizes.push((b.seq, b.records.len()));
            m.acked(b.seq).expect("ack");
        }
        let seq1 = sizes[0].0;
        assert_eq!(
            sizes,
            [
                (seq1, MAX_BATCH_RECORDS),
                (seq1 + 1, MAX_BATCH_RECORDS),
                (seq1 + 2, 5)
            ]
        );
    }

    #[test]
    fn without_a_folder_the_server_id_is_unique_per_process() {
        let a = Meter::open("turn", None).expect("open");
        let b = Meter::open("turn", None).expect("open");
        assert_ne!(a.server_id(), b.server_id());
        assert!(a.server_id().starts_with("turn-"));
    }
}
