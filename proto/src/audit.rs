//! The audit chain as it travels: a record's hash over every field, and signed checkpoints of
//! a node's head. The agent writes both; the collector checks them, so the rules live here once.
//!
//! A record hashes `sha256(seq as 8 BE bytes ‖ time_ms as 8 BE bytes ‖ prev hex ‖ body JSON)`,
//! `prev` being the hash of the record before it ([`GENESIS`] before the first). A checkpoint
//! signs `outpost-audit-checkpoint-v1\n<node>\n<seq>\n<hash>\n<time_ms>` with the node's
//! ed25519 key, and travels as the next record of the chain (body `"kind": "checkpoint"`).

use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::{hex, KeyPair};

/// Hash of "nothing before the first record".
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a checkpoint signature covers first (domain separation from every other signature).
const CONTEXT: &[u8] = b"outpost-audit-checkpoint-v1\n";

/// One record of a node's audit chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub time_ms: i64,
    pub prev: String,
    pub hash: String,
    pub body: Value,
}

impl Record {
    /// The hash a record with these fields must carry.
    pub fn compute_hash(seq: u64, time_ms: i64, prev: &str, body: &Value) -> String {
        hash_of(seq, time_ms, prev, &serde_json::to_vec(body).unwrap_or_default())
    }

    /// Whether the record's own hash covers its fields as they stand.
    pub fn hash_holds(&self) -> bool {
        Record::compute_hash(self.seq, self.time_ms, &self.prev, &self.body) == self.hash
    }
}

/// `sha256(seq as 8 BE bytes ‖ time_ms as 8 BE bytes ‖ prev hex ‖ body JSON bytes)`, hex.
pub fn hash_of(seq: u64, time_ms: i64, prev: &str, body_json: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(seq.to_be_bytes());
    h.update(time_ms.to_be_bytes());
    h.update(prev.as_bytes());
    h.update(body_json);
    hex::encode(&h.finalize())
}

/// A signed statement: the log of `node` had `hash` at `seq` at `time_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub node: String,
    pub seq: u64,
    pub hash: String,
    pub time_ms: i64,
    pub key_id: String,
    /// base64 of the ed25519 signature.
    pub sig: String,
}

fn message(node: &str, seq: u64, hash: &str, time_ms: i64) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(format!("{node}\n{seq}\n{hash}\n{time_ms}").as_bytes());
    m
}

impl Checkpoint {
    /// Signs the head `(seq, hash)` of `node`'s log.
    pub fn sign(key: &KeyPair, node: &str, seq: u64, hash: &str, time_ms: i64) -> Checkpoint {
        let sig = key.sign(&message(node, seq, hash, time_ms));
        Checkpoint {
            node: node.to_owned(),
            seq,
            hash: hash.to_owned(),
            time_ms,
            key_id: key.keyid.clone(),
            sig: base64::engine::general_purpose::STANDARD.encode(sig),
        }
    }

    /// Whether `key` signed this checkpoint as it stands.
    pub fn is_signed_by(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&self.sig) else { return false };
        let Ok(sig) = Signature::from_slice(&bytes) else { return false };
        key.verify(&message(&self.node, self.seq, &self.hash, self.time_ms), &sig).is_ok()
    }

    /// The record body that carries it in the chain.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "kind": "checkpoint",
            "node": self.node,
            "seq": self.seq,
            "hash": self.hash,
            "time_ms": self.time_ms,
            "key_id": self.key_id,
            "sig": self.sig,
        })
    }

    /// The checkpoint a record body carries, if it is one.
    pub fn from_body(body: &Value) -> Option<Checkpoint> {
        if body.get("kind")?.as_str()? != "checkpoint" {
            return None;
        }
        serde_json::from_value(body.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_as_signed() {
        let key = KeyPair::generate().expect("key");
        let vk = key.public().verifying_key().expect("public key");
        let cp = Checkpoint::sign(&key, "till-1", 7, GENESIS, 1_700_000_000_000);
        assert!(cp.is_signed_by(&vk));
        assert_eq!(Checkpoint::from_body(&cp.body()), Some(cp.clone()));
        let moved = Checkpoint { seq: 6, ..cp.clone() };
        assert!(!moved.is_signed_by(&vk));
        let other = Checkpoint { node: "till-2".into(), ..cp };
        assert!(!other.is_signed_by(&vk));
    }

    #[test]
    fn a_record_hash_covers_every_field() {
        let body = serde_json::json!({"kind": "inference", "model": "mlp"});
        let hash = Record::compute_hash(3, 10, GENESIS, &body);
        let r = Record { seq: 3, time_ms: 10, prev: GENESIS.into(), hash, body };
        assert!(r.hash_holds());
        assert!(!Record { time_ms: 11, ..r.clone() }.hash_holds());
        assert!(!Record { seq: 4, ..r.clone() }.hash_holds());
        assert!(!Record { body: serde_json::json!({"kind": "inference"}), ..r }.hash_holds());
    }
}
