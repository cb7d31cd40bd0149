//! Usage metering: traffic deltas gathered from allocations, cut into
//! batches keyed by (server id, sequence), queued until the control plane
//! acknowledges them. With a data folder the queue survives restarts, so a
//! batch is neither lost nor counted twice: a re-sent batch keeps its id
//! and sequence and the control plane drops the copy.
//!
//! Every process numbers its new batches under an id of its own (the
//! configured server id plus a random suffix), starting at 1: a restart, a
//! second server with the same name on one host, or a volume cloned to
//! another server can never reuse a (server id, sequence) that was already
//! sent, which the control plane would drop as a duplicate. Batches found
//! in the spool keep the id they were cut under. A batch is sent only once
//! it is on disk (written, fsynced, renamed into place), and one process
//! at a time holds the folder (a lock file).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use floe_proto::usage::{MAX_BATCH_RECORDS, UsageBatch, UsageRecord};
use serde::{Deserialize, Serialize};

use crate::allocation::Traffic;

/// Queue length past which a long control-plane outage is logged loudly
/// (batches are never dropped: they carry bills).
const LONG_OUTAGE: usize = 1_000;

/// What the spool file holds: the batches not yet acknowledged.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Spool {
    pending: VecDeque<UsageBatch>,
}

/// Traffic not yet cut into a batch, by (tenant, room).
type Unbatched = BTreeMap<(String, String), Traffic>;

struct State {
    spool: Spool,
    unbatched: Unbatched,
    /// This process's id for new batches, and its next sequence.
    server_id: String,
    next_seq: u64,
    /// Batches up to this many from the front of `spool.pending` are on
    /// disk (all of them without a folder): only those are sent.
    durable: usize,
}

/// The usage queue of one TURN server.
pub(crate) struct Meter {
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// Held for the meter's life: the folder's lock.
    _lock: Option<std::fs::File>,
}

/// The spool file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("usage spool {path}: {message}")]
pub struct SpoolError {
    pub path: String,
    pub message: String,
}

