//! The witness: what a batch of a node's audit records does to the chain the collector has seen
//! of it. Pure (no database): the caller hands in the head, the records, the hashes already
//! stored for the sequence numbers the batch repeats, and the node's pinned key; it gets back
//! the rows to store, the alarms to raise and the new head.
//!
//! Rules:
//! - a record at `head + 1` extends the chain; its `prev` must be the head's hash and its own
//!   hash must cover its fields, else `broken_link` / `bad_hash` (stored all the same: nothing
//!   the node sent is lost);
//! - a record past `head + 1` leaves a `gap`, except for the first record ever seen of a node
//!   (a node whose older records were pruned before it was enrolled);
//! - a record at or below the head is a re-send when its hash is the stored one (dropped), a
//!   `fork` otherwise (kept as a conflict, not as a record);
//! - a checkpoint record must be signed by the node's key (`bad_checkpoint`) and attest the hash
//!   the collector holds at its sequence number (`checkpoint_contradicts`).

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use outpost_proto::audit::{Checkpoint, Record};

/// The last record of a node's chain the collector has stored (`seq` 0: none yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// One line of a batch, parsed.
#[derive(Debug, Clone)]
pub enum Line {
    Record {
        record: Record,
        body_json: String,
    },
    /// A line that is not a record (kept as a conflict, raised as an alarm).
    Unreadable(String),
}

/// Parses a batch's NDJSON lines (empty lines skipped).
pub fn parse(ndjson: &[u8]) -> Vec<Line> {
    ndjson
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(|l| match serde_json::from_slice::<Record>(l) {
            Ok(record) => {
                let body_json = serde_json::to_string(&record.body).unwrap_or_default();
                Line::Record { record, body_json }
            }
            Err(_) => Line::Unreadable(String::from_utf8_lossy(&l[..l.len().min(64 << 10)]).into_owned()),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlarmKind {
    Gap,
    BrokenLink,
    BadHash,
    Fork,
    BadCheckpoint,
    CheckpointContradicts,
    Unreadable,
    TailCut,
}

impl AlarmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::Gap => "gap",
            AlarmKind::BrokenLink => "broken_link",
            AlarmKind::BadHash => "bad_hash",
            AlarmKind::Fork => "fork",
            AlarmKind::BadCheckpoint => "bad_checkpoint",
            AlarmKind::CheckpointContradicts => "checkpoint_contradicts",
            AlarmKind::Unreadable => "unreadable",
            AlarmKind::TailCut => "tail_cut",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    pub kind: AlarmKind,
    pub seq: Option<u64>,
    pub detail: String,
}

/// A record to store.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: u64,
    pub time_ms: i64,
    pub prev: String,
    pub hash: String,
    pub body_json: String,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub alarms: Vec<Alarm>,
    /// Lines that contradict the chain (seq, the line as received).
    pub conflicts: Vec<(Option<u64>, String)>,
    /// The head after the batch (unchanged when nothing extends it).
    pub head: Option<Head>,
    /// Records the batch repeated with the hash already stored.
    pub duplicates: usize,
    /// The newest checkpoint verified: (seq it attests, its time).
    pub checkpoint: Option<(u64, i64)>,
}

/// Why a whole batch is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("a checkpoint of node '{0}' in a batch of another node")]
    OtherNode(String),
}

/// The sequence numbers whose stored hashes [`witness`] needs: repeated records and the heads
/// that checkpoints attest, at or below `head`.
pub fn needed_hashes(head: &Head, lines: &[Line]) -> Vec<u64> {
    let mut seqs = Vec::new();
    for l in lines {
        if let Line::Record { record, .. } = l {
            if record.seq <= head.seq {
                seqs.push(record.seq);
            }
            if let Some(cp) = Checkpoint::from_body(&record.body) {
                if cp.seq <= head.seq {
                    seqs.push(cp.seq);
                }
            }
        }
    }
    seqs.sort_unstable();
    seqs.dedup();
    seqs
}

