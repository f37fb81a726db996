//! The segment files: scanning and torn-tail recovery at open, positioned appends into room
//! zero-filled ahead (and spare segments zero-filled by a thread of their own), reads, prunes.

use super::*;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Meta {
    #[serde(default)]
    pub(super) anchor: Option<Anchor>,
    #[serde(default)]
    pub(super) sent: u64,
    #[serde(default)]
    pub(super) inflight: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) path: PathBuf,
    pub(super) first: u64,
    /// 0 when empty.
    pub(super) last: u64,
    pub(super) last_hash: String,
    pub(super) last_time_ms: i64,
    pub(super) bytes: u64,
}

/// Bytes zero-filled ahead of the active segment's write position.
pub(super) const PREALLOC: u64 = 1 << 20;

/// The next segment's file, zero-filled and synced by a thread of its own while the active
/// segment fills, so a new segment starts with room for all its records and the commit thread
/// never stops to refill it (a refill held commits for ~1.5 ms per 512 KiB; BENCHMARKS.md).
pub(super) enum Spare {
    Making(std::thread::JoinHandle<std::io::Result<(File, u64, PathBuf)>>),
    Ready(File, u64, PathBuf),
}

/// Spare files are named `spare-<pid>-<n>.zero`: never a segment's name, and removed at open
/// (a spare left by a crash may be partly written).
pub(super) fn is_spare_name(name: &str) -> bool {
    name.starts_with("spare-") && name.ends_with(".zero")
}

/// Writes zero bytes over `from..to` of `f`, at most 1 MiB at a time.
pub(super) fn write_zeros(f: &File, from: u64, to: u64) -> std::io::Result<()> {
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
pub(super) fn zero_file(path: &Path, len: u64) -> std::io::Result<File> {
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

pub(super) struct Store {
    pub(super) dir: PathBuf,
    pub(super) segments: Vec<Segment>,
    /// The active (last) segment, open for positioned writes.
    pub(super) file: Option<File>,
    /// Length of the active segment's file: records, then zeros (synced) up to here.
    pub(super) file_len: u64,
    pub(super) segment_limit: u64,
    pub(super) meta: Meta,
    pub(super) head: u64,
    pub(super) head_hash: String,
    /// Where the last `range` read stopped: (segment index, byte offset, next seq).
    pub(super) cursor: Option<(usize, u64, u64)>,
    /// The next segment's zero-filled file, once a segment has started.
    pub(super) spare: Option<Spare>,
    /// The sequence number of the last checkpoint record (0: none yet).
    pub(super) last_checkpoint: u64,
    pub(super) last_checkpoint_at: Instant,
}

pub(super) fn fsync_path(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

pub(super) fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// The segment files of a directory, in order.
pub(super) fn segment_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
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

pub(super) fn read_meta(dir: &Path) -> Result<Meta, AuditError> {
    match std::fs::read(dir.join("meta.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| store_err(format!("audit meta.json: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
        Err(e) => Err(store_err(e)),
    }
}

impl Store {
    pub(super) fn write_meta(&self) -> Result<(), AuditError> {
        let bytes = serde_json::to_vec(&self.meta).map_err(store_err)?;
        crate::store::write_atomic(&self.dir.join("meta.json"), &bytes).map_err(store_err)
    }

    /// Scans the segments; a torn last line (a crash mid-write: never acknowledged) is cut off.
    pub(super) fn open(dir: &Path, segment_limit: u64) -> Result<Store, AuditError> {
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
    pub(super) fn start_spare(&mut self) {
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
    pub(super) fn finish_spare(&mut self) {
        if let Some(Spare::Making(h)) = self.spare.take() {
            match h.join() {
                Ok(Ok((f, len, path))) => self.spare = Some(Spare::Ready(f, len, path)),
                Ok(Err(e)) => tracing::warn!(error = %e, "audit: could not zero-fill the next log segment"),
                Err(_) => tracing::warn!("audit: the thread zero-filling the next log segment panicked"),
            }
        }
    }

    /// The spare, if it is ready now (one still being made stays for the next segment).
    pub(super) fn take_spare(&mut self) -> Option<(File, u64, PathBuf)> {
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
    pub(super) fn append(&mut self, first_seq: u64, lines: &[u8], last: (u64, &str, i64)) -> Result<(), AuditError> {
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
    pub(super) fn room_is_low(&self) -> bool {
        let (Some(_), Some(seg)) = (self.file.as_ref(), self.segments.last()) else { return false };
        self.file_len < seg.bytes + PREALLOC.min(self.segment_limit) / 2
    }

    /// Zero-fills the active segment `PREALLOC` bytes past its records when less than half of
    /// that is left, and syncs it, so the next commits overwrite blocks the file already has.
    /// Called after a commit's replies went out. A failure only costs speed: appends still work.
    pub(super) fn preallocate(&mut self) {
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

    pub(super) fn range(&mut self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
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

    pub(super) fn retained(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

impl Store {
    /// Drops whole segments from the oldest, never the active one nor one with records past
    /// `upto`, while they are older than `older_than_ms` or more than `keep_bytes` are
    /// retained; moves the anchor to the last dropped record. Returns (records, bytes) dropped.
    pub(super) fn prune(&mut self, older_than_ms: i64, upto: u64, keep_bytes: u64) -> Result<(u64, u64), AuditError> {
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
