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
//!
//! This replaced sled 0.34, which kept 54× the retained data on disk after sync-and-delete
//! cycles and cost 0.4–1.3 ms per durable commit (BENCHMARKS.md); the interface (`append`,
//! `range`, `prune`, `verify`) did not change.

pub mod checkpoint;

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
    pub fn compute_hash(seq: u64, time_ms: i64, prev: &str, body: &Value) -> String {
        hash_of(seq, time_ms, prev, &serde_json::to_vec(body).unwrap_or_default())
    }
}

/// `sha256(seq as 8 BE bytes ‖ time_ms as 8 BE bytes ‖ prev hex ‖ body JSON bytes)`, hex.
fn hash_of(seq: u64, time_ms: i64, prev: &str, body_json: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(seq.to_be_bytes());
    h.update(time_ms.to_be_bytes());
    h.update(prev.as_bytes());
    h.update(body_json);
    hex::encode(&h.finalize())
}

/// One stored line (without its newline), byte for byte what serializing a [`Record`] gives,
/// built from the body's JSON without parsing it again.
fn write_line(out: &mut Vec<u8>, seq: u64, time_ms: i64, prev: &str, hash: &str, body_json: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{{\"seq\":{seq},\"time_ms\":{time_ms},\"prev\":\"{prev}\",\"hash\":\"{hash}\",\"body\":");
    out.extend_from_slice(body_json);
    out.push(b'}');
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
    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&outpost_proto::registry::hex::encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        outpost_proto::registry::hex::decode(&s)
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

struct Pending {
    /// The body as JSON, serialized by the caller (off the committer thread).
    body: Vec<u8>,
    reply: oneshot::Sender<Result<u64, AuditError>>,
}

/// What the committer thread is asked to do.
enum Msg {
    Append(Pending),
    /// A commit made on a caller's thread used up room: zero-fill more, off that caller's path.
    Preallocate,
    /// Sign the head now (when records came after the last checkpoint), then answer.
    Checkpoint(oneshot::Sender<()>),
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    #[serde(default)]
    anchor: Option<Anchor>,
    #[serde(default)]
    sent: u64,
    #[serde(default)]
    inflight: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    first: u64,
    /// 0 when empty.
    last: u64,
    last_hash: String,
    last_time_ms: i64,
    bytes: u64,
}

/// Bytes zero-filled ahead of the active segment's write position.
const PREALLOC: u64 = 1 << 20;

/// The next segment's file, zero-filled and synced by a thread of its own while the active
/// segment fills, so a new segment starts with room for all its records and the commit thread
/// never stops to refill it (a refill held commits for ~1.5 ms per 512 KiB; BENCHMARKS.md).
enum Spare {
    Making(std::thread::JoinHandle<std::io::Result<(File, u64, PathBuf)>>),
    Ready(File, u64, PathBuf),
}

/// Spare files are named `spare-<pid>-<n>.zero`: never a segment's name, and removed at open
/// (a spare left by a crash may be partly written).
fn is_spare_name(name: &str) -> bool {
    name.starts_with("spare-") && name.ends_with(".zero")
}

/// Writes zero bytes over `from..to` of `f`, at most 1 MiB at a time.
fn write_zeros(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    let chunk = vec![0u8; (1u64 << 20).min(to.saturating_sub(from)) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Creates `path` holding `len` zero bytes, synced (data and size).
fn zero_file(path: &Path, len: u64) -> std::io::Result<File> {
    let made = (|| {
        let f = OpenOptions::new().create_new(true).write(true).open(path)?;
        write_zeros(&f, 0, len)?;
        f.sync_all()?;
        Ok(f)
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

struct Store {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// The active (last) segment, open for positioned writes.
    file: Option<File>,
    /// Length of the active segment's file: records, then zeros (synced) up to here.
    file_len: u64,
    segment_limit: u64,
    meta: Meta,
    head: u64,
    head_hash: String,
    /// Where the last `range` read stopped: (segment index, byte offset, next seq).
    cursor: Option<(usize, u64, u64)>,
    /// The next segment's zero-filled file, once a segment has started.
    spare: Option<Spare>,
    /// The sequence number of the last checkpoint record (0: none yet).
    last_checkpoint: u64,
    last_checkpoint_at: Instant,
}

struct Shared {
    store: Mutex<Store>,
    bytes: AtomicU64,
    head_seq: AtomicU64,
    fsyncs: AtomicU64,
    /// Records sent to the committer and not yet taken into a commit.
    queued: AtomicU64,
    /// `group_commit_max_delay`: with a delay, lone records wait for company on the committer.
    max_delay: Duration,
    quota: u64,
    keep_unsent: bool,
    retention: Duration,
    checkpoints: Option<Checkpoints>,
    /// The last commit failed with a store error: appends are being refused.
    refusing: Mutex<Option<String>>,
    store_failing: std::sync::atomic::AtomicBool,
    trace: Option<Arc<Trace>>,
}

/// Signed checkpoints of the head: the node's key and when to sign.
struct Checkpoints {
    signer: checkpoint::Signer,
    every: u64,
    interval: Duration,
}

/// The audit log handle (cheap to clone).
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
    tx: Arc<Mutex<Option<Sender<Msg>>>>,
    committer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn fsync_path(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// The segment files of a directory, in order.
fn segment_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok()) {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn read_meta(dir: &Path) -> Result<Meta, AuditError> {
    match std::fs::read(dir.join("meta.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| store_err(format!("audit meta.json: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
        Err(e) => Err(store_err(e)),
    }
}

impl Store {
    fn write_meta(&self) -> Result<(), AuditError> {
        let bytes = serde_json::to_vec(&self.meta).map_err(store_err)?;
        crate::store::write_atomic(&self.dir.join("meta.json"), &bytes).map_err(store_err)
    }

    /// Scans the segments; a torn last line (a crash mid-write: never acknowledged) is cut off.
    fn open(dir: &Path, segment_limit: u64) -> Result<Store, AuditError> {
        std::fs::create_dir_all(dir).map_err(store_err)?;
        for e in std::fs::read_dir(dir).map_err(store_err)?.flatten() {
            if is_spare_name(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let meta = read_meta(dir)?;
        let anchor = meta.anchor.unwrap_or_else(Anchor::genesis);
        let mut segments = Vec::new();
        let mut last_checkpoint = 0;
        let files = segment_files(dir).map_err(store_err)?;
        let count = files.len();
        for (i, (first, path)) in files.into_iter().enumerate() {
            let mut seg =
                Segment { path: path.clone(), first, last: 0, last_hash: String::new(), last_time_ms: 0, bytes: 0 };
            let mut last_checkpoint_here = None;
            let data = std::fs::read(&path).map_err(store_err)?;
            // The zero-filled room ahead of the last write is not part of the log.
            let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            let mut good = 0usize;
            for line in data[..end].split_inclusive(|&b| b == b'\n') {
                let complete = line.ends_with(b"\n");
                let rec = if complete { serde_json::from_slice::<Record>(&line[..line.len() - 1]).ok() } else { None };
                match rec {
                    Some(r) => {
                        if r.body.get("kind").and_then(Value::as_str) == Some("checkpoint") {
                            last_checkpoint_here = Some(r.seq);
                        }
                        seg.last = r.seq;
                        seg.last_hash = r.hash;
                        seg.last_time_ms = r.time_ms;
                        good += line.len();
                    }
                    None if i + 1 == count => break,
                    // A bad line inside the log is tampering, not a torn write: keep the bytes
                    // for `audit verify` to name, and refuse to append after them.
                    None => good += line.len(),
                }
            }
            if good < end {
                tracing::warn!(segment = %path.display(), kept = good, dropped = end - good, "audit: cut a torn record left by a crash");
            }
            if good < data.len() {
                let f = OpenOptions::new().write(true).open(&path).map_err(store_err)?;
                f.set_len(good as u64).map_err(store_err)?;
                f.sync_all().map_err(store_err)?;
            }
            seg.bytes = good as u64;
            last_checkpoint = last_checkpoint_here.unwrap_or(last_checkpoint);
            if seg.last != 0 && seg.last <= anchor.seq {
                // Pruned, but the crash came before the file was deleted.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            segments.push(seg);
        }
        let (head, head_hash) = match segments.iter().rev().find(|s| s.last != 0) {
            Some(s) => (s.last, s.last_hash.clone()),
            None if anchor.seq > 0 => (anchor.seq, anchor.hash_hex()),
            None => (0, GENESIS.to_owned()),
        };
        Ok(Store {
            dir: dir.to_owned(),
            segments,
            file: None,
            file_len: 0,
            segment_limit,
            meta,
            head,
            head_hash,
            cursor: None,
            spare: None,
            last_checkpoint,
            last_checkpoint_at: Instant::now(),
        })
    }

    /// Starts zero-filling the next segment's file on a thread of its own, unless one is made
    /// or being made. Its length: a full segment and the room kept ahead of the last write.
    fn start_spare(&mut self) {
        static MADE: AtomicU64 = AtomicU64::new(0);
        if self.spare.is_some() {
            return;
        }
        let len = self.segment_limit + PREALLOC.min(self.segment_limit);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("spare-{}-{n}.zero", std::process::id()));
        let making = std::thread::Builder::new()
            .name("audit-spare".into())
            .spawn(move || zero_file(&path, len).map(|f| (f, len, path)));
        match making {
            Ok(h) => self.spare = Some(Spare::Making(h)),
            Err(e) => tracing::warn!(error = %e, "audit: cannot start zero-filling the next log segment"),
        }
    }

    /// Waits for the spare being made. A failure only costs speed: the next segment starts
    /// empty, as without a spare.
    fn finish_spare(&mut self) {
        if let Some(Spare::Making(h)) = self.spare.take() {
            match h.join() {
                Ok(Ok((f, len, path))) => self.spare = Some(Spare::Ready(f, len, path)),
                Ok(Err(e)) => tracing::warn!(error = %e, "audit: could not zero-fill the next log segment"),
                Err(_) => tracing::warn!("audit: the thread zero-filling the next log segment panicked"),
            }
        }
    }

    /// The spare, if it is ready now (one still being made stays for the next segment).
    fn take_spare(&mut self) -> Option<(File, u64, PathBuf)> {
        if matches!(&self.spare, Some(Spare::Making(h)) if h.is_finished()) {
            self.finish_spare();
        }
        match self.spare.take() {
            Some(Spare::Ready(f, len, path)) => Some((f, len, path)),
            other => {
                self.spare = other;
                None
            }
        }
    }

    /// Appends serialized records (one per line) and makes them durable.
    fn append(&mut self, first_seq: u64, lines: &[u8], last: (u64, &str, i64)) -> Result<(), AuditError> {
        let roll = match self.segments.last() {
            None => true,
            Some(s) => s.bytes >= self.segment_limit,
        };
        if roll {
            // The segment ending here keeps its records only (no zero tail).
            if let (Some(f), Some(seg)) = (self.file.take(), self.segments.last()) {
                f.set_len(seg.bytes).and_then(|()| f.sync_all()).map_err(store_err)?;
            }
            let path = self.dir.join(segment_name(first_seq));
            // The zero-filled spare becomes the segment (renamed over any leftover of that
            // name); without one ready, the segment starts empty and is refilled as it grows.
            let (f, len) = match self.take_spare() {
                Some((f, len, spare)) if std::fs::rename(&spare, &path).is_ok() => (f, len),
                spare => {
                    if let Some((_, _, p)) = spare {
                        let _ = std::fs::remove_file(p);
                    }
                    let f =
                        OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(store_err)?;
                    (f, 0)
                }
            };
            fsync_path(&self.dir).map_err(store_err)?;
            self.segments.push(Segment {
                path,
                first: first_seq,
                last: 0,
                last_hash: String::new(),
                last_time_ms: 0,
                bytes: 0,
            });
            self.file = Some(f);
            self.file_len = len;
            self.start_spare();
        }
        if self.file.is_none() {
            let path = self.segments.last().map(|s| s.path.clone()).ok_or_else(|| store_err("no segment"))?;
            let f = OpenOptions::new().write(true).open(&path).map_err(store_err)?;
            self.file_len = f.metadata().map_err(store_err)?.len();
            self.file = Some(f);
        }
        let at = self.segments.last().map_or(0, |s| s.bytes);
        let f = self.file.as_ref().ok_or_else(|| store_err("no segment file"))?;
        let written = f.write_all_at(lines, at).and_then(|()| f.sync_data());
        if let Err(e) = written {
            // The segment may hold a partial batch now: reopen it (scan) before the next append.
            self.file = None;
            return Err(store_err(e));
        }
        self.file_len = self.file_len.max(at + lines.len() as u64);
        if let Some(seg) = self.segments.last_mut() {
            seg.bytes += lines.len() as u64;
            seg.last = last.0;
            seg.last_hash = last.1.to_owned();
            seg.last_time_ms = last.2;
        }
        self.head = last.0;
        self.head_hash = last.1.to_owned();
        Ok(())
    }

    /// Less than half of `PREALLOC` zeroed room left in the active segment.
    fn room_is_low(&self) -> bool {
        let (Some(_), Some(seg)) = (self.file.as_ref(), self.segments.last()) else { return false };
        self.file_len < seg.bytes + PREALLOC.min(self.segment_limit) / 2
    }

    /// Zero-fills the active segment `PREALLOC` bytes past its records when less than half of
    /// that is left, and syncs it, so the next commits overwrite blocks the file already has.
    /// Called after a commit's replies went out. A failure only costs speed: appends still work.
    fn preallocate(&mut self) {
        if !self.room_is_low() {
            return;
        }
        let (Some(f), Some(seg)) = (self.file.as_ref(), self.segments.last()) else { return };
        let chunk = PREALLOC.min(self.segment_limit);
        let target = seg.bytes + chunk;
        let from = self.file_len.max(seg.bytes);
        match write_zeros(f, from, target).and_then(|()| f.sync_data()) {
            Ok(()) => self.file_len = target,
            Err(e) => tracing::warn!(error = %e, "audit: could not preallocate the log segment"),
        }
    }

    fn range(&mut self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let mut out = Vec::new();
        let Some(mut idx) = self.segments.iter().position(|s| s.last >= from && s.last != 0) else { return Ok(out) };
        let mut offset = 0u64;
        if let Some((ci, co, cn)) = self.cursor {
            if cn == from && ci < self.segments.len() {
                idx = ci;
                offset = co;
            }
        }
        while idx < self.segments.len() && out.len() < limit {
            let seg = &self.segments[idx];
            let mut f = File::open(&seg.path).map_err(store_err)?;
            f.seek(SeekFrom::Start(offset)).map_err(store_err)?;
            // The records only, not the zeroed room after them.
            let mut reader = BufReader::new(std::io::Read::take(f, seg.bytes.saturating_sub(offset)));
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(store_err)?;
                if n == 0 || !line.ends_with(b"\n") {
                    break;
                }
                offset += n as u64;
                let body = &line[..line.len() - 1];
                let seq =
                    seq_of(body).ok_or_else(|| store_err(format!("unreadable record in {}", seg.path.display())))?;
                if seq < from {
                    continue;
                }
                if seq > to {
                    self.cursor = Some((idx, offset - n as u64, seq));
                    return Ok(out);
                }
                out.push((seq, body.to_vec()));
                if out.len() >= limit {
                    self.cursor = Some((idx, offset, seq + 1));
                    return Ok(out);
                }
            }
            idx += 1;
            offset = 0;
        }
        self.cursor = None;
        Ok(out)
    }

    fn retained(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

/// The `seq` of a stored record line: read from the front of the lines the log writes, else by
/// parsing the JSON (an edited line may order its keys differently).
fn seq_of(line: &[u8]) -> Option<u64> {
    let fast = line.strip_prefix(b"{\"seq\":").and_then(|rest| {
        let end = rest.iter().position(|b| !b.is_ascii_digit())?;
        std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
    });
    fast.or_else(|| serde_json::from_slice::<Value>(line).ok()?.get("seq")?.as_u64())
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

/// Retention and quota: segments older than `retention` go, and when the retained records
/// reach 80 % of the quota the oldest go until half of it is left. With `[upstream]` neither
/// ever drops a record not yet sent (a full quota then fails closed).
fn maintain(s: &Shared, store: &mut Store) -> Result<u64, AuditError> {
    let upto = if s.keep_unsent { store.meta.sent } else { u64::MAX };
    let cutoff = now_ms().saturating_sub(i64::try_from(s.retention.as_millis()).unwrap_or(i64::MAX));
    let near_full = s.bytes.load(Ordering::SeqCst).saturating_mul(10) >= s.quota.saturating_mul(8);
    let keep = if near_full { s.quota / 2 } else { u64::MAX };
    let (records, freed) = store.prune(cutoff, upto, keep)?;
    drop_bytes(&s.bytes, freed);
    if records > 0 && near_full && !s.keep_unsent {
        tracing::warn!(
            records,
            anchor = store.meta.anchor.map_or(0, |a| a.seq),
            "audit: quota nearly full and no [upstream] to send to: pruned the oldest records"
        );
    }
    Ok(records)
}

impl Store {
    /// Drops whole segments from the oldest, never the active one nor one with records past
    /// `upto`, while they are older than `older_than_ms` or more than `keep_bytes` are
    /// retained; moves the anchor to the last dropped record. Returns (records, bytes) dropped.
    fn prune(&mut self, older_than_ms: i64, upto: u64, keep_bytes: u64) -> Result<(u64, u64), AuditError> {
        let mut retained = self.retained();
        let mut drop = 0;
        while drop + 1 < self.segments.len() {
            let seg = &self.segments[drop];
            if seg.last == 0 || seg.last > upto || (seg.last_time_ms >= older_than_ms && retained <= keep_bytes) {
                break;
            }
            retained -= seg.bytes;
            drop += 1;
        }
        if drop == 0 {
            return Ok((0, 0));
        }
        let last = self.segments[drop - 1].clone();
        let hash: [u8; 32] =
            hex::decode(&last.last_hash).and_then(|h| h.try_into().ok()).ok_or_else(|| store_err("bad hash"))?;
        self.meta.anchor = Some(Anchor { seq: last.last, hash });
        self.write_meta()?;
        let removed: Vec<Segment> = self.segments.drain(..drop).collect();
        self.cursor = None;
        let mut records = 0;
        let mut freed = 0;
        for seg in &removed {
            let _ = std::fs::remove_file(&seg.path);
            records += seg.last + 1 - seg.first;
            freed += seg.bytes;
        }
        let _ = fsync_path(&self.dir);
        Ok((records, freed))
    }
}

fn drop_bytes(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
}

/// How long [`Audit::close`] waits for the commit thread to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How often the committer looks after retention and due checkpoints while idle.
const MAINTENANCE_TICK: Duration = Duration::from_secs(1);

fn committer(s: &Shared, rx: &std::sync::mpsc::Receiver<Msg>) {
    let max_delay = s.max_delay;
    let mut preallocate = false;
    let mut next_maintenance = Instant::now();
    loop {
        if Instant::now() >= next_maintenance {
            next_maintenance = Instant::now() + MAINTENANCE_TICK;
            let mut store = s.store.locked();
            if let Err(e) = maintain(s, &mut store) {
                tracing::warn!(error = %e, "audit prune failed");
            }
            // A checkpoint that came due with time (no records to carry it).
            let _ = commit(s, &mut store, &[], false);
        }
        let first = match rx.recv_timeout(next_maintenance.saturating_duration_since(Instant::now())) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Natural batching: everything that arrived while the previous commit was syncing goes
        // into this one. Only with a configured delay does a lone record wait for company.
        let mut batch = Vec::new();
        let mut checkpoint_asked = Vec::new();
        let mut take = |m: Msg, batch: &mut Vec<Pending>| match m {
            Msg::Append(p) => batch.push(p),
            Msg::Preallocate => preallocate = true,
            Msg::Checkpoint(reply) => checkpoint_asked.push(reply),
        };
        take(first, &mut batch);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(m) => take(m, &mut batch),
                Err(_) => break,
            }
        }
        if !max_delay.is_zero() && !batch.is_empty() {
            let deadline = Instant::now() + max_delay;
            while batch.len() < 4096 {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(m) => take(m, &mut batch),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        s.queued.fetch_sub(batch.len() as u64, Ordering::SeqCst);
        if !batch.is_empty() {
            let bodies: Vec<&[u8]> = batch.iter().map(|p| p.body.as_slice()).collect();
            let result = commit(s, &mut s.store.locked(), &bodies, false);
            for (p, n) in batch.into_iter().zip(0..) {
                let _ = p.reply.send(result.clone().map(|first| first + n));
            }
            preallocate = true;
        }
        if !checkpoint_asked.is_empty() {
            let _ = commit(s, &mut s.store.locked(), &[], true);
            for reply in checkpoint_asked {
                let _ = reply.send(());
            }
        }
        if std::mem::take(&mut preallocate) {
            // Room for the next commits, now that this one's answers are free to go.
            let mut store = s.store.locked();
            store.preallocate();
            if s.bytes.load(Ordering::SeqCst).saturating_mul(10) >= s.quota.saturating_mul(8) {
                if let Err(e) = maintain(s, &mut store) {
                    tracing::warn!(error = %e, "audit prune failed");
                }
            }
        }
    }
    // Closed: the head as it is now is signed, so a cut tail is seen.
    let _ = commit(s, &mut s.store.locked(), &[], true);
}

/// Chains `bodies` after the head, writes them and makes them durable, in one commit, with a
/// signed checkpoint of the new head after them when one is due (`close`: any record after the
/// last checkpoint makes one due). Returns the first record's sequence number (the rest follow
/// it); with no bodies, 0.
fn commit(s: &Shared, store: &mut Store, bodies: &[&[u8]], close: bool) -> Result<u64, AuditError> {
    let result = commit_inner(s, store, bodies, close);
    let failed = matches!(result, Err(AuditError::Store(_)));
    // The lock only on a change (the flag is read without it on every commit).
    if failed || s.store_failing.load(Ordering::Relaxed) {
        s.store_failing.store(failed, Ordering::Relaxed);
        *s.refusing.locked() = result.as_ref().err().map(ToString::to_string);
    }
    result
}

fn commit_inner(s: &Shared, store: &mut Store, bodies: &[&[u8]], close: bool) -> Result<u64, AuditError> {
    let (mut seq, mut prev) = (store.head, store.head_hash.clone());
    let new_head = seq + bodies.len() as u64;
    let checkpoint = s.checkpoints.as_ref().filter(|c| {
        let since = new_head.saturating_sub(store.last_checkpoint);
        since >= c.every || (since > 0 && (close || store.last_checkpoint_at.elapsed() >= c.interval))
    });
    if bodies.is_empty() && checkpoint.is_none() {
        return Ok(0);
    }
    if s.bytes.load(Ordering::SeqCst) >= s.quota {
        // Room from pruning what may go, else fail closed.
        maintain(s, store)?;
        if s.bytes.load(Ordering::SeqCst) >= s.quota {
            return Err(AuditError::QuotaFull(s.quota));
        }
    }
    let first_seq = seq + 1;
    let mut lines = Vec::with_capacity(bodies.iter().map(|b| b.len() + 200).sum::<usize>() + 400);
    let mut time = 0;
    for body in bodies {
        seq += 1;
        time = now_ms();
        let hash = hash_of(seq, time, &prev, body);
        write_line(&mut lines, seq, time, &prev, &hash, body);
        lines.push(b'\n');
        prev = hash;
    }
    let signed = checkpoint.map(|c| {
        let cp = checkpoint::Checkpoint::sign(&c.signer, seq, &prev, now_ms());
        let body = serde_json::to_vec(&cp.body()).unwrap_or_default();
        seq += 1;
        time = now_ms();
        let hash = hash_of(seq, time, &prev, &body);
        write_line(&mut lines, seq, time, &prev, &hash, &body);
        lines.push(b'\n');
        prev = hash;
        cp
    });
    match store.append(first_seq, &lines, (seq, &prev, time)) {
        Ok(()) => {
            s.fsyncs.fetch_add(1, Ordering::SeqCst);
            s.head_seq.store(seq, Ordering::SeqCst);
            s.bytes.fetch_add(lines.len() as u64, Ordering::SeqCst);
            if let Some(t) = &s.trace {
                t.note(format!("fsync-done {first_seq}-{seq}"));
            }
            if let Some(cp) = signed {
                store.last_checkpoint = seq;
                store.last_checkpoint_at = Instant::now();
                if let Err(e) = checkpoint::append_file(&store.dir, &cp) {
                    tracing::warn!(error = %e, "audit: could not keep the checkpoint beside the log (it is in the log)");
                }
            }
            Ok(if bodies.is_empty() { 0 } else { first_seq })
        }
        Err(e) => {
            tracing::error!(error = %e, "audit append failed");
            // The chain continues from what is on disk.
            if let Ok(fresh) = Store::open(&store.dir, store.segment_limit) {
                *store = fresh;
            }
            Err(e)
        }
    }
}

/// The result of `verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub anchor: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub records: u64,
    /// Checkpoints compared with the records (beside the log and in it).
    pub checkpoints: u64,
    /// The newest record a checkpoint covers: records after it are not protected against a
    /// rewrite by someone holding the node key or deleting the checkpoints too.
    pub last_checkpoint: Option<u64>,
    /// Whether the checkpoints' signatures were checked (a node public key was given).
    pub signatures_checked: bool,
}

/// Every stored line of the log, in file order.
fn lines(dir: &Path) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    if !dir.exists() {
        // No log yet (the agent never ran here): nothing to check, nothing created.
        return Ok(out);
    }
    for (_, path) in segment_files(dir).map_err(|e| format!("cannot read audit log {}: {e}", dir.display()))? {
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Without the zero-filled room ahead of the last write.
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        out.extend(data[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec));
    }
    Ok(out)
}

/// Checks the chain from the anchor to the head, and every checkpoint (beside the log and in
/// it) against it: signed by `key` when given, and naming the hash the record it covers has.
/// The error names the first record that is modified, missing, out of place, or contradicts a
/// checkpoint (records cut from the tail or a deleted last segment; a rewrite whose hashes were
/// recomputed).
pub fn verify(dir: &Path, key: Option<&ed25519_dalek::VerifyingKey>) -> Result<VerifyReport, String> {
    use std::collections::BTreeMap;
    let meta = read_meta(dir).map_err(|e| e.to_string())?;
    let anchor = meta.anchor.unwrap_or_else(Anchor::genesis);
    let signed = |cp: &checkpoint::Checkpoint, place: &str| match key {
        Some(k) if !cp.is_signed_by(k) => {
            Err(format!("the checkpoint of record {} {place} is not signed by the node key: forged or altered", cp.seq))
        }
        _ => Ok(()),
    };
    // What the checkpoints kept beside the log say: seq -> (hash, signing time).
    let mut expected: BTreeMap<u64, (String, i64)> = BTreeMap::new();
    for cp in checkpoint::read_file(dir)? {
        signed(&cp, &format!("in {}", checkpoint::FILE))?;
        if cp.seq == anchor.seq && anchor.seq > 0 && cp.hash != anchor.hash_hex() {
            return Err(format!("the prune anchor (record {}) contradicts its signed checkpoint", anchor.seq));
        }
        if cp.seq > anchor.seq {
            expected.insert(cp.seq, (cp.hash, cp.time_ms));
        }
    }
    let all = lines(dir)?;
    let seqs: Vec<Option<u64>> = all.iter().map(|l| seq_of(l)).collect();
    let mut prev = if anchor.seq == 0 { GENESIS.to_owned() } else { anchor.hash_hex() };
    let mut report = VerifyReport {
        anchor: anchor.seq,
        first: None,
        last: None,
        records: 0,
        checkpoints: 0,
        last_checkpoint: None,
        signatures_checked: key.is_some(),
    };
    // The newest record known to be as signed: what a rewrite found later begins after.
    let mut good_up_to = anchor.seq;
    for (i, (line, (expect, seq))) in all.iter().zip((anchor.seq + 1..).zip(&seqs)).enumerate() {
        let Some(seq) = *seq else {
            return Err(format!("record {expect} is unreadable"));
        };
        if seq < expect {
            return Err(format!("record {seq} appears again after record {}: inserted or reordered", expect - 1));
        }
        if seq > expect {
            return Err(if seqs[i..].contains(&Some(expect)) {
                format!("record {expect} is out of order (found after record {seq}): reordered")
            } else {
                format!("record {expect} is missing (next present: {seq})")
            });
        }
        let rec: Record = serde_json::from_slice(line).map_err(|e| format!("record {seq} is unreadable: {e}"))?;
        if rec.seq != seq || Record::compute_hash(rec.seq, rec.time_ms, &rec.prev, &rec.body) != rec.hash {
            return Err(format!("record {seq} was modified (its hash does not match its content)"));
        }
        if rec.prev != prev {
            return Err(format!("record {seq} does not follow record {}: modified, replaced or reordered", seq - 1));
        }
        if let Some(cp) = checkpoint::Checkpoint::from_body(&rec.body) {
            signed(&cp, &format!("carried by record {seq}"))?;
            if cp.seq + 1 != seq || cp.hash != rec.prev {
                return Err(format!("record {seq} carries a checkpoint that does not match record {}", seq - 1));
            }
            expected.entry(cp.seq).or_insert((cp.hash, cp.time_ms));
        }
        if let Some((hash, time_ms)) = expected.get(&seq) {
            if *hash != rec.hash {
                return Err(format!(
                    "record {seq} contradicts the checkpoint signed at {}: records {}..={seq} were rewritten \
                     (first affected seq: {})",
                    time_text(*time_ms),
                    good_up_to + 1,
                    good_up_to + 1
                ));
            }
            good_up_to = seq;
            report.checkpoints += 1;
            report.last_checkpoint = Some(seq);
        }
        report.first.get_or_insert(seq);
        report.last = Some(seq);
        report.records += 1;
        prev = rec.hash;
    }
    let end = report.last.unwrap_or(anchor.seq);
    if let Some((&seq, (_, time_ms))) = expected.range(end + 1..).next_back() {
        return Err(format!(
            "records {}..={seq} are missing from the tail: the log ends at record {end} but a checkpoint \
             signed at {} covers record {seq} (cut, or a segment deleted; first affected seq: {})",
            end + 1,
            time_text(*time_ms),
            end + 1
        ));
    }
    Ok(report)
}

/// A time in ms since the epoch as RFC 3339 (UTC), for messages.
fn time_text(ms: i64) -> String {
    outpost_proto::registry::format_time(ms.div_euclid(1000))
}

/// Every record (as stored JSON) with `time_ms >= since_ms`, for `outpost audit export`.
pub fn export(dir: &Path, since_ms: i64, out: &mut dyn std::io::Write) -> Result<u64, String> {
    let mut n = 0;
    for line in lines(dir)? {
        let rec: Record = serde_json::from_slice(&line).map_err(|e| e.to_string())?;
        if rec.time_ms >= since_ms {
            out.write_all(&line).map_err(|e| e.to_string())?;
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
