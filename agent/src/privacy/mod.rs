//! Privacy rules (`[privacy]`): configured request parameters are replaced by a keyed HMAC
//! before they reach the audit log, telemetry or anything upstream; inputs are only ever
//! recorded as a keyed digest; outbound hosts must be on the residency allow-list
//! (checked at connect time: [`crate::residency`]).

pub mod epochs;
pub mod subject;

use crate::store::KeyFileError;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::protocol::Tensor;
use outpost_proto::registry::hex;

#[derive(Clone)]
pub struct Privacy {
    /// The HMAC key: wraps the epoch keys, and keys A/B assignment (stable across epochs).
    key: Vec<u8>,
    /// The pseudonymization key epochs (none: pseudonyms are keyed by `key` itself).
    epochs: Option<Arc<epochs::Epochs>>,
    /// Request parameter names to pseudonymize.
    pseudonymize: Vec<String>,
    /// Input tensors that must never leave the box (only their digest is recorded).
    pub sensitive_inputs: Vec<String>,
    /// Hosts and ranges outbound connections may go to; empty: no list configured.
    pub residency: crate::residency::AllowList,
    /// Checks every outbound connection against `residency` (set by the agent at start).
    pub guard: Option<std::sync::Arc<crate::residency::Guard>>,
}

impl std::fmt::Debug for Privacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Privacy").field("pseudonymize", &self.pseudonymize).finish_non_exhaustive()
    }
}

impl Privacy {
    /// Loads the HMAC key from `key_file`, creating a random one (mode 0600) on first use.
    pub fn load(
        key_file: &Path,
        pseudonymize: Vec<String>,
        sensitive_inputs: Vec<String>,
        residency: crate::residency::AllowList,
    ) -> Result<Privacy, KeyFileError> {
        let key = Self::read_key(key_file)?;
        let pseudonymize = pseudonymize.into_iter().map(|p| p.trim_start_matches("parameters.").to_owned()).collect();
        Ok(Privacy { key, epochs: None, pseudonymize, sensitive_inputs, residency, guard: None })
    }

    /// Pseudonymizes with key epochs kept in `state_dir`, each lasting `period`.
    pub fn with_epochs(mut self, state_dir: &Path, period: std::time::Duration) -> Result<Privacy, String> {
        self.epochs = Some(Arc::new(epochs::Epochs::open(state_dir, &self.key, period)?));
        Ok(self)
    }

    pub fn epochs(&self) -> Option<&epochs::Epochs> {
        self.epochs.as_deref()
    }

    /// Reads the HMAC key, which must exist (for the command line, which creates nothing).
    pub fn read_existing_key(key_file: &Path) -> Result<Vec<u8>, KeyFileError> {
        match std::fs::read(key_file) {
            Ok(k) if k.len() >= 32 => Ok(k),
            Ok(_) => Err(KeyFileError::Invalid {
                what: "HMAC key",
                path: key_file.to_owned(),
                why: "an HMAC key needs at least 32 bytes".into(),
            }),
            Err(source) => Err(KeyFileError::Io { what: "HMAC key", path: key_file.to_owned(), source }),
        }
    }

    /// Reads the HMAC key, creating a random one (mode 0600) on first use.
    pub fn read_key(key_file: &Path) -> Result<Vec<u8>, KeyFileError> {
        match Self::read_existing_key(key_file) {
            Err(KeyFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let k = crate::store::create_secret("HMAC key", key_file, 32)?;
                tracing::info!(path = %key_file.display(), "created a new HMAC key for pseudonymization");
                Ok(k)
            }
            other => other,
        }
    }

    /// The HMAC key's digest of `bytes` (A/B assignment: the same across key epochs).
    pub fn hmac_hex(&self, bytes: &[u8]) -> String {
        mac_hex(&self.key, bytes)
    }

    /// The key epoch pseudonyms are made with now (`None`: no epochs, the HMAC key itself).
    fn current(&self) -> Option<epochs::EpochKey> {
        self.epochs.as_ref().map(|e| e.current())
    }

    /// What a request's record keeps of it: its key epoch, the keyed digest of its inputs and
    /// its parameters pseudonymized, all with the same epoch's key.
    pub fn seal(&self, inputs: &[Tensor], params: &Map<String, Value>) -> (Option<u64>, String, Map<String, Value>) {
        let epoch = self.current();
        let key = epoch.as_ref().map_or(&self.key[..], |e| &e.key[..]);
        (epoch.as_ref().map(|e| e.id), digest_inputs(key, inputs), self.pseudonymize_with(key, params))
    }

    /// Request parameters as they may leave the box, pseudonymized with the current epoch.
    pub fn pseudonymize(&self, params: &Map<String, Value>) -> Map<String, Value> {
        let epoch = self.current();
        self.pseudonymize_with(epoch.as_ref().map_or(&self.key[..], |e| &e.key[..]), params)
    }

    /// Request parameters as they may be recorded: configured keys replaced by their HMAC,
    /// values bounded in size.
    fn pseudonymize_with(&self, key: &[u8], params: &Map<String, Value>) -> Map<String, Value> {
        params
            .iter()
            .take(32)
            .map(|(k, v)| {
                let v = if self.pseudonymize.iter().any(|p| p == k) {
                    Value::String(pseudonym(key, &subject_bytes(v)))
                } else {
                    match v {
                        Value::String(s) if s.len() > 256 => {
                            let mut i = 256;
                            while !s.is_char_boundary(i) {
                                i -= 1;
                            }
                            Value::String(format!("{}…", &s[..i]))
                        }
                        Value::Array(_) | Value::Object(_) => Value::String("<structured>".into()),
                        other => other.clone(),
                    }
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// Whether an outbound connection to `host` is allowed.
    pub fn host_allowed(&self, host: &str) -> bool {
        self.residency.host_allowed(host)
    }
}

/// The bytes a parameter's value is pseudonymized from: a string's own, else its JSON text.
pub fn subject_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

/// The pseudonym of `bytes` under `key`: `hmac:` and the hex HMAC-SHA256.
pub fn pseudonym(key: &[u8], bytes: &[u8]) -> String {
    format!("hmac:{}", mac_hex(key, bytes))
}

fn mac_hex(key: &[u8], bytes: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(bytes);
    hex::encode(&mac.finalize().into_bytes())
}

/// A keyed digest of the request's inputs (names, datatypes, shapes and data).
fn digest_inputs(key: &[u8], inputs: &[Tensor]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    for t in inputs {
        mac.update(t.name.as_bytes());
        mac.update(&[0]);
        mac.update(t.datatype().as_str().as_bytes());
        for d in &t.shape {
            mac.update(&(*d as u64).to_le_bytes());
        }
        mac.update(&t.data.to_le_bytes());
    }
    hex::encode(&mac.finalize().into_bytes())
}

pub use crate::residency::url_host;