fn alarm(kind: AlarmKind, seq: Option<u64>, detail: String) -> Alarm {
    Alarm { kind, seq, detail }
}

/// Applies one batch of `node`'s records to its chain.
pub fn witness(
    node: &str,
    head: &Head,
    lines: Vec<Line>,
    stored: &HashMap<u64, String>,
    key: Option<&VerifyingKey>,
) -> Result<Outcome, Refusal> {
    let mut out = Outcome::default();
    let mut cur = head.clone();
    // Hashes of this batch's stored rows, for checkpoints later in the batch.
    let mut batch: HashMap<u64, String> = HashMap::new();
    for line in lines {
        let (record, body_json) = match line {
            Line::Record { record, body_json } => (record, body_json),
            Line::Unreadable(text) => {
                out.alarms.push(alarm(
                    AlarmKind::Unreadable,
                    None,
                    "a line of the batch is not an audit record".into(),
                ));
                out.conflicts.push((None, text));
                continue;
            }
        };
        let cp = Checkpoint::from_body(&record.body);
        if let Some(cp) = &cp {
            if cp.node != node {
                return Err(Refusal::OtherNode(cp.node.clone()));
            }
        }
        let seq = record.seq;
        if seq <= cur.seq {
            match stored.get(&seq).or_else(|| batch.get(&seq)) {
                Some(h) if *h == record.hash && record.hash_holds() => out.duplicates += 1,
                Some(h) if *h == record.hash => {
                    out.alarms.push(alarm(
                        AlarmKind::BadHash,
                        Some(seq),
                        format!("record {seq} came again with the witnessed hash over other fields"),
                    ));
                    out.conflicts.push((Some(seq), serde_json::to_string(&record).unwrap_or_default()));
                }
                Some(h) => {
                    out.alarms.push(alarm(
                        AlarmKind::Fork,
                        Some(seq),
                        format!(
                            "a second record for seq {seq} (hash {} where {} was witnessed)",
                            short(&record.hash),
                            short(h)
                        ),
                    ));
                    out.conflicts.push((Some(seq), serde_json::to_string(&record).unwrap_or_default()));
                }
                // Below the head but not stored: dropped by retention, or never sent (a gap
                // already raised). Stored now: nothing the node sends is lost.
                None => out.rows.push(row(&record, body_json)),
            }
            continue;
        }
        if seq > cur.seq + 1 && cur.seq > 0 {
            out.alarms.push(alarm(
                AlarmKind::Gap,
                Some(seq),
                format!("records {}..={} never arrived", cur.seq + 1, seq - 1),
            ));
        } else if cur.seq > 0 && record.prev != cur.hash {
            out.alarms.push(alarm(
                AlarmKind::BrokenLink,
                Some(seq),
                format!("prev {} is not the hash of record {} ({})", short(&record.prev), cur.seq, short(&cur.hash)),
            ));
        }
        if !record.hash_holds() {
            out.alarms.push(alarm(
                AlarmKind::BadHash,
                Some(seq),
                format!("record {seq}'s hash does not cover its fields"),
            ));
        }
        if let Some(cp) = cp {
            match key {
                Some(k) if !cp.is_signed_by(k) => out.alarms.push(alarm(
                    AlarmKind::BadCheckpoint,
                    Some(seq),
                    format!("checkpoint at {seq} is not signed by the node's key"),
                )),
                Some(_) => {
                    let held = if cp.seq == cur.seq { Some(&cur.hash) } else { None };
                    let held = held.or_else(|| batch.get(&cp.seq)).or_else(|| stored.get(&cp.seq));
                    match held {
                        Some(h) if *h != cp.hash => out.alarms.push(alarm(
                            AlarmKind::CheckpointContradicts,
                            Some(cp.seq),
                            format!(
                                "signed checkpoint says record {} has hash {}, the witnessed record has {}",
                                cp.seq,
                                short(&cp.hash),
                                short(h)
                            ),
                        )),
                        _ => out.checkpoint = Some((cp.seq, cp.time_ms)),
                    }
                }
                None => {}
            }
        }
        batch.insert(seq, record.hash.clone());
        cur = Head { seq, hash: record.hash.clone() };
        out.rows.push(row(&record, body_json));
    }
    if cur != *head {
        out.head = Some(cur);
    }
    Ok(out)
}

