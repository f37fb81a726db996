//! The commit thread: group commit, the signed checkpoints it adds, retention and quota.

use super::*;

pub(super) struct Pending {
    /// The body as JSON, serialized by the caller (off the committer thread).
    pub(super) body: Vec<u8>,
    pub(super) reply: oneshot::Sender<Result<u64, AuditError>>,
}

/// What the committer thread is asked to do.
pub(super) enum Msg {
    Append(Pending),
    /// A commit made on a caller's thread used up room: zero-fill more, off that caller's path.
    Preallocate,
    /// Sign the head now (when records came after the last checkpoint), then answer.
    Checkpoint(oneshot::Sender<()>),
}

pub(super) struct Shared {
    pub(super) store: Mutex<Store>,
    pub(super) bytes: AtomicU64,
    pub(super) head_seq: AtomicU64,
    pub(super) fsyncs: AtomicU64,
    /// Records sent to the committer and not yet taken into a commit.
    pub(super) queued: AtomicU64,
    /// `group_commit_max_delay`: with a delay, lone records wait for company on the committer.
    pub(super) max_delay: Duration,
    pub(super) quota: u64,
    pub(super) keep_unsent: bool,
    pub(super) retention: Duration,
    pub(super) checkpoints: Option<Checkpoints>,
    /// The last commit failed with a store error: appends are being refused.
    pub(super) refusing: Mutex<Option<String>>,
    pub(super) store_failing: std::sync::atomic::AtomicBool,
    pub(super) trace: Option<Arc<Trace>>,
}

/// Signed checkpoints of the head: the node's key and when to sign.
pub(super) struct Checkpoints {
    pub(super) signer: checkpoint::Signer,
    pub(super) every: u64,
    pub(super) interval: Duration,
}

/// Retention and quota: segments older than `retention` go, and when the retained records
/// reach 80 % of the quota the oldest go until half of it is left. With `[upstream]` neither
/// ever drops a record not yet sent (a full quota then fails closed).
pub(super) fn maintain(s: &Shared, store: &mut Store) -> Result<u64, AuditError> {
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

pub(super) fn drop_bytes(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
}

/// How long [`Audit::close`] waits for the commit thread to finish.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How often the committer looks after retention and due checkpoints while idle.
pub(super) const MAINTENANCE_TICK: Duration = Duration::from_secs(1);

pub(super) fn committer(s: &Shared, rx: &std::sync::mpsc::Receiver<Msg>) {
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
pub(super) fn commit(s: &Shared, store: &mut Store, bodies: &[&[u8]], close: bool) -> Result<u64, AuditError> {
    let result = commit_inner(s, store, bodies, close);
    let failed = matches!(result, Err(AuditError::Store(_)));
    // The lock only on a change (the flag is read without it on every commit).
    if failed || s.store_failing.load(Ordering::Relaxed) {
        s.store_failing.store(failed, Ordering::Relaxed);
        *s.refusing.locked() = result.as_ref().err().map(ToString::to_string);
    }
    result
}

pub(super) fn commit_inner(s: &Shared, store: &mut Store, bodies: &[&[u8]], close: bool) -> Result<u64, AuditError> {
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
        let cp = c.signer.sign(seq, &prev, now_ms());
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
