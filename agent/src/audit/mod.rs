//! The audit log: hash-chained, gap-free records in append-only segment files, appended by group
//! commit. An append resolves only when its record is durable: the batch is written to the
//! current segment and `fdatasync`ed (new segments also fsync the directory).
//!
//! The active segment is zero-filled ahead of its write position (`PREALLOC` bytes, synced, off
//! the reply path), so a group commit overwrites blocks the file already has: its `fdatasync`
//! flushes only the data, with no file-size change for the journal to commit (about a third
//! cheaper at the median on the disk measured; BENCHMARKS.md). Readers stop at the zero tail:
//! records are JSON text, which never holds a NUL byte. A segment is cut to its records when
//! the next one starts. Each new segment after the first is a spare file zero-filled and synced
//! for a whole segment by a thread of its own while the previous segment filled, so the commit
//! thread refills only a segment it started without one (the first, or after a restart).
//!
//! Layout: `<state_dir>/audit/seg-<first-seq>.log`, one record per line:
//! `{"seq", "time_ms", "prev", "hash", "body"}` with
//! `hash = sha256(seq as 8 BE bytes ‖ time_ms as 8 BE bytes ‖ prev hex ‖ body JSON bytes)`: every
//! field of the record is under the hash. `meta.json` (prune anchor, sent boundary, batch in
//! flight) is replaced atomically. Pruning drops whole segments, leaving the anchor (seq and
//! hash of the last dropped record): segments older than `retention`, and the oldest ones when
//! the quota nears full; with `[upstream]` only segments whose records were all sent.
//! `checkpoints.ndjson` holds the signed checkpoints ([`checkpoint`]).

pub mod checkpoint;
mod committer;
mod record;
mod segments;
mod verify;

use committer::*;
use record::*;
pub use record::{Anchor, Record, GENESIS};
use segments::*;
pub use verify::{each_record, export, verify, VerifyReport};

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::locks::MutexExt;
use outpost_proto::registry::hex;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(String),
    #[error("audit quota of {0} bytes is full: refusing to serve unaudited")]
    QuotaFull(u64),
    #[error("audit log is closed")]
    Closed,
}

fn store_err(e: impl std::fmt::Display) -> AuditError {
    AuditError::Store(e.to_string())
}

/// Settings of the audit log (`[audit]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    pub group_commit_max_delay: Duration,
    /// Bytes of retained records above which appends are refused (fail closed).
    pub quota_bytes: u64,
    /// Records older than this are pruned (leaving an anchor); with `keep_unsent`, only once
    /// they were sent.
    pub retention: Duration,
    /// `[upstream]` is configured: records are pruned only after they were sent, and a full
    /// quota of unsent records refuses appends (fail closed). Without it the oldest segments
    /// are pruned when the quota nears full.
    pub keep_unsent: bool,
    /// A signed checkpoint after this many records...
    pub checkpoint_every: u64,
    /// ...or this long after the last one, when records were added since.
    pub checkpoint_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            group_commit_max_delay: Duration::ZERO,
            quota_bytes: 1 << 30,
            retention: Duration::from_secs(7 * 86400),
            keep_unsent: true,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// Test instrumentation: an ordered trace of durability events, so a test can show that a
/// record's fsync completed before its reply left.
#[derive(Default)]
pub struct Trace {
    pub clock: AtomicU64,
    pub events: Mutex<Vec<(u64, String)>>,
}

impl Trace {
    pub fn note(&self, what: String) {
        let t = self.clock.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut e) = self.events.lock() {
            if e.len() < 1_000_000 {
                e.push((t, what));
            }
        }
    }
}