impl Meter {
    /// Opens the spool in `dir` (creating it and taking its lock), or keeps
    /// everything in memory without one.
    pub fn open(server_id: &str, dir: Option<&Path>) -> Result<Self, SpoolError> {
        let own_id = format!("{server_id}-{}", floe_common::secret::random_token(4));
        let fresh = |spool: Spool| State {
            durable: spool.pending.len(),
            spool,
            unbatched: BTreeMap::new(),
            server_id: own_id.clone(),
            next_seq: 1,
        };
        let Some(dir) = dir else {
            return Ok(Self {
                path: None,
                state: Mutex::new(fresh(Spool::default())),
                _lock: None,
            });
        };
        let path = dir.join("usage-spool.json");
        let err = |m: String| SpoolError {
            path: path.display().to_string(),
            message: m,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let lock = std::fs::File::create(dir.join("usage-spool.lock"))
            .map_err(|e| err(format!("lock file: {e}")))?;
        lock.try_lock().map_err(|_| {
            err("another floe turn process holds this data dir; give each server its own --data-dir".into())
        })?;
        let spool: Spool = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Spool::default(),
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
            state: Mutex::new(fresh(spool)),
            _lock: Some(lock),
        };
        // A folder that cannot be written is found now, not at the first cut.
        meter.persist()?;
        Ok(meter)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id this process cuts new batches under.
    pub fn server_id(&self) -> String {
        self.lock().server_id.clone()
    }

    /// Writes the queue to disk (temporary file, fsync, rename, fsync of
    /// the folder) and marks it durable. On failure nothing new becomes
    /// sendable; the next cut or ack tries again.
    /// Cuts and acks come from one task (the reporter), so no other write
    /// runs between a write and the count it marks durable.
    fn persist(&self) -> Result<(), SpoolError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let (json, len) = {
            let s = self.lock();
            (serde_json::to_vec(&s.spool), s.spool.pending.len())
        };
        let err = |m: String| SpoolError {
            path: path.display().to_string(),
            message: m,
        };
        let json = json.map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| err(e.to_string()))?;
        // What was written is durable; batches cut meanwhile wait for the
        // next write.
        let mut s = self.lock();
        s.durable = s.durable.max(len).min(s.spool.pending.len());
        Ok(())
    }

    /// Adds traffic of (tenant, room) to the next batch.
    pub fn add(&self, tenant: &str, room: &str, t: Traffic) {
        if t.is_zero() {
            return;
        }
        let mut s = self.lock();
        let e = s
            .unbatched
            .entry((tenant.to_owned(), room.to_owned()))
            .or_default();
        e.bytes_out += t.bytes_out;
        e.bytes_in += t.bytes_in;
        e.packets_out += t.packets_out;
        e.packets_in += t.packets_in;
    }

    /// Turns what was added into a batch (if anything) and persists the
    /// queue. Returns whether a batch was cut. A batch whose write failed
    /// stays queued in memory, unsent, until a later write succeeds.
    pub fn cut(&self, now: u64) -> Result<bool, SpoolError> {
        {
            let mut s = self.lock();
            if s.unbatched.is_empty() {
                return Ok(false);
            }
            let mut records: Vec<UsageRecord> = std::mem::take(&mut s.unbatched)
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
            if s.spool.pending.len() == LONG_OUTAGE {
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
                    server_id: s.server_id.clone(),
                    seq: s.next_seq,
                    at: now,
                    records: std::mem::replace(&mut records, rest),
                };
                s.next_seq += 1;
                s.spool.pending.push_back(batch);
            }
            if self.path.is_none() {
                s.durable = s.spool.pending.len();
            }
        }
        self.persist()?;
        Ok(true)
    }

    /// The oldest unacknowledged batch that is on disk.
    pub fn oldest(&self) -> Option<UsageBatch> {
        let s = self.lock();
        (s.durable > 0)
            .then(|| s.spool.pending.front().cloned())
            .flatten()
    }

    /// Drops `batch` after the control plane acknowledged it.
    pub fn acked(&self, server_id: &str, seq: u64) -> Result<(), SpoolError> {
        {
            let mut s = self.lock();
            let before = s.spool.pending.len();
            s.spool
                .pending
                .retain(|b| b.seq != seq || b.server_id != server_id);
            if s.spool.pending.len() < before {
                s.durable = s.durable.saturating_sub(1);
            }
        }
        self.persist()
    }

    pub fn pending(&self) -> usize {
        self.lock().spool.pending.len()
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
    fn batches_accumulate_and_survive_a_restart_under_their_own_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Meter::open("turn-a", Some(dir.path())).expect("open");
        let id1 = m.server_id();
        assert!(id1.starts_with("turn-a-"), "{id1}");
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
            (id1.as_str(), 1, 2)
        );
        let r = first
            .records
            .iter()
            .find(|r| r.room == "r")
            .expect("room r");
        assert_eq!((r.bytes_out, r.bytes_in, r.packets_out), (15, 30, 2));
        drop(m);

        // A restart re-sends both batches under the id they were cut
        // under, and numbers new ones under a new id from 1.
        let m = Meter::open("turn-a", Some(dir.path())).expect("reopen");
        let id2 = m.server_id();
        assert_ne!(id1, id2);
        assert_eq!(m.pending(), 2);
        m.acked(&id1, 1).expect("ack");
        assert_eq!(
            m.oldest().map(|b| (b.server_id, b.seq)),
            Some((id1.clone(), 2))
        );
        m.add("t", "r", traffic(1));
        m.cut(102).expect("cut");
        m.acked(&id1, 2).expect("ack");
        assert_eq!(m.oldest().map(|b| (b.server_id, b.seq)), Some((id2, 1)));
    }

    /// A batch whose write failed is never sent (its sequence never
    /// reaches the control plane), stays queued, and goes out once a write
    /// succeeds; a reopened folder never reuses a sent (id, sequence).
    #[test]
    fn nothing_is_sent_before_it_is_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Meter::open("turn-a", Some(dir.path())).expect("open");
        m.add("t", "r", traffic(1));
        m.cut(1).expect("cut");
        let sent = m.oldest().expect("durable batch");
        m.acked(&sent.server_id, sent.seq).expect("ack");
        // The temporary file's name taken by a folder: every write fails
        // (even for root, unlike a read-only folder).
        let blocker = dir.path().join("usage-spool.json.tmp");
        std::fs::create_dir(&blocker).expect("blocker");
        m.add("t", "r", traffic(2));
        assert!(m.cut(2).is_err(), "the write fails");
        assert_eq!(m.oldest(), None, "not on disk, not sent");
        assert_eq!(m.pending(), 1, "but kept");
        std::fs::remove_dir(&blocker).expect("unblock");
        m.add("t", "r", traffic(3));
        m.cut(3).expect("cut");
        let next = m.oldest().expect("now on disk");
        assert_eq!((next.seq, next.records[0].bytes_out), (2, 2));
        drop(m);
        let m = Meter::open("turn-a", Some(dir.path())).expect("reopen");
        assert_ne!(m.server_id(), sent.server_id);
        assert_eq!(m.pending(), 2);
    }

    /// One process at a time holds a data folder.
    #[test]
    fn a_data_folder_is_locked_to_one_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Meter::open("turn-a", Some(dir.path())).expect("open");
        let second = Meter::open("turn-b", Some(dir.path()));
        assert!(
            second.is_err_and(|e| e.message.contains("another floe turn")),
            "a second meter on the same folder"
        );
        drop(m);
        Meter::open("turn-b", Some(dir.path())).expect("free again");
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
            m.acked(&b.server_id, b.seq).expect("ack");
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
    fn every_meter_has_an_id_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Meter::open("turn", None).expect("open");
        let b = Meter::open("turn", None).expect("open");
        let c = Meter::open("turn", Some(dir.path())).expect("open");
        assert_ne!(a.server_id(), b.server_id());
        assert_ne!(a.server_id(), c.server_id());
        assert!(a.server_id().starts_with("turn-"));
    }
}
