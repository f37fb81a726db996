//! DSSE envelopes (Dead Simple Signing Envelope): `payloadType`, base64 `payload`,
//! `signatures: [{keyid, sig}]`, each signature over the pre-authentication encoding (PAE).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::keys::KeyPair;
use super::RegistryError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    pub keyid: String,
    pub sig: String,
}

/// DSSE v1 pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    pub fn sign(payload_type: &str, payload: &[u8], keys: &[&KeyPair]) -> Envelope {
        let msg = pae(payload_type, payload);
        Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: keys
                .iter()
                .map(|k| EnvelopeSignature { keyid: k.keyid.clone(), sig: B64.encode(k.sign(&msg)) })
                .collect(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Envelope, RegistryError> {
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Invalid(format!("not a DSSE envelope: {e}")))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn payload_bytes(&self) -> Result<Vec<u8>, RegistryError> {
        B64.decode(&self.payload).map_err(|e| RegistryError::Invalid(format!("envelope payload is not base64: {e}")))
    }

    /// Checks that at least `threshold` distinct trusted keys signed this envelope; each key
    /// counts once however often it appears. Returns the verified payload.
    pub fn verify(
        &self,
        expected_type: &str,
        trusted: &BTreeMap<String, VerifyingKey>,
        threshold: usize,
        role: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        if self.payload_type != expected_type {
            return Err(RegistryError::Invalid(format!(
                "{role}: payload type '{}', expected '{expected_type}'",
                self.payload_type
            )));
        }
        if threshold == 0 {
            return Err(RegistryError::Invalid(format!("{role}: threshold 0 is not allowed")));
        }
        let payload = self.payload_bytes()?;
        let msg = pae(&self.payload_type, &payload);
        let mut valid: BTreeSet<&str> = BTreeSet::new();
        let mut unknown = 0;
        let mut bad = 0;
        for s in &self.signatures {
            let Some(key) = trusted.get(&s.keyid) else {
                unknown += 1;
                continue;
            };
            let ok = B64
                .decode(&s.sig)
                .ok()
                .and_then(|b| Signature::from_slice(&b).ok())
                .is_some_and(|sig| key.verify_strict(&msg, &sig).is_ok());
            if ok {
                valid.insert(s.keyid.as_str());
            } else {
                bad += 1;
            }
        }
        if valid.len() < threshold {
            return Err(RegistryError::Signature(format!(
                "{role}: {} of {threshold} required signatures from trusted keys ({bad} invalid, {unknown} from unknown keys)",
                valid.len()
            )));
        }
        Ok(payload)
    }
}