/// The audit log handle (cheap to clone).
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
    tx: Arc<Mutex<Option<Sender<Msg>>>>,
    committer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Audit {
    /// Opens (or creates) the log in `dir` and starts its committer thread, without signed
    /// checkpoints.
    pub fn open(dir: &Path, cfg: &AuditConfig, trace: Option<Arc<Trace>>) -> Result<Audit, AuditError> {
        Self::open_signed(dir, cfg, None, trace)
    }

    /// Opens (or creates) the log in `dir` and starts its committer thread; with a signer, the
    /// head is checkpointed as `cfg` says, and at [`Audit::close`].
    pub fn open_signed(
        dir: &Path,
        cfg: &AuditConfig,
        signer: Option<checkpoint::Signer>,
        trace: Option<Arc<Trace>>,
    ) -> Result<Audit, AuditError> {
        // Segments small enough that pruning can free space well before a small quota fills.
        let segment_limit = (cfg.quota_bytes / 8).clamp(4096, 8 << 20);
        let store = Store::open(dir, segment_limit)?;
        let bytes = store.retained();
        let head = store.head;
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            bytes: AtomicU64::new(bytes),
            head_seq: AtomicU64::new(head),
            fsyncs: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            max_delay: cfg.group_commit_max_delay,
            quota: cfg.quota_bytes,
            keep_unsent: cfg.keep_unsent,
            retention: cfg.retention,
            checkpoints: signer.map(|signer| Checkpoints {
                signer,
                every: cfg.checkpoint_every.max(1),
                interval: cfg.checkpoint_interval,
            }),
            refusing: Mutex::new(None),
            store_failing: std::sync::atomic::AtomicBool::new(false),
            trace,
        });
        let (tx, rx) = channel::<Msg>();
        let s = shared.clone();
        let committer = std::thread::Builder::new()
            .name("audit-commit".into())
            .spawn(move || committer(&s, &rx))
            .map_err(store_err)?;
        Ok(Audit { shared, tx: Arc::new(Mutex::new(Some(tx))), committer: Arc::new(Mutex::new(Some(committer))) })
    }

    /// Appends a record; resolves with its sequence number once it is durable.
    pub fn append(&self, body: Value) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        // Serialized here, on the caller's thread: the committer only chains and writes.
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let sent = self.send(Msg::Append(Pending { body, reply }));
        async move {
            if !sent {
                return Err(AuditError::Closed);
            }
            rx.await.map_err(|_| AuditError::Closed)?
        }
    }

    /// Appends a record and makes it durable on the calling thread, when that is cheaper than
    /// the two thread hand-offs of [`Audit::append`]: nothing is waiting for the committer, no
    /// commit is being written, and no `group_commit_max_delay` asks records to wait for
    /// company. Blocks for one durable write (about a disk flush), so a caller on an async
    /// runtime uses it only when it is the one request being answered. `None`: not done here,
    /// use [`Audit::append`] (the record was not written).
    pub fn append_here(&self, body: &Value) -> Option<Result<u64, AuditError>> {
        let s = &*self.shared;
        if !s.max_delay.is_zero() || s.queued.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if self.tx.lock().ok()?.is_none() {
            return Some(Err(AuditError::Closed));
        }
        let mut store = s.store.try_lock().ok()?;
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
        let result = commit(s, &mut store, &[&body], false);
        if let (Some(t), Ok(seq)) = (&s.trace, &result) {
            t.note(format!("committed-here {seq}"));
        }
        let low = store.room_is_low();
        drop(store);
        if low {
            self.send(Msg::Preallocate);
        }
        Some(result)
    }

    fn send(&self, msg: Msg) -> bool {
        let Ok(tx) = self.tx.lock() else { return false };
        let Some(tx) = tx.as_ref() else { return false };
        let append = matches!(msg, Msg::Append(_));
        if append {
            self.shared.queued.fetch_add(1, Ordering::SeqCst);
        }
        let sent = tx.send(msg).is_ok();
        if append && !sent {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// Signs the head now when records came after the last checkpoint (before a last upload at
    /// shutdown, so that the witness gets the head). Resolves once it is durable.
    pub fn checkpoint(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Msg::Checkpoint(reply));
        async move {
            if sent {
                let _ = rx.await;
            }
        }
    }

    /// Stops accepting appends; the committer finishes what it has, signs a last checkpoint
    /// when records came after the previous one, and exits. Returns once it has (a few ms).
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        let handle = self.committer.lock().ok().and_then(|mut h| h.take());
        let Some(h) = handle.filter(|h| h.thread().id() != std::thread::current().id()) else { return };
        // Bounded: a commit stuck in a hung disk must not keep the process from exiting.
        let until = Instant::now() + CLOSE_WAIT;
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!("audit: the commit thread did not finish within {CLOSE_WAIT:?}; leaving it");
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared.store.locked()
    }

    /// Bytes of records retained (the quota's measure).
    pub fn retained_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }

    pub fn quota_bytes(&self) -> u64 {
        self.shared.quota
    }

    pub fn head_seq(&self) -> u64 {
        self.shared.head_seq.load(Ordering::SeqCst)
    }

    pub fn fsyncs(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::SeqCst)
    }

    pub fn is_full(&self) -> bool {
        self.retained_bytes() >= self.shared.quota
    }

    /// The instrumentation trace, if enabled.
    pub fn trace(&self) -> Option<Arc<Trace>> {
        self.shared.trace.clone()
    }

    /// On-disk size of the log (segments and meta).
    pub fn disk_bytes(&self) -> u64 {
        let dir = self.store().dir.clone();
        std::fs::read_dir(dir)
            .map(|es| es.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0)
    }

    /// Records with `seq` in `from..=to` (at most `limit`), in order, as stored (one JSON each).
    pub fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        self.store().range(from, to, limit)
    }

    /// The highest sequence acknowledged upstream.
    pub fn sent_seq(&self) -> Result<u64, AuditError> {
        Ok(self.store().meta.sent)
    }

    /// The batch being sent, if one was started: its boundaries are persisted so that a batch
    /// rebuilt after a crash is the same batch (same idempotency key).
    pub fn inflight(&self) -> Result<Option<(u64, u64)>, AuditError> {
        Ok(self.store().meta.inflight)
    }

    pub fn set_inflight(&self, range: Option<(u64, u64)>) -> Result<(), AuditError> {
        let mut s = self.store();
        s.meta.inflight = range;
        s.write_meta()
    }

    /// Records that everything up to `seq` arrived upstream.
    pub fn mark_sent(&self, seq: u64) -> Result<(), AuditError> {
        let mut s = self.store();
        s.meta.sent = s.meta.sent.max(seq);
        s.meta.inflight = None;
        s.write_meta()
    }

    /// Prunes by retention and quota (see [`maintain`]). Returns how many records were pruned.
    pub fn maintain(&self) -> Result<u64, AuditError> {
        maintain(&self.shared, &mut self.store())
    }

    /// Drops whole segments older than `older_than_ms` (with `[upstream]`, only those whose
    /// records were all sent), moving the anchor forward. Returns how many records were pruned.
    pub fn prune(&self, older_than_ms: i64) -> Result<u64, AuditError> {
        let mut store = self.store();
        let upto = if self.shared.keep_unsent { store.meta.sent } else { u64::MAX };
        let (records, freed) = store.prune(older_than_ms, upto, u64::MAX)?;
        drop_bytes(&self.shared.bytes, freed);
        Ok(records)
    }

    /// Why appends are refused right now (a full quota of records not yet sent, or the store
    /// failing at its last commit), if they are: the agent is not ready then.
    pub fn refusing(&self) -> Option<String> {
        if self.shared.keep_unsent && self.is_full() {
            return Some(AuditError::QuotaFull(self.shared.quota).to_string());
        }
        self.shared.refusing.locked().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn appends_chain_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        let seqs: Vec<u64> = rt()
            .block_on(async {
                futures::future::join_all((0..50).map(|i| audit.append(serde_json::json!({ "i": i })))).await
            })
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(sorted, (1..=50).collect::<Vec<_>>());
        assert!(audit.fsyncs() >= 1 && audit.fsyncs() <= 50, "group commit shares fsyncs");
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last, r.records), (Some(1), Some(50), 50));
    }

    /// A lone record is made durable on the caller's thread; records through the committer and
    /// through the caller's thread share one gap-free chain.
    #[test]
    fn lone_records_commit_on_the_callers_thread_in_the_same_chain() {
        let dir = tempfile::tempdir().unwrap();
        let trace = Arc::new(Trace::default());
        let audit = Audit::open(dir.path(), &AuditConfig::default(), Some(trace.clone())).unwrap();
        let rt = rt();
        let mut seqs = Vec::new();
        for i in 0..30 {
            if i % 3 == 0 {
                seqs.push(rt.block_on(audit.append(serde_json::json!({ "i": i }))).unwrap());
            } else {
                // Right after a commit the committer may still hold the store a moment (checking
                // its zeroed room); "not here" then, with nothing written. Bounded.
                let body = serde_json::json!({ "i": i });
                let here = (0..100_000).find_map(|_| {
                    audit.append_here(&body).or_else(|| {
                        std::thread::yield_now();
                        None
                    })
                });
                let seq = here.expect("idle log: done here").unwrap();
                // Durable when it returns: its commit is in the trace already.
                let done = format!("fsync-done {seq}-{seq}");
                assert!(trace.events.lock().unwrap().iter().any(|(_, e)| *e == done), "{seq}");
                seqs.push(seq);
            }
        }
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last, r.records), (Some(1), Some(30), 30));
        // A commit in progress (the store is held): not done here, nothing written.
        {
            let _writing = audit.store();
            assert!(audit.append_here(&serde_json::json!({ "busy": true })).is_none());
        }
        assert_eq!(audit.head_seq(), 30);
        audit.close();
        assert!(matches!(audit.append_here(&serde_json::json!({})), Some(Err(AuditError::Closed))));
        // With a group-commit delay, lone records wait for company on the committer.
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { group_commit_max_delay: Duration::from_millis(1), ..AuditConfig::default() };
        let delayed = Audit::open(dir.path(), &cfg, None).unwrap();
        assert!(delayed.append_here(&serde_json::json!({})).is_none());
    }

    /// Commits on callers' threads that use up the zeroed room get it refilled by the committer.
    #[test]
    fn room_used_by_commits_on_callers_threads_is_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        let pad = "z".repeat(2000);
        let mut i = 0;
        while !audit.store().room_is_low() {
            assert!(i < 10_000, "the room runs low after at most PREALLOC bytes");
            audit.append_here(&serde_json::json!({ "i": i, "pad": pad })).unwrap().unwrap();
            i += 1;
        }
        // The committer takes messages in order: once two appends through it are answered,
        // the refill asked for before them is done.
        let rt = rt();
        rt.block_on(audit.append(serde_json::json!({ "a": 1 }))).unwrap();
        rt.block_on(audit.append(serde_json::json!({ "b": 2 }))).unwrap();
        assert!(!audit.store().room_is_low());
    }

    #[test]
    fn prune_keeps_an_anchor_verify_continues_from() {
        let dir = tempfile::tempdir().unwrap();
        // A small quota makes small segments (pruning drops whole segments).
        let cfg = AuditConfig { quota_bytes: 32 * 1024, ..AuditConfig::default() };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        rt().block_on(async {
            for i in 0..20 {
                audit.append(serde_json::json!({ "i": i, "pad": "x".repeat(300) })).await.unwrap();
            }
        });
        audit.mark_sent(12).unwrap();
        let pruned = audit.prune(i64::MAX).unwrap();
        assert!(pruned > 0 && pruned <= 12, "whole segments, all sent: {pruned}");
        let bytes_after = audit.retained_bytes();
        assert!(bytes_after > 0);
        rt().block_on(async { audit.append(serde_json::json!({ "after": true })).await.unwrap() });
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.anchor, r.first, r.last), (pruned, Some(pruned + 1), Some(21)));
    }

    #[test]
    fn quota_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { quota_bytes: 300, ..AuditConfig::default() };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        let results: Vec<_> = rt().block_on(async {
            let mut v = Vec::new();
            for i in 0..10 {
                v.push(audit.append(serde_json::json!({ "i": i, "pad": "x".repeat(100) })).await);
            }
            v
        });
        assert!(results[0].is_ok());
        assert!(results.iter().any(|r| matches!(r, Err(AuditError::QuotaFull(300)))));
    }
}

