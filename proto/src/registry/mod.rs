//! Registry metadata (DESIGN §3): root, index and in-toto manifest types, DSSE envelopes,
//! ed25519 keys, digests, RFC 3339 times and semantic versions. No I/O beyond key files; the
//! client that fetches, verifies and installs is the agent's `registry` module.

pub mod dsse;
pub mod keys;
pub mod package;
pub mod pipeline;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use keys::{KeyPair, PublicKey};
pub use package::Processing;

pub const ROOT_TYPE: &str = "application/vnd.outpost.root+json";
pub const INDEX_TYPE: &str = "application/vnd.outpost.index+json";
pub const BASELINE_TYPE: &str = "application/vnd.outpost.baseline+json";
pub const MANIFEST_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://outpost.example/model-manifest/v1";

/// Caps applied before any download.
pub const MAX_ROOT_BYTES: u64 = 1 << 20;
pub const MAX_INDEX_BYTES: u64 = 16 << 20;
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
pub const MAX_BASELINE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("i/o: {0}")]
    Io(String),
    /// A file that cannot be read or written, with the cause.
    #[error("i/o: {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid metadata: {0}")]
    Invalid(String),
    #[error("signature check failed: {0}")]
    Signature(String),
    #[error("expired: {0}")]
    Expired(String),
    #[error("rollback refused: {0}")]
    Rollback(String),
    #[error("digest mismatch: {0}")]
    Digest(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("model refused: {0}")]
    Refused(String),
}

impl RegistryError {
    /// Errors that say nothing about the content (network, disk): retried on the next poll
    /// rather than recorded against a version.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Io(_) | RegistryError::File { .. } | RegistryError::Fetch(_))
    }

    /// A file error at `path`.
    pub fn file(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> RegistryError {
        RegistryError::File { path: path.into(), source }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keyids: Vec<String>,
    pub threshold: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    pub root: Role,
    pub index: Role,
}

/// `root.json`: the keys and thresholds of each role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    #[serde(rename = "_type")]
    pub kind: String,
    pub version: u64,
    pub expires: String,
    pub keys: BTreeMap<String, PublicKey>,
    pub roles: Roles,
    /// Marks the demo registry's root: only the dev profile may trust it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub demo_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestRef {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub version: String,
    pub channel: String,
    pub manifest: DigestRef,
}

/// `index.json`: every published model version and where its manifest is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    #[serde(rename = "_type")]
    pub kind: String,
    pub version: u64,
    pub expires: String,
    pub models: BTreeMap<String, Vec<IndexEntry>>,
}

/// `baseline.json`: a compliance baseline, what every site's configuration must hold. Signed
/// by the index role, versioned and expiring like the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    #[serde(rename = "_type")]
    pub kind: String,
    pub version: u64,
    pub expires: String,
    pub name: String,
    pub rules: BaselineRules,
}

/// The rules of a baseline; an absent rule is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineRules {
    /// Clients must authenticate (`[auth]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auth: bool,
    /// The HTTP listener must use TLS (`"tls"`) or mutual TLS (`"mtls"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// The audit log must be on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    /// Audit records must not be kept longer than this many days (`audit.retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_max_retention_days: Option<u64>,
    /// `privacy.residency_allow` must be set, each entry within these hosts and ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency_within: Option<Vec<String>>,
    /// Request parameters that must be pseudonymized.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pseudonymize: Vec<String>,
    /// Models whose requests must never leave the site (no overflow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stay_on_site: Vec<String>,
    /// The lowest agent version allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<String>,
    /// The quantization kinds a served registry model may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Vec<String>>,
    /// The model store must be encrypted (`store.encrypt`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub store_encrypted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorDecl {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    pub sha256: String,
    pub size: u64,
    pub uncompressed_size: u64,
    pub encoding: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Residency {
    pub may_leave_site: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPredicate {
    pub name: String,
    pub version: String,
    pub format: String,
    #[serde(default)]
    pub opset: Option<u64>,
    pub quantization: String,
    pub inputs: Vec<TensorDecl>,
    pub outputs: Vec<TensorDecl>,
    pub blob: BlobRef,
    /// The golden file (`engine::golden` format) the agent must reproduce before activating.
    pub golden: Value,
    #[serde(default)]
    pub min_agent_version: Option<String>,
    pub residency: Residency,
    /// Processing steps shipped with the model ([`package`]); absent for a bare model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing: Option<Processing>,
}

/// A model manifest: an in-toto Statement v1 whose subject is the ONNX file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub kind: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: ModelPredicate,
}

