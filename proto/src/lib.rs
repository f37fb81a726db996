//! The parts of Outpost that parse untrusted bytes and need no inference engine: the V2 data
//! model and JSON codec, registry metadata and DSSE envelopes, MQTT topics, the audit chain's
//! hash and checkpoints (shared with the collector). Kept apart from the
//! agent (and tract) so fuzz targets build in seconds; the agent re-exports all of it.

pub mod audit;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod mqtt;
pub mod protocol;
pub mod registry;

/// A model, version, site or node name: 1-128 of `[A-Za-z0-9._-]`, not starting with a dot
/// (so it is safe in topics and never a path component like `..`).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
