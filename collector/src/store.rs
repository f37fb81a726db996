//! What the collector keeps in PostgreSQL: enrolled nodes and readers, each node's witnessed
//! chain (head, alarms, conflicts) and its audit records, heartbeats.
//!
//! A batch is applied in one transaction that holds the node's chain row (`FOR UPDATE`), so
//! collectors sharing the database apply one node's batches one at a time, in whatever order
//! they arrive, and a batch re-sent after a crash stores nothing twice (idempotent by
//! `(node, seq)`).

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use outpost_proto::audit::GENESIS;
use sha2::Digest;

use crate::db::{DbError, Pool};
use crate::witness::{self, Alarm, AlarmKind, Head, Line, Outcome, Refusal};

pub const DAY_MS: i64 = 86_400_000;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The SHA-256 of a bearer token, hex: what the database keeps.
pub fn token_digest(token: &str) -> String {
    outpost_proto::registry::hex::encode(&sha2::Sha256::digest(token.trim().as_bytes()))
}

/// A new random token: 32 bytes, hex.
pub fn new_token() -> Result<String, String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness: {e}"))?;
    Ok(outpost_proto::registry::hex::encode(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("node '{0}' is already enrolled (use --rotate to issue a new token)")]
    Enrolled(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Db(DbError::Pg(e))
    }
}

/// What applying a batch did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub stored: usize,
    pub duplicates: usize,
    pub alarms: Vec<Alarm>,
    pub head_seq: u64,
}

pub struct Store {
    pub pool: Pool,
    /// Days of records kept (`retention_days`): a record's partition day is kept within them.
    pub keep_days: u32,
}

impl Store {
    /// The partition day of a record at `time_ms`: its own day, kept between the oldest day
    /// retention keeps and tomorrow, so a node's clock (or a hostile node) cannot make the
    /// collector create a partition per distinct day it writes. The record's own time is
    /// stored as sent (and is what its hash covers).
    fn partition_day(&self, time_ms: i64, today: i64) -> i64 {
        partition_day(time_ms, today, self.keep_days)
    }
}

fn partition_day(time_ms: i64, today: i64, keep_days: u32) -> i64 {
    time_ms.div_euclid(DAY_MS).clamp(today - i64::from(keep_days), today + 1)
}

impl Store {
    /// Enrolls a node (or rotates its token); returns the token to give it. `key` pins the
    /// node's checkpoint key now instead of at its first heartbeat.
    pub async fn enroll(&self, node: &str, key: Option<&str>, rotate: bool) -> Result<String, StoreError> {
        if !outpost_proto::valid_name(node) {
            return Err(StoreError::Invalid(format!("'{node}' is not a valid node name ([A-Za-z0-9._-], 1-128)")));
        }
        let token = new_token().map_err(StoreError::Invalid)?;
        let digest = token_digest(&token);
        let c = self.pool.get().await?;
        let changed = if rotate {
            c.execute(
                "INSERT INTO nodes (node, token_sha256, enrolled_ms, node_key) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node) DO UPDATE SET token_sha256 = $2, node_key = COALESCE($4, nodes.node_key)",
                &[&node, &digest, &now_ms(), &key],
            )
            .await?
        } else {
            c.execute(
                "INSERT INTO nodes (node, token_sha256, enrolled_ms, node_key) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node) DO NOTHING",
                &[&node, &digest, &now_ms(), &key],
            )
            .await?
        };
        if changed == 0 {
            return Err(StoreError::Enrolled(node.to_owned()));
        }
        Ok(token)
    }

    /// Adds a reader (read access to the fleet view); returns its token.
    pub async fn add_reader(&self, name: &str) -> Result<String, StoreError> {
        if !outpost_proto::valid_name(name) {
            return Err(StoreError::Invalid(format!("'{name}' is not a valid reader name")));
        }
        let token = new_token().map_err(StoreError::Invalid)?;
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO readers (name, token_sha256, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET token_sha256 = $2",
            &[&name, &token_digest(&token), &now_ms()],
        )
        .await?;
        Ok(token)
    }

