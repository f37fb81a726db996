//! One record of the log: its stored line, its hash over every field, the prune anchor.

use super::*;

pub(super) use outpost_proto::audit::hash_of;
pub use outpost_proto::audit::{Record, GENESIS};

/// One stored line (without its newline), byte for byte what serializing a [`Record`] gives,
/// built from the body's JSON without parsing it again.
pub(super) fn write_line(out: &mut Vec<u8>, seq: u64, time_ms: i64, prev: &str, hash: &str, body_json: &[u8]) {
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

pub(super) mod hex_array {
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
    pub(super) fn genesis() -> Anchor {
        Anchor { seq: 0, hash: [0; 32] }
    }
    pub(super) fn hash_hex(&self) -> String {
        hex::encode(&self.hash)
    }
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The `seq` of a stored record line: read from the front of the lines the log writes, else by
/// parsing the JSON (an edited line may order its keys differently).
pub(super) fn seq_of(line: &[u8]) -> Option<u64> {
    let fast = line.strip_prefix(b"{\"seq\":").and_then(|rest| {
        let end = rest.iter().position(|b| !b.is_ascii_digit())?;
        std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
    });
    fast.or_else(|| serde_json::from_slice::<Value>(line).ok()?.get("seq")?.as_u64())
}
