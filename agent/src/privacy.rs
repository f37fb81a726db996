//! Privacy rules (`[privacy]`): configured request parameters are replaced by a keyed HMAC
//! before they reach the audit log, telemetry or anything upstream; inputs are only ever
//! recorded as a keyed digest; outbound hosts must be on the residency allow-list
//! (checked at connect time: [`crate::residency`]).

use crate::store::KeyFileError;
use std::path::Path;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::protocol::Tensor;
use outpost_proto::registry::hex;

#[derive(Clone)]
pub struct Privacy {
    key: Vec<u8>,
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
        const WHAT: &str = "HMAC key";
        let key = match std::fs::read(key_file) {
            Ok(k) if k.len() >= 32 => k,
            Ok(_) => {
                let why = "an HMAC key needs at least 32 bytes".to_owned();
                return Err(KeyFileError::Invalid { what: WHAT, path: key_file.to_owned(), why });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = crate::store::create_secret(WHAT, key_file, 32)?;
                tracing::info!(path = %key_file.display(), "created a new HMAC key for pseudonymization");
                k
            }
            Err(source) => return Err(KeyFileError::Io { what: WHAT, path: key_file.to_owned(), source }),
        };
        let pseudonymize = pseudonymize.into_iter().map(|p| p.trim_start_matches("parameters.").to_owned()).collect();
        Ok(Privacy { key, pseudonymize, sensitive_inputs, residency, guard: None })
    }

    pub fn hmac_hex(&self, bytes: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(bytes);
        hex::encode(&mac.finalize().into_bytes())
    }

    /// A keyed digest of the request's inputs (names, datatypes, shapes and data).
    pub fn digest_inputs(&self, inputs: &[Tensor]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
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

    /// Request parameters as they may be recorded: configured keys replaced by their HMAC,
    /// values bounded in size.
    pub fn pseudonymize(&self, params: &Map<String, Value>) -> Map<String, Value> {
        params
            .iter()
            .take(32)
            .map(|(k, v)| {
                let v = if self.pseudonymize.iter().any(|p| p == k) {
                    let raw = match v {
                        Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    Value::String(format!("hmac:{}", self.hmac_hex(&raw)))
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

pub use crate::residency::url_host;
