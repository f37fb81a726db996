//! `outpost audit verify` and `export`: reading the log back, checking the chain and the
//! checkpoints against it.

use super::*;

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

/// Hands every stored line of the log to `each`, in file order, one segment in memory at a
/// time (a segment is at most 8 MiB and its zeroed room); stops at `each`'s first error.
pub(super) fn for_each_line(dir: &Path, mut each: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
    if !dir.exists() {
        // No log yet (the agent never ran here): nothing to check, nothing created.
        return Ok(());
    }
    for (_, path) in segment_files(dir).map_err(|e| format!("cannot read audit log {}: {e}", dir.display()))? {
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Without the zero-filled room ahead of the last write.
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        for line in data[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            each(line)?;
        }
    }
    Ok(())
}

/// Every stored record, oldest first, parsed and as its stored line (reads only).
pub fn each_record(dir: &Path, mut each: impl FnMut(&Record, &[u8]) -> Result<(), String>) -> Result<(), String> {
    for_each_line(dir, |line| {
        let rec: Record = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        each(&rec, line)
    })
}

/// Whether any stored line is record `seq`.
fn holds(dir: &Path, seq: u64) -> bool {
    for_each_line(dir, |line| if seq_of(line) == Some(seq) { Err(String::new()) } else { Ok(()) }).is_err()
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
    let mut expect = anchor.seq + 1;
    for_each_line(dir, |line| {
        let Some(seq) = seq_of(line) else {
            return Err(format!("record {expect} is unreadable"));
        };
        if seq < expect {
            return Err(format!("record {seq} appears again after record {}: inserted or reordered", expect - 1));
        }
        if seq > expect {
            // Every line before this one was in order: one holding `expect` can only come later.
            return Err(if holds(dir, expect) {
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
        expect += 1;
        Ok(())
    })?;
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
pub(super) fn time_text(ms: i64) -> String {
    outpost_proto::registry::format_time(ms.div_euclid(1000))
}

/// Every record (as stored JSON) with `time_ms >= since_ms`, for `outpost audit export`.
pub fn export(dir: &Path, since_ms: i64, out: &mut dyn std::io::Write) -> Result<u64, String> {
    let mut n = 0;
    each_record(dir, |rec, line| {
        if rec.time_ms >= since_ms {
            out.write_all(line).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}
