//! ed25519 keys: files, key ids (hex sha256 of the raw public key), signing.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{hex, sha256, RegistryError};

/// A private key file: `{"keytype": "ed25519", "keyid": ..., "private": hex}`, mode 0600.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivateKeyFile {
    keytype: String,
    keyid: String,
    private: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// A public key as it appears in root metadata and `.pub` files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    pub keytype: String,
    /// Hex of the 32-byte ed25519 public key.
    pub public: String,
}

impl PublicKey {
    pub fn from_verifying(k: &VerifyingKey) -> Self {
        PublicKey { keytype: "ed25519".into(), public: hex::encode(k.as_bytes()) }
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey, RegistryError> {
        if self.keytype != "ed25519" {
            return Err(RegistryError::Invalid(format!("unsupported key type '{}'", self.keytype)));
        }
        let bytes: [u8; 32] = hex::decode(&self.public)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| RegistryError::Invalid("public key is not 32 bytes of hex".into()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|e| RegistryError::Invalid(format!("bad public key: {e}")))
    }

    /// The key id: hex sha256 of the raw public key bytes.
    pub fn keyid(&self) -> Result<String, RegistryError> {
        Ok(keyid_of(&self.verifying_key()?))
    }
}

pub fn keyid_of(k: &VerifyingKey) -> String {
    hex::encode(&sha256(k.as_bytes()))
}

/// A signing key loaded from a file.
pub struct KeyPair {
    signing: SigningKey,
    pub keyid: String,
}

impl KeyPair {
    pub fn generate() -> Result<KeyPair, RegistryError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| RegistryError::Io(format!("no randomness: {e}")))?;
        let signing = SigningKey::from_bytes(&seed);
        let keyid = keyid_of(&signing.verifying_key());
        Ok(KeyPair { signing, keyid })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from_verifying(&self.signing.verifying_key())
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.signing.sign(msg).to_bytes().to_vec()
    }

    pub fn load(path: &Path) -> Result<KeyPair, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|e| RegistryError::file(path, e))?;
        let file: PrivateKeyFile = serde_json::from_str(&text)
            .map_err(|e| RegistryError::Invalid(format!("{}: not a private key file: {e}", path.display())))?;
        if file.keytype != "ed25519" {
            return Err(RegistryError::Invalid(format!("{}: unsupported key type", path.display())));
        }
        let seed: [u8; 32] = hex::decode(&file.private)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| RegistryError::Invalid(format!("{}: private key is not 32 bytes of hex", path.display())))?;
        let signing = SigningKey::from_bytes(&seed);
        let keyid = keyid_of(&signing.verifying_key());
        if keyid != file.keyid {
            return Err(RegistryError::Invalid(format!("{}: keyid does not match the key", path.display())));
        }
        Ok(KeyPair { signing, keyid })
    }

    /// Writes `<base>.key` (mode 0600) and `<base>.pub`.
    pub fn save(&self, base: &Path, note: Option<&str>) -> Result<(), RegistryError> {
        let private = PrivateKeyFile {
            keytype: "ed25519".into(),
            keyid: self.keyid.clone(),
            private: hex::encode(&self.signing.to_bytes()),
            note: note.map(str::to_owned),
        };
        let key_path = base.with_extension("key");
        let text = serde_json::to_string_pretty(&private).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        crate::fsutil::write_secret(&key_path, text.as_bytes()).map_err(|e| RegistryError::file(key_path, e))?;
        let pub_path = base.with_extension("pub");
        let text = serde_json::to_string_pretty(&self.public()).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        crate::fsutil::write_atomic(&pub_path, text.as_bytes()).map_err(|e| RegistryError::file(pub_path, e))?;
        Ok(())
    }
}

/// Reads a `.pub` file.
pub fn load_public(path: &Path) -> Result<PublicKey, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|e| RegistryError::file(path, e))?;
    let key: PublicKey = serde_json::from_str(&text)
        .map_err(|e| RegistryError::Invalid(format!("{}: not a public key file: {e}", path.display())))?;
    key.verifying_key()?;
    Ok(key)
}
