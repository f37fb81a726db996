//! The audit log: hash-chained, gap-free records in sled, appended by group commit. An append
//! resolves only when its record is durable: after sled's flush, the log file and its directory
//! are fsynced (sled's own flush issues `sync_file_range`, which does not survive a power cut).
//!
//! Record layout (the value under the big-endian `seq` key):
//! `{"seq", "time_ms", "prev", "hash", "body"}` with
//! `hash = sha256(seq as 8 BE bytes ‖ prev hex ‖ body JSON bytes)`. Meta keys live in the same
//! tree under a `0xff` prefix so a batch updates records and meta atomically.
//!
//! The store is sled 0.34 behind this module's interface (`append`, `range`, `verify`, `prune`):
//! swapping it means reimplementing this file only.

pub mod sink;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::registry::{hex, sha256};

const META_ANCHOR: &[u8] = b"\xffanchor";
const META_SENT: &[u8] = b"\xffsent";
const META_INFLIGHT: &[u8] = b"\xffinflight";
/// Hash of "nothing before the first record".
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub time_ms: i64,
    pub prev: String,
    pub hash: String,
    pub body: Value,
}

impl Record {
    pub fn compute_hash(seq: u64, prev: &str, body: &Value) -> String {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(prev.as_bytes());
        buf.extend_from_slice(&serde_json::to_vec(body).unwrap_or_default());
        hex::encode(&sha256(&buf))
    }
}

/// Where verification starts: the last pruned record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::registry::hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        crate::registry::hex::decode(&s)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("bad anchor hash"))
    }
}

impl Anchor {
    fn genesis() -> Anchor {
        Anchor { seq: 0, hash: [0; 32] }
    }
    fn hash_hex(&self) -> String {
        hex::encode(&self.hash)
    }
}

/// Settings of the audit log (`[audit]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    pub group_commit_max_delay: Duration,
    /// Bytes of retained records above which appends are refused (fail closed).
    pub quota_bytes: u64,
    /// Synced records older than this are pruned (leaving an anchor).
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            group_commit_max_delay: Duration::ZERO,
            quota_bytes: 1 << 30,
            retention: Duration::from_secs(7 * 86400),
        }
    }
}