    /// The node a token belongs to.
    pub async fn node_of(&self, token: &str) -> Result<Option<String>, StoreError> {
        let c = self.pool.get().await?;
        let row = c.query_opt("SELECT node FROM nodes WHERE token_sha256 = $1", &[&token_digest(token)]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Whether a token is a reader's.
    pub async fn is_reader(&self, token: &str) -> Result<bool, StoreError> {
        let c = self.pool.get().await?;
        Ok(c.query_opt("SELECT 1 FROM readers WHERE token_sha256 = $1", &[&token_digest(token)]).await?.is_some())
    }

    /// Applies one audit batch of `node` (its NDJSON lines).
    pub async fn apply_batch(&self, node: &str, ndjson: &[u8]) -> Result<Applied, StoreError> {
        let lines = witness::parse(ndjson);
        let today = now_ms().div_euclid(DAY_MS);
        let days: Vec<i64> = lines
            .iter()
            .filter_map(|l| match l {
                Line::Record { record, .. } => Some(self.partition_day(record.time_ms, today)),
                Line::Unreadable(_) => None,
            })
            .collect();
        self.pool.ensure_partitions(&days).await?;
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "INSERT INTO chains (node, head_hash) VALUES ($1, $2) ON CONFLICT (node) DO NOTHING",
            &[&node, &GENESIS],
        )
        .await?;
        let row = tx
            .query_one(
                "SELECT c.head_seq, c.head_hash, n.node_key FROM chains c JOIN nodes n USING (node) \
                 WHERE c.node = $1 FOR UPDATE OF c",
                &[&node],
            )
            .await?;
        let head = Head { seq: row.get::<_, i64>(0) as u64, hash: row.get(1) };
        let key: Option<VerifyingKey> = row.get::<_, Option<String>>(2).and_then(|k| parse_key(&k));
        let needed: Vec<i64> = witness::needed_hashes(&head, &lines).into_iter().map(|s| s as i64).collect();
        let mut stored = HashMap::new();
        if !needed.is_empty() {
            for r in tx
                .query("SELECT seq, hash FROM audit_records WHERE node = $1 AND seq = ANY($2)", &[&node, &needed])
                .await?
            {
                stored.insert(r.get::<_, i64>(0) as u64, r.get::<_, String>(1));
            }
        }
        let out: Outcome = witness::witness(node, &head, lines, &stored, key.as_ref())?;
        let now = now_ms();
        if !out.rows.is_empty() {
            let seqs: Vec<i64> = out.rows.iter().map(|r| r.seq as i64).collect();
            let times: Vec<i64> = out.rows.iter().map(|r| r.time_ms).collect();
            let days: Vec<i32> = out.rows.iter().map(|r| self.partition_day(r.time_ms, today) as i32).collect();
            let prevs: Vec<&str> = out.rows.iter().map(|r| r.prev.as_str()).collect();
            let hashes: Vec<&str> = out.rows.iter().map(|r| r.hash.as_str()).collect();
            let bodies: Vec<&str> = out.rows.iter().map(|r| r.body_json.as_str()).collect();
            // One statement for the whole batch. A seq already stored (a record below the head
            // that retention had dropped and that came back) is left as it is.
            tx.execute(
                "INSERT INTO audit_records (node, seq, day, time_ms, prev, hash, body, received_ms) \
                 SELECT $1, s, DATE '1970-01-01' + d, t, p, h, b, $7 \
                 FROM UNNEST($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $8::int[]) \
                 AS x(s, t, p, h, b, d) ON CONFLICT DO NOTHING",
                &[&node, &seqs, &times, &prevs, &hashes, &bodies, &now, &days],
            )
            .await?;
        }
        for (seq, line) in &out.conflicts {
            let seq = seq.map(|s| s as i64);
            tx.execute(
                "INSERT INTO chain_conflicts (node, seq, at_ms, line) VALUES ($1, $2, $3, $4)",
                &[&node, &seq, &now, line],
            )
            .await?;
        }
        record_alarms(&tx, node, &out.alarms, now).await?;
        let head_seq = out.head.as_ref().map_or(head.seq, |h| h.seq);
        if let Some(h) = &out.head {
            let last_time = out.rows.iter().find(|r| r.seq == h.seq).map(|r| r.time_ms);
            tx.execute(
                "UPDATE chains SET head_seq = $2, head_hash = $3, head_time_ms = COALESCE($4, head_time_ms), \
                 first_seq = COALESCE(first_seq, $5) WHERE node = $1",
                &[&node, &(h.seq as i64), &h.hash, &last_time, &out.rows.first().map(|r| r.seq as i64)],
            )
            .await?;
        }
        tx.execute("UPDATE chains SET records = records + $2 WHERE node = $1", &[&node, &(out.rows.len() as i64)])
            .await?;
        if let Some((seq, ms)) = out.checkpoint {
            tx.execute(
                "UPDATE chains SET checkpoint_seq = $2, checkpoint_ms = $3 WHERE node = $1",
                &[&node, &(seq as i64), &ms],
            )
            .await?;
        }
        tx.execute("UPDATE nodes SET last_seen_ms = $2 WHERE node = $1", &[&node, &now]).await?;
        tx.commit().await?;
        for a in &out.alarms {
            tracing::warn!(node, kind = a.kind.as_str(), seq = a.seq, detail = %a.detail, "audit chain alarm");
        }
        Ok(Applied { stored: out.rows.len(), duplicates: out.duplicates, alarms: out.alarms, head_seq })
    }

    /// Records a heartbeat: the inventory as sent, the node's key pinned at its first one, and a
    /// `tail_cut` alarm when the node's own head is behind what was already witnessed.
    pub async fn heartbeat(&self, node: &str, body: &serde_json::Value) -> Result<Vec<Alarm>, StoreError> {
        let now = now_ms();
        let key = body.get("node_key").and_then(|k| serde_json::to_string(k).ok()).filter(|k| parse_key(k).is_some());
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "UPDATE nodes SET heartbeat = $2, heartbeat_ms = $3, last_seen_ms = $3, \
             node_key = COALESCE(node_key, $4) WHERE node = $1",
            &[&node, body, &now, &key],
        )
        .await?;
        let mut alarms = Vec::new();
        let claimed = body.pointer("/audit/head_seq").and_then(serde_json::Value::as_u64);
        if let Some(claimed) = claimed {
            let row =
                tx.query_opt("SELECT head_seq, last_alarm FROM chains WHERE node = $1 FOR UPDATE", &[&node]).await?;
            if let Some(row) = row {
                let witnessed = row.get::<_, i64>(0) as u64;
                let last: Option<String> = row.get(1);
                let detail = format!("the node's log ends at {claimed}; records up to {witnessed} were witnessed");
                if claimed < witnessed && last.as_deref() != Some(detail.as_str()) {
                    alarms.push(Alarm { kind: AlarmKind::TailCut, seq: Some(claimed + 1), detail });
                }
            }
        }
        record_alarms(&tx, node, &alarms, now).await?;
        tx.commit().await?;
        for a in &alarms {
            tracing::warn!(node, kind = a.kind.as_str(), seq = a.seq, detail = %a.detail, "audit chain alarm");
        }
        Ok(alarms)
    }

