//! The signed model registry: static files on any HTTPS host (or a directory), metadata in DSSE
//! envelopes signed with ed25519, blobs compressed with zstd. See DESIGN §3 and ARCHITECTURE.md.
//!
//! Client rules: trust starts from a pinned root; thresholds count each key once; versions never
//! go down; expired metadata blocks new installs but never stops serving; every size is capped
//! before download; manifest and blob digests must match the signed index; trusted state is
//! persisted atomically.
//!
//! The metadata types and their parsers live in `outpost_proto::registry` (no tract, so the
//! fuzz targets build small) and are re-exported here.

pub mod bundle;
pub mod client;
pub mod publish;
pub mod sync;
pub mod trust;
pub mod versions;

pub use outpost_proto::registry::*;