#[cfg(test)]
mod crash_tests {
    use super::*;
    use std::io::Write;

    /// A log of five records, closed; the runtime and the active segment's path.
    fn five_records() -> (tempfile::TempDir, tokio::runtime::Runtime, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        rt.block_on(async {
            for i in 0..5 {
                audit.append(serde_json::json!({ "i": i })).await.unwrap();
            }
        });
        audit.close();
        let (_, seg) = segment_files(dir.path()).unwrap().pop().unwrap();
        (dir, rt, seg)
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_chain_continues() {
        let (dir, rt, seg) = five_records();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"seq\":6,\"time_ms\":1,\"pr").unwrap();
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        assert_eq!(audit.head_seq(), 5);
        assert_eq!(rt.block_on(audit.append(serde_json::json!({ "after": 1 }))).unwrap(), 6);
        assert_eq!(verify(dir.path(), None).unwrap().last, Some(6));
    }

    #[test]
    fn a_record_torn_over_the_zeroed_room_is_cut() {
        let (dir, rt, seg) = five_records();
        let data = std::fs::read(&seg).unwrap();
        let end = data.iter().rposition(|&b| b != 0).unwrap() + 1;
        assert!(data.len() > end, "the active segment has zeroed room ahead of its records");
        // Power cut mid-batch: part of a record where the next write went, zeros after it.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .write_all_at(b"{\"seq\":6,\"time_ms\":1,\"pr", end as u64)
            .unwrap();
        assert!(verify(dir.path(), None).is_err(), "an uncut torn record is reported");
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        assert_eq!(audit.head_seq(), 5);
        assert_eq!(rt.block_on(audit.append(serde_json::json!({ "after": 1 }))).unwrap(), 6);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last), (Some(1), Some(6)));
    }
}