struct Pending {
    body: Value,
    reply: oneshot::Sender<Result<u64, AuditError>>,
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

struct Shared {
    tree: sled::Tree,
    db: sled::Db,
    path: PathBuf,
    bytes: AtomicU64,
    head_seq: AtomicU64,
    fsyncs: AtomicU64,
    quota: u64,
    trace: Option<Arc<Trace>>,
}

/// The audit log handle (cheap to clone).
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
    tx: Arc<Mutex<Option<Sender<Pending>>>>,
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Record keys sort below every meta key (`0xff…`): sequence numbers stay under 2^56.
const RECORDS_END: &[u8] = &[0xff];
const MAX_SEQ: u64 = (1 << 56) - 1;

fn records(tree: &sled::Tree) -> sled::Iter {
    tree.range(&key(0)[..]..RECORDS_END)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn fsync_path(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

impl Audit {
    /// Opens (or creates) the log in `dir` and starts its committer thread.
    pub fn open(dir: &Path, cfg: &AuditConfig, trace: Option<Arc<Trace>>) -> Result<Audit, AuditError> {
        let db = sled::Config::new().path(dir).mode(sled::Mode::LowSpace).open().map_err(store_err)?;
        // The log file's directory entry, made durable once.
        db.flush().map_err(store_err)?;
        fsync_path(&dir.join("db")).and_then(|()| fsync_path(dir)).map_err(store_err)?;
        let tree = db.open_tree("audit").map_err(store_err)?;
        let mut bytes = 0u64;
        let mut head = 0u64;
        for kv in records(&tree) {
            let (k, v) = kv.map_err(store_err)?;
            bytes += v.len() as u64;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                head = head.max(u64::from_be_bytes(b));
            }
        }
        if head == 0 {
            head = read_meta::<Anchor>(&tree, META_ANCHOR)?.map_or(0, |a| a.seq);
        }
        let shared = Arc::new(Shared {
            tree,
            db,
            path: dir.to_owned(),
            bytes: AtomicU64::new(bytes),
            head_seq: AtomicU64::new(head),
            fsyncs: AtomicU64::new(0),
            quota: cfg.quota_bytes,
            trace,
        });
        let (tx, rx) = channel::<Pending>();
        let s = shared.clone();
        let delay = cfg.group_commit_max_delay;
        std::thread::Builder::new()
            .name("audit-commit".into())
            .spawn(move || committer(&s, &rx, delay))
            .map_err(store_err)?;
        Ok(Audit { shared, tx: Arc::new(Mutex::new(Some(tx))) })
    }

    /// Appends a record; resolves with its sequence number once it is durable.
    pub fn append(&self, body: Value) -> impl std::future::Future<Output = Result<u64, AuditError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|tx| tx.send(Pending { body, reply }).is_ok()))
            .unwrap_or(false);
        async move {
            if !sent {
                return Err(AuditError::Closed);
            }
            rx.await.map_err(|_| AuditError::Closed)?
        }
    }

    /// Stops accepting appends; the committer finishes what it has and exits.
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
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

    /// The sled database and its directory (other trees, e.g. the telemetry spool, live there).
    pub fn db(&self) -> (sled::Db, PathBuf) {
        (self.shared.db.clone(), self.shared.path.clone())
    }

    /// The instrumentation trace, if enabled.
    pub fn trace(&self) -> Option<Arc<Trace>> {
        self.shared.trace.clone()
    }

    /// On-disk size of the sled directory.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }

    /// Records with `seq` in `from..=to` (at most `limit`), in order.
    pub fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let mut out = Vec::new();
        for kv in self.shared.tree.range(&key(from)[..]..=&key(to.min(MAX_SEQ))[..]) {
            let (k, v) = kv.map_err(store_err)?;
            let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) else { continue };
            out.push((u64::from_be_bytes(b), v.to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The highest sequence acknowledged upstream.
    pub fn sent_seq(&self) -> Result<u64, AuditError> {
        Ok(read_meta::<u64>(&self.shared.tree, META_SENT)?.unwrap_or(0))
    }

    /// The batch being sent, if one was started: its boundaries are persisted so that a batch
    /// rebuilt after a crash is the same batch (same idempotency key).
    pub fn inflight(&self) -> Result<Option<(u64, u64)>, AuditError> {
        read_meta(&self.shared.tree, META_INFLIGHT)
    }

    pub fn set_inflight(&self, range: Option<(u64, u64)>) -> Result<(), AuditError> {
        match range {
            Some(r) => self.shared.tree.insert(META_INFLIGHT, serde_json::to_vec(&r).map_err(store_err)?),
            None => self.shared.tree.remove(META_INFLIGHT),
        }
        .map_err(store_err)?;
        self.durable()
    }

    /// Records that everything up to `seq` arrived upstream.
    pub fn mark_sent(&self, seq: u64) -> Result<(), AuditError> {
        let mut b = sled::Batch::default();
        b.insert(META_SENT, serde_json::to_vec(&seq).map_err(store_err)?);
        b.remove(META_INFLIGHT);
        self.shared.tree.apply_batch(b).map_err(store_err)?;
        self.durable()
    }

    fn durable(&self) -> Result<(), AuditError> {
        make_durable(&self.shared)
    }

    /// Deletes synced records older than `older_than_ms`, moving the anchor forward.
    /// Returns how many records were pruned.
    pub fn prune(&self, older_than_ms: i64) -> Result<u64, AuditError> {
        let sent = self.sent_seq()?;
        let mut anchor = read_meta::<Anchor>(&self.shared.tree, META_ANCHOR)?.unwrap_or_else(Anchor::genesis);
        let mut batch = sled::Batch::default();
        let mut pruned = 0u64;
        let mut freed = 0u64;
        for kv in self.shared.tree.range(key(anchor.seq + 1)..=key(sent)) {
            let (k, v) = kv.map_err(store_err)?;
            let rec: Record = serde_json::from_slice(&v).map_err(store_err)?;
            if rec.time_ms >= older_than_ms {
                break;
            }
            let hash: [u8; 32] =
                hex::decode(&rec.hash).and_then(|h| h.try_into().ok()).ok_or_else(|| store_err("bad hash"))?;
            anchor = Anchor { seq: rec.seq, hash };
            batch.remove(k);
            pruned += 1;
            freed += v.len() as u64;
            if pruned >= 100_000 {
                break;
            }
        }
        if pruned == 0 {
            return Ok(0);
        }
        batch.insert(META_ANCHOR, serde_json::to_vec(&anchor).map_err(store_err)?);
        self.shared.tree.apply_batch(batch).map_err(store_err)?;
        self.durable()?;
        self.shared.bytes.fetch_sub(freed.min(self.retained_bytes()), Ordering::SeqCst);
        Ok(pruned)
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(tree: &sled::Tree, k: &[u8]) -> Result<Option<T>, AuditError> {
    match tree.get(k).map_err(store_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(store_err)?)),
        None => Ok(None),
    }
}

/// sled's flush, then a real fsync of its log file and directory.
fn make_durable(s: &Shared) -> Result<(), AuditError> {
    s.db.flush().map_err(store_err)?;
    // sled writes into its existing log file: fsyncing the file makes the data and its size
    // durable; the directory entry was made durable once, at open.
    fsync_path(&s.path.join("db")).map_err(store_err)?;
    s.fsyncs.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn committer(s: &Shared, rx: &std::sync::mpsc::Receiver<Pending>, max_delay: Duration) {
    let (mut head, mut prev) = match last_record(s) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "audit log unreadable; refusing appends");
            while let Ok(p) = rx.recv() {
                let _ = p.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    while let Ok(first) = rx.recv() {
        // Natural batching: everything that arrived while the previous commit was syncing goes
        // into this one. Only with a configured delay does a lone record wait for company.
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            batch.push(p);
            if batch.len() >= 4096 {
                break;
            }
        }
        if !max_delay.is_zero() {
            let deadline = Instant::now() + max_delay;
            while batch.len() < 4096 {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(p) => batch.push(p),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        if s.bytes.load(Ordering::SeqCst) >= s.quota {
            for p in batch {
                let _ = p.reply.send(Err(AuditError::QuotaFull(s.quota)));
            }
            continue;
        }
        let mut sled_batch = sled::Batch::default();
        let mut seqs = Vec::with_capacity(batch.len());
        let mut added = 0u64;
        let (mut h, mut pv) = (head, prev.clone());
        for p in &batch {
            h += 1;
            let hash = Record::compute_hash(h, &pv, &p.body);
            let rec = Record { seq: h, time_ms: now_ms(), prev: pv.clone(), hash: hash.clone(), body: p.body.clone() };
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            added += bytes.len() as u64;
            sled_batch.insert(&key(h), bytes);
            seqs.push(h);
            pv = hash;
        }
        let result = s.tree.apply_batch(sled_batch).map_err(store_err).and_then(|()| make_durable(s));
        match result {
            Ok(()) => {
                head = h;
                prev = pv;
                s.head_seq.store(head, Ordering::SeqCst);
                s.bytes.fetch_add(added, Ordering::SeqCst);
                if let Some(t) = &s.trace {
                    t.note(format!("fsync-done {}-{}", seqs[0], head));
                }
                for (p, seq) in batch.into_iter().zip(seqs) {
                    let _ = p.reply.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit append failed");
                // The chain continues from what is on disk.
                if let Ok((hh, pp)) = last_record(s) {
                    head = hh;
                    prev = pp;
                }
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The last record's (seq, hash), or the anchor's, or genesis.
fn last_record(s: &Shared) -> Result<(u64, String), AuditError> {
    if let Some(kv) = records(&s.tree).next_back() {
        let (_, v) = kv.map_err(store_err)?;
        let rec: Record = serde_json::from_slice(&v).map_err(store_err)?;
        return Ok((rec.seq, rec.hash));
    }
    let anchor = read_meta::<Anchor>(&s.tree, META_ANCHOR)?.unwrap_or_else(Anchor::genesis);
    Ok((anchor.seq, if anchor.seq == 0 { GENESIS.to_owned() } else { anchor.hash_hex() }))
}

/// The result of `verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub anchor: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub records: u64,
}

/// Checks the chain from the anchor to the head. The error names the first record that is
/// modified, missing or out of place.
pub fn verify(dir: &Path) -> Result<VerifyReport, String> {
    let db =
        sled::Config::new().path(dir).open().map_err(|e| format!("cannot open audit log {}: {e}", dir.display()))?;
    let tree = db.open_tree("audit").map_err(|e| e.to_string())?;
    verify_tree(&tree)
}

fn verify_tree(tree: &sled::Tree) -> Result<VerifyReport, String> {
    let anchor = read_meta::<Anchor>(tree, META_ANCHOR).map_err(|e| e.to_string())?.unwrap_or_else(Anchor::genesis);
    let mut prev = if anchor.seq == 0 { GENESIS.to_owned() } else { anchor.hash_hex() };
    let mut report = VerifyReport { anchor: anchor.seq, first: None, last: None, records: 0 };
    for (expect, kv) in (anchor.seq + 1..).zip(records(tree)) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let kseq = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes).map_err(|_| "malformed key".to_owned())?;
        if kseq < expect {
            return Err(format!("record {kseq} is at or before the anchor {}: inserted", anchor.seq));
        }
        if kseq > expect {
            return Err(format!("record {expect} is missing (next present: {kseq})"));
        }
        let rec: Record = serde_json::from_slice(&v).map_err(|e| format!("record {kseq} is unreadable: {e}"))?;
        if rec.seq != kseq {
            return Err(format!("record {kseq} holds record {}: reordered", rec.seq));
        }
        if Record::compute_hash(rec.seq, &rec.prev, &rec.body) != rec.hash {
            return Err(format!("record {kseq} was modified (its hash does not match its content)"));
        }
        if rec.prev != prev {
            return Err(format!("record {kseq} does not follow record {}: modified, replaced or reordered", kseq - 1));
        }
        report.first.get_or_insert(kseq);
        report.last = Some(kseq);
        report.records += 1;
        prev = rec.hash;
    }
    Ok(report)
}

/// Every record (as stored JSON) with `time_ms >= since_ms`, for `outpost audit export`.
pub fn export(dir: &Path, since_ms: i64, out: &mut dyn std::io::Write) -> Result<u64, String> {
    let db =
        sled::Config::new().path(dir).open().map_err(|e| format!("cannot open audit log {}: {e}", dir.display()))?;
    let tree = db.open_tree("audit").map_err(|e| e.to_string())?;
    let mut n = 0;
    for kv in records(&tree) {
        let (_, v) = kv.map_err(|e| e.to_string())?;
        let rec: Record = serde_json::from_slice(&v).map_err(|e| e.to_string())?;
        if rec.time_ms >= since_ms {
            out.write_all(&v).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    Ok(n)
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
        let r = verify_tree(&audit.shared.tree).unwrap();
        assert_eq!((r.first, r.last, r.records), (Some(1), Some(50), 50));
    }

    #[test]
    fn prune_keeps_an_anchor_verify_continues_from() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), &AuditConfig::default(), None).unwrap();
        rt().block_on(async {
            for i in 0..20 {
                audit.append(serde_json::json!({ "i": i })).await.unwrap();
            }
        });
        audit.mark_sent(12).unwrap();
        assert_eq!(audit.prune(i64::MAX).unwrap(), 12);
        let bytes_after = audit.retained_bytes();
        assert!(bytes_after > 0);
        rt().block_on(async { audit.append(serde_json::json!({ "after": true })).await.unwrap() });
        let r = verify_tree(&audit.shared.tree).unwrap();
        assert_eq!((r.anchor, r.first, r.last), (12, Some(13), Some(21)));
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