    /// Keeps a node's latest telemetry snapshot (shown in the fleet view).
    pub async fn telemetry(&self, node: &str, snapshot: &serde_json::Value) -> Result<(), StoreError> {
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE nodes SET telemetry = $2, telemetry_ms = $3, last_seen_ms = $3 WHERE node = $1",
            &[&node, snapshot, &now_ms()],
        )
        .await?;
        Ok(())
    }

    /// Re-checks the stored chain of `node` from its first stored record: every hash, every
    /// link, no gap, every checkpoint's signature (with the pinned key) and the hash it attests.
    /// Streams the rows (memory bounded by a window of recent hashes). Returns the records
    /// checked, or the first problem.
    pub async fn verify(&self, node: &str) -> Result<Result<u64, String>, StoreError> {
        use futures::TryStreamExt;
        const WINDOW: usize = 4096;
        let c = self.pool.get().await?;
        let key = c
            .query_opt("SELECT node_key FROM nodes WHERE node = $1", &[&node])
            .await?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|k| parse_key(&k));
        let rows = c
            .query_raw("SELECT seq, time_ms, prev, hash, body FROM audit_records WHERE node = $1 ORDER BY seq", [node])
            .await?;
        futures::pin_mut!(rows);
        let mut recent: std::collections::VecDeque<(u64, String)> = std::collections::VecDeque::new();
        let mut checked = 0u64;
        while let Some(r) = rows.try_next().await? {
            let seq = r.get::<_, i64>(0) as u64;
            let time_ms: i64 = r.get(1);
            let p: String = r.get(2);
            let hash: String = r.get(3);
            let body: String = r.get(4);
            if outpost_proto::audit::hash_of(seq, time_ms, &p, body.as_bytes()) != hash {
                return Ok(Err(format!("record {seq}: its hash does not cover its fields")));
            }
            if let Some((ps, ph)) = recent.back() {
                if seq != ps + 1 {
                    return Ok(Err(format!("records {}..={} are missing", ps + 1, seq - 1)));
                }
                if p != *ph {
                    return Ok(Err(format!("record {seq}: prev is not the hash of record {ps}")));
                }
            }
            let cp = serde_json::from_str(&body).ok().and_then(|b| outpost_proto::audit::Checkpoint::from_body(&b));
            if let Some(cp) = cp {
                if key.as_ref().is_some_and(|k| !cp.is_signed_by(k)) {
                    return Ok(Err(format!("record {seq}: a checkpoint not signed by the node's key")));
                }
                if let Some((_, h)) = recent.iter().find(|(s, _)| *s == cp.seq) {
                    if *h != cp.hash {
                        return Ok(Err(format!(
                            "record {seq}: the signed checkpoint contradicts record {} as stored",
                            cp.seq
                        )));
                    }
                }
            }
            recent.push_back((seq, hash));
            if recent.len() > WINDOW {
                recent.pop_front();
            }
            checked += 1;
        }
        Ok(Ok(checked))
    }
}