impl Statement {
    /// The sha256 of the (uncompressed) ONNX file.
    pub fn model_sha256(&self) -> Result<&str, RegistryError> {
        let s = self
            .subject
            .first()
            .and_then(|s| s.digest.get("sha256"))
            .ok_or_else(|| RegistryError::Invalid("manifest subject has no sha256".into()))?;
        check_hex_digest(s)?;
        Ok(s)
    }
}

/// Lower-case hex.
pub mod hex {
    pub fn encode(bytes: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    pub fn decode(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) {
            return None;
        }
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(&sha256(bytes))
}

/// A sha256 digest as it may appear in a path: exactly 64 lower-case hex characters.
pub fn check_hex_digest(s: &str) -> Result<(), RegistryError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("'{}' is not a sha256 hex digest", s.chars().take(80).collect::<String>())))
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(s: &str) -> Result<i64, RegistryError> {
    let bad = || RegistryError::Invalid(format!("'{s}' is not a time like 2027-01-31T00:00:00Z"));
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok()).ok_or_else(bad);
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    Ok(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se)
}

/// Formats seconds since the epoch as RFC 3339 UTC.
pub fn format_time(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A semantic version `MAJOR.MINOR.PATCH[-PRE]`, ordered as semver orders them (build
/// metadata is not accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemVer {
    pub core: (u64, u64, u64),
    pub pre: Option<String>,
}

impl SemVer {
    pub fn parse(s: &str) -> Option<SemVer> {
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) if !p.is_empty() => (c, Some(p.to_owned())),
            Some(_) => return None,
            None => (s, None),
        };
        let mut it = core.split('.').map(|p| if p.is_empty() || p.len() > 18 { None } else { p.parse::<u64>().ok() });
        let v = (it.next()??, it.next()??, it.next()??);
        if it.next().is_some()
            || s.len() > 64
            || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return None;
        }
        Some(SemVer { core: v, pre })
    }
}

impl PartialOrd for SemVer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SemVer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        self.core.cmp(&other.core).then_with(|| match (&self.pre, &other.pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => {
                let (pa, pb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
                for (x, y) in pa.iter().zip(&pb) {
                    let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                        (Ok(i), Ok(j)) => i.cmp(&j),
                        (Ok(_), Err(_)) => Ordering::Less,
                        (Err(_), Ok(_)) => Ordering::Greater,
                        (Err(_), Err(_)) => x.cmp(y),
                    };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                pa.len().cmp(&pb.len())
            }
        })
    }
}

/// Reads only the `demo_only` flag of a root file (for configuration checks; not a trust
/// decision). `None`: not a registry root.
pub fn root_is_demo(bytes: &[u8]) -> Option<bool> {
    let env = dsse::Envelope::parse(bytes).ok()?;
    let root: Root = serde_json::from_slice(&env.payload_bytes().ok()?).ok()?;
    Some(root.demo_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for t in [0, 86399, 951782400, 1_800_000_000, 4_102_444_800] {
            assert_eq!(parse_time(&format_time(t)).unwrap(), t);
        }
        assert_eq!(parse_time("2000-02-29T00:00:00Z").unwrap(), 951782400);
        assert!(parse_time("2000-02-29 00:00:00").is_err());
        assert!(parse_time("2000-13-01T00:00:00Z").is_err());
    }

    #[test]
    fn semver_orders() {
        let v = |s| SemVer::parse(s).unwrap();
        assert!(v("1.0.0") < v("1.0.1"));
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("2.0.0-rc.1") < v("2.0.0"));
        assert!(v("2.0.0-rc.2") > v("2.0.0-rc.1"));
        assert!(v("2.0.0-alpha") < v("2.0.0-beta"));
        for bad in ["1.0", "1.0.0.0", "a.b.c", "1.0.0-", "../1.0.0", "1.0.0+build"] {
            assert!(SemVer::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn digests_are_strict_hex() {
        assert!(check_hex_digest(&"a".repeat(64)).is_ok());
        assert!(check_hex_digest(&"A".repeat(64)).is_err());
        assert!(check_hex_digest("../../etc/passwd").is_err());
        assert_eq!(hex::decode(&hex::encode(&[0, 255, 16])), Some(vec![0, 255, 16]));
    }

    proptest::proptest! {
        #[test]
        fn envelope_parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = dsse::Envelope::parse(&bytes);
            let _ = serde_json::from_slice::<Statement>(&bytes);
        }
    }
}