#[cfg(test)]
mod segment_tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn stored_lines_are_what_serializing_a_record_gives() {
        let body = serde_json::json!({ "kind": "inference", "s": "quote \" and \\ and \u{1}", "n": 1.5, "z": null });
        let json = serde_json::to_vec(&body).unwrap();
        let hash = hash_of(7, 1_764_370_000_000, GENESIS, &json);
        assert_eq!(hash, Record::compute_hash(7, 1_764_370_000_000, GENESIS, &body));
        let mut line = Vec::new();
        write_line(&mut line, 7, 1_764_370_000_000, GENESIS, &hash, &json);
        let rec = Record { seq: 7, time_ms: 1_764_370_000_000, prev: GENESIS.into(), hash, body };
        assert_eq!(String::from_utf8(line).unwrap(), serde_json::to_string(&rec).unwrap());
    }

    #[test]
    fn zeroed_room_is_invisible_to_reopen_verify_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let append_n = |audit: &Audit, n: usize| {
            rt.block_on(async {
                for i in 0..n {
                    audit.append(serde_json::json!({ "i": i })).await.unwrap();
                }
            })
        };
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        append_n(&audit, 30);
        let logical = audit.retained_bytes();
        assert!(audit.disk_bytes() >= logical + PREALLOC / 2, "room is zero-filled ahead of the records");
        assert_eq!(audit.range(1, 30, 100).unwrap().len(), 30);
        audit.close();
        drop(audit);
        // Reopened (as after a crash): same head, no bytes dropped, appends continue the chain.
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        assert_eq!((audit.head_seq(), audit.retained_bytes()), (30, logical));
        append_n(&audit, 5);
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last, r.records), (Some(1), Some(35), 35));
        let mut out = Vec::new();
        assert_eq!(export(dir.path(), 0, &mut out).unwrap(), 35);
        assert!(!out.contains(&0), "no zero bytes reach an export");
    }

    #[test]
    fn a_new_segment_starts_from_a_spare_zero_filled_off_the_commit_path() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB of quota: 8 KiB segments, spares of 16 KiB (a segment and its room ahead).
        let cfg = AuditConfig { quota_bytes: 64 * 1024, ..AuditConfig::default() };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        let rt = rt();
        let record = |i: usize| serde_json::json!({ "i": i, "pad": "x".repeat(200) });
        let spares = |d: &Path| {
            std::fs::read_dir(d).unwrap().flatten().filter(|e| is_spare_name(&e.file_name().to_string_lossy())).count()
        };
        rt.block_on(audit.append(record(0))).unwrap();
        // The first segment started empty and set a spare going; wait until it is made.
        audit.store().finish_spare();
        assert!(matches!(audit.store().spare, Some(Spare::Ready(..))), "the spare is made");
        assert_eq!(spares(dir.path()), 1);
        let mut i = 1;
        while segment_files(dir.path()).unwrap().len() < 2 {
            assert!(i < 1000, "8 KiB segments roll within 1000 records");
            rt.block_on(audit.append(record(i))).unwrap();
            i += 1;
        }
        // The new segment is the spare: zero-filled for a whole segment beyond its records.
        let (_, active) = segment_files(dir.path()).unwrap().pop().unwrap();
        let on_disk = std::fs::metadata(&active).unwrap().len();
        assert_eq!(on_disk, 16 * 1024, "the spare's length: {}", active.display());
        assert_eq!(audit.store().file_len, on_disk);
        assert!(!audit.store().room_is_low(), "no refill needed on the commit path");
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last, r.records), (Some(1), Some(i as u64), i as u64));
        assert_eq!(audit.range(1, i as u64, 2000).unwrap().len(), i);
        audit.store().finish_spare();
        audit.close();
        drop(audit);
        // Reopened: spares are removed (one left by a crash may be partly written), the chain
        // continues, and no zero byte reaches the records.
        std::fs::write(dir.path().join("spare-1-0.zero"), [0u8; 100]).unwrap();
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        assert_eq!(spares(dir.path()), 0);
        assert_eq!(audit.head_seq(), i as u64);
        rt.block_on(audit.append(record(i))).unwrap();
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last), (Some(1), Some(i as u64 + 1)));
        let mut out = Vec::new();
        assert_eq!(export(dir.path(), 0, &mut out).unwrap(), i as u64 + 1);
        assert!(!out.contains(&0), "no zero bytes reach an export");
    }

    #[test]
    fn a_segment_is_cut_to_its_records_when_the_next_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        // A small quota makes small segments.
        let cfg = AuditConfig { quota_bytes: 64 * 1024, ..AuditConfig::default() };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        rt().block_on(async {
            for i in 0..100 {
                audit.append(serde_json::json!({ "i": i, "pad": "x".repeat(200) })).await.unwrap();
            }
        });
        let files = segment_files(dir.path()).unwrap();
        assert!(files.len() > 2, "several segments: {}", files.len());
        for (_, path) in &files[..files.len() - 1] {
            let data = std::fs::read(path).unwrap();
            assert_eq!(data.last(), Some(&b'\n'), "{} ends with its last record", path.display());
        }
        let r = verify(dir.path(), None).unwrap();
        assert_eq!((r.first, r.last), (Some(1), Some(100)));
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;
    use outpost_proto::registry::KeyPair;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// A closed log of `n` records with checkpoints every `every` records (and at close), and
    /// the node's public key.
    fn signed_log(n: usize, every: u64) -> (tempfile::TempDir, ed25519_dalek::VerifyingKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let public = key.public().verifying_key().unwrap();
        let cfg = AuditConfig { checkpoint_every: every, ..AuditConfig::default() };
        let audit =
            Audit::open_signed(dir.path(), &cfg, Some(checkpoint::Signer { key, node: "n1".into() }), None).unwrap();
        rt().block_on(async {
            for i in 0..n {
                audit.append(serde_json::json!({ "kind": "inference", "i": i })).await.unwrap();
            }
        });
        audit.close();
        (dir, public)
    }

    fn stored(dir: &Path) -> (PathBuf, Vec<Record>) {
        let (_, seg) = segment_files(dir).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(&seg).unwrap();
        let recs = text.trim_end_matches('\0').lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (seg, recs)
    }

    fn write(seg: &Path, recs: &[Record]) {
        let text: String = recs.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(seg, text).unwrap();
    }

    #[test]
    fn every_field_is_under_the_hash_including_the_time() {
        let (dir, key) = signed_log(5, 1000);
        let (seg, mut recs) = stored(dir.path());
        recs[2].time_ms += 1;
        write(&seg, &recs);
        let e = verify(dir.path(), Some(&key)).unwrap_err();
        assert!(e.contains("record 3 was modified"), "{e}");
    }

    #[test]
    fn checkpoints_are_records_of_the_chain_and_kept_beside_it() {
        let (dir, key) = signed_log(25, 10);
        // Records 1-10, checkpoint 11, 12-21 (10 more: 11 counts), checkpoint ...; and at close.
        let (_, recs) = stored(dir.path());
        let cps: Vec<u64> = recs.iter().filter(|r| r.body["kind"] == "checkpoint").map(|r| r.seq).collect();
        assert_eq!(cps.first(), Some(&11));
        assert_eq!(cps.last(), Some(&recs.last().unwrap().seq), "the last record is the closing checkpoint");
        assert_eq!(checkpoint::read_file(dir.path()).unwrap().len(), cps.len());
        let r = verify(dir.path(), Some(&key)).unwrap();
        assert_eq!(r.checkpoints as usize, cps.len());
        assert!(r.signatures_checked);
        // Reopened and closed with nothing new: no new checkpoint.
        let audit = Audit::open_signed(
            dir.path(),
            &AuditConfig::default(),
            Some(checkpoint::Signer { key: KeyPair::generate().unwrap(), node: "n1".into() }),
            None,
        )
        .unwrap();
        let head = audit.head_seq();
        audit.close();
        assert_eq!(stored(dir.path()).1.last().unwrap().seq, head);
    }

    #[test]
    fn a_cut_tail_is_named_from_its_first_missing_record() {
        let (dir, key) = signed_log(20, 1000);
        let (seg, recs) = stored(dir.path());
        let last = recs.last().unwrap().seq;
        write(&seg, &recs[..recs.len() - 3]);
        let e = verify(dir.path(), Some(&key)).unwrap_err();
        assert!(e.contains("missing from the tail") && e.contains(&format!("first affected seq: {}", last - 2)), "{e}");
    }

    #[test]
    fn a_rewritten_record_with_recomputed_hashes_contradicts_the_checkpoint() {
        let (dir, key) = signed_log(20, 8);
        let (seg, mut recs) = stored(dir.path());
        // Rewrite the last inference record, recompute its hash, and drop the closing checkpoint
        // record after it (it names the old hash): the chain alone is consistent again.
        let closing = recs.pop().unwrap();
        let r = recs.last_mut().unwrap();
        r.body["i"] = serde_json::json!(999);
        r.hash = Record::compute_hash(r.seq, r.time_ms, &r.prev, &r.body);
        let rewritten = r.seq;
        write(&seg, &recs);
        let e = verify(dir.path(), Some(&key)).unwrap_err();
        assert!(e.contains(&format!("record {rewritten} contradicts the checkpoint")), "{e}");
        // The previous checkpoint covers record 17 (checkpoints at 9 and 18 carry 8 and 17).
        assert!(e.contains("first affected seq: 18"), "{e}");
        assert_eq!(closing.seq, rewritten + 1);
    }

    #[test]
    fn a_forged_checkpoint_is_refused() {
        let (dir, key) = signed_log(5, 1000);
        let path = dir.path().join(checkpoint::FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cp: checkpoint::Checkpoint = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        cp.seq += 100;
        std::fs::write(&path, serde_json::to_string(&cp).unwrap() + "\n").unwrap();
        let e = verify(dir.path(), Some(&key)).unwrap_err();
        assert!(e.contains("not signed by the node key"), "{e}");
    }

    #[test]
    fn without_upstream_the_oldest_segments_make_room_and_appends_never_fail() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { quota_bytes: 16 * 1024, keep_unsent: false, ..AuditConfig::default() };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        rt().block_on(async {
            for i in 0..500 {
                audit.append(serde_json::json!({ "i": i, "pad": "x".repeat(200) })).await.unwrap();
            }
        });
        assert!(audit.retained_bytes() <= 16 * 1024);
        let r = verify(dir.path(), None).unwrap();
        assert!(r.anchor > 0 && r.last == Some(500), "{r:?}");
        // With upstream, unsent records are never pruned: the quota fails closed.
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { quota_bytes: 16 * 1024, keep_unsent: true, ..AuditConfig::default() };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        let refused = rt().block_on(async {
            for i in 0..500 {
                if let Err(e) = audit.append(serde_json::json!({ "i": i, "pad": "x".repeat(200) })).await {
                    return Some(e);
                }
            }
            None
        });
        assert!(matches!(refused, Some(AuditError::QuotaFull(_))));
        assert!(audit.refusing().is_some());
        assert_eq!(verify(dir.path(), None).unwrap().anchor, 0);
    }

    #[test]
    fn segments_past_retention_are_pruned_without_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            quota_bytes: 256 * 1024,
            keep_unsent: false,
            retention: Duration::ZERO,
            ..AuditConfig::default()
        };
        let audit = Audit::open(dir.path(), &cfg, None).unwrap();
        rt().block_on(async {
            for i in 0..300 {
                audit.append(serde_json::json!({ "i": i, "pad": "x".repeat(200) })).await.unwrap();
            }
        });
        assert!(segment_files(dir.path()).unwrap().len() > 1);
        assert!(audit.prune(now_ms() + 1).unwrap() > 0);
        assert_eq!(segment_files(dir.path()).unwrap().len(), 1, "all but the active segment");
        assert_eq!(verify(dir.path(), None).unwrap().last, Some(300));
    }
}