async fn record_alarms(
    tx: &tokio_postgres::Transaction<'_>,
    node: &str,
    alarms: &[Alarm],
    now: i64,
) -> Result<(), tokio_postgres::Error> {
    for a in alarms {
        let seq = a.seq.map(|s| s as i64);
        tx.execute(
            "INSERT INTO chain_alarms (node, at_ms, kind, seq, detail) VALUES ($1, $2, $3, $4, $5)",
            &[&node, &now, &a.kind.as_str(), &seq, &a.detail],
        )
        .await?;
        tx.execute("UPDATE chains SET alarms = alarms + 1, last_alarm = $2 WHERE node = $1", &[&node, &a.detail])
            .await?;
    }
    Ok(())
}

/// A node key as the agent sends it: `{"keytype": "ed25519", "public": "<hex>"}`.
pub fn parse_key(json: &str) -> Option<VerifyingKey> {
    serde_json::from_str::<outpost_proto::registry::keys::PublicKey>(json).ok()?.verifying_key().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_partition_day_stays_within_retention_and_tomorrow() {
        let today = 20_000;
        let at = |day: i64| day * DAY_MS + 1;
        assert_eq!(partition_day(at(today - 3), today, 30), today - 3, "its own day");
        assert_eq!(partition_day(at(today + 1), today, 30), today + 1);
        assert_eq!(partition_day(at(today + 500), today, 30), today + 1, "a clock far ahead");
        assert_eq!(partition_day(i64::MAX, today, 30), today + 1);
        assert_eq!(partition_day(at(today - 900), today, 30), today - 30, "older than retention");
        assert_eq!(partition_day(i64::MIN, today, 30), today - 30);
    }
}