fn row(r: &Record, body_json: String) -> Row {
    Row { seq: r.seq, time_ms: r.time_ms, prev: r.prev.clone(), hash: r.hash.clone(), body_json }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::audit::GENESIS;
    use outpost_proto::registry::KeyPair;
    use serde_json::json;

    fn chain(from: u64, n: u64, prev: &str) -> Vec<Record> {
        let mut prev = prev.to_owned();
        (from..from + n)
            .map(|seq| {
                let body = json!({"kind": "inference", "n": seq});
                let hash = Record::compute_hash(seq, 1000 + seq as i64, &prev, &body);
                let r = Record { seq, time_ms: 1000 + seq as i64, prev: prev.clone(), hash: hash.clone(), body };
                prev = hash;
                r
            })
            .collect()
    }

    fn lines(rs: &[Record]) -> Vec<Line> {
        let text: Vec<u8> =
            rs.iter().flat_map(|r| [serde_json::to_vec(r).unwrap_or_default(), b"\n".to_vec()].concat()).collect();
        parse(&text)
    }

    fn genesis() -> Head {
        Head { seq: 0, hash: GENESIS.into() }
    }

    fn kinds(o: &Outcome) -> Vec<AlarmKind> {
        o.alarms.iter().map(|a| a.kind).collect()
    }

    #[test]
    fn a_clean_chain_extends_the_head_and_a_resend_stores_nothing() {
        let rs = chain(1, 5, GENESIS);
        let o = witness("n", &genesis(), lines(&rs), &HashMap::new(), None).expect("accepted");
        assert_eq!(o.rows.len(), 5);
        assert!(o.alarms.is_empty(), "{:?}", o.alarms);
        let head = o.head.expect("moved");
        assert_eq!(head.seq, 5);
        let stored: HashMap<u64, String> = rs.iter().map(|r| (r.seq, r.hash.clone())).collect();
        assert_eq!(needed_hashes(&head, &lines(&rs)), vec![1, 2, 3, 4, 5]);
        let again = witness("n", &head, lines(&rs), &stored, None).expect("accepted");
        assert_eq!((again.rows.len(), again.duplicates), (0, 5));
        assert!(again.alarms.is_empty() && again.head.is_none());
    }

    #[test]
    fn every_break_of_the_chain_raises_its_alarm() {
        let rs = chain(1, 6, GENESIS);
        let head = Head { seq: 2, hash: rs[1].hash.clone() };
        let stored: HashMap<u64, String> = rs[..2].iter().map(|r| (r.seq, r.hash.clone())).collect();
        // Gap: 3 never arrives.
        let o = witness("n", &head, lines(&rs[3..]), &stored, None).expect("accepted");
        assert_eq!(kinds(&o), vec![AlarmKind::Gap]);
        assert_eq!(o.rows.len(), 3, "records after a gap are kept");
        // Broken link: 3's prev rewritten, its hash recomputed.
        let mut r3 = rs[2].clone();
        r3.prev = "ab".repeat(32);
        r3.hash = Record::compute_hash(3, r3.time_ms, &r3.prev, &r3.body);
        assert_eq!(
            kinds(&witness("n", &head, lines(&[r3]), &stored, None).expect("accepted")),
            vec![AlarmKind::BrokenLink]
        );
        // Bad hash: 3's body edited, hash left.
        let mut r3 = rs[2].clone();
        r3.body = json!({"kind": "inference", "n": 99});
        assert_eq!(
            kinds(&witness("n", &head, lines(&[r3]), &stored, None).expect("accepted")),
            vec![AlarmKind::BadHash]
        );
        // Fork: 2 again with another hash (a tail cut and rewritten).
        let other = chain(2, 1, &rs[0].hash);
        let mut o = witness("n", &head, lines(&other), &stored, None).expect("accepted");
        let mut other_2 = Record { body: json!({"kind": "other"}), ..other[0].clone() };
        other_2.hash = Record::compute_hash(2, other_2.time_ms, &other_2.prev, &other_2.body);
        assert_eq!(kinds(&o), Vec::<AlarmKind>::new(), "the same record again is a re-send");
        o = witness("n", &head, lines(&[other_2]), &stored, None).expect("accepted");
        assert_eq!(kinds(&o), vec![AlarmKind::Fork]);
        assert!(o.rows.is_empty() && o.conflicts.len() == 1, "a fork is kept as a conflict");
        // The witnessed hash with another body: not a re-send.
        let forged = Record { body: json!({"kind": "other"}), ..rs[1].clone() };
        let o = witness("n", &head, lines(&[forged]), &stored, None).expect("accepted");
        assert_eq!(kinds(&o), vec![AlarmKind::BadHash]);
        assert!(o.rows.is_empty() && o.conflicts.len() == 1);
        // Unreadable line.
        let o = witness("n", &head, parse(b"not json\n"), &stored, None).expect("accepted");
        assert_eq!(kinds(&o), vec![AlarmKind::Unreadable]);
    }

    #[test]
    fn the_first_records_seen_of_a_node_may_start_past_one() {
        let rs = chain(40, 3, &"cd".repeat(32));
        let o = witness("n", &genesis(), lines(&rs), &HashMap::new(), None).expect("accepted");
        assert!(o.alarms.is_empty(), "{:?}", o.alarms);
        assert_eq!(o.head.map(|h| h.seq), Some(42));
    }

    #[test]
    fn checkpoints_are_checked_against_the_key_and_the_witnessed_hash() {
        let key = KeyPair::generate().expect("key");
        let vk = key.public().verifying_key().expect("public");
        let rs = chain(1, 3, GENESIS);
        let with_cp = |cp: Checkpoint| {
            let body = cp.body();
            let hash = Record::compute_hash(4, 2000, &rs[2].hash, &body);
            let mut all = rs.clone();
            all.push(Record { seq: 4, time_ms: 2000, prev: rs[2].hash.clone(), hash, body });
            lines(&all)
        };
        let good = Checkpoint::sign(&key, "n", 3, &rs[2].hash, 2000);
        let o = witness("n", &genesis(), with_cp(good), &HashMap::new(), Some(&vk)).expect("accepted");
        assert!(o.alarms.is_empty(), "{:?}", o.alarms);
        assert_eq!(o.checkpoint, Some((3, 2000)));
        // Signed by the node, over a hash that is not the witnessed one.
        let lying = Checkpoint::sign(&key, "n", 2, &"ee".repeat(32), 2000);
        let o = witness("n", &genesis(), with_cp(lying), &HashMap::new(), Some(&vk)).expect("accepted");
        assert_eq!(kinds(&o), vec![AlarmKind::CheckpointContradicts]);
        // Not signed by the node's key.
        let other = KeyPair::generate().expect("key");
        let forged = Checkpoint::sign(&other, "n", 3, &rs[2].hash, 2000);
        let o = witness("n", &genesis(), with_cp(forged), &HashMap::new(), Some(&vk)).expect("accepted");
        assert_eq!(kinds(&o), vec![AlarmKind::BadCheckpoint]);
        // Another node's checkpoint in this node's batch.
        let foreign = Checkpoint::sign(&key, "m", 3, &rs[2].hash, 2000);
        let e = witness("n", &genesis(), with_cp(foreign), &HashMap::new(), Some(&vk)).expect_err("refused");
        assert_eq!(e, Refusal::OtherNode("m".into()));
    }
}
