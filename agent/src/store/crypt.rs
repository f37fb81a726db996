//! Encryption at rest for stored models: XChaCha20-Poly1305 with a device key.
//!
//! File layout: `OPSTENC1` (8 bytes) ‖ salt (16 random bytes) ‖ chunks. The plaintext is cut
//! into 1 MiB chunks, each sealed on its own (ciphertext ‖ 16-byte tag) with the nonce
//! salt ‖ chunk index (u32 BE) ‖ last-chunk flag (u32 BE) and the file's model digest as
//! associated data. A flipped bit, a reordered or dropped chunk, a truncated file, a file
//! renamed to another digest or a wrong key all fail authentication. Plaintext exists only
//! in memory.

use std::io::{self, Write};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

const MAGIC: &[u8; 8] = b"OPSTENC1";
const SALT: usize = 16;
const TAG: usize = 16;
const CHUNK: usize = 1 << 20;

/// The device key: 32 bytes, in a file readable by the agent's user only.
#[derive(Clone)]
pub struct StoreKey(Key);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// Reads the key file, or creates it (0600) when it does not exist and `may_create`.
    pub fn load_or_create(path: &Path, may_create: bool) -> Result<StoreKey, String> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::os::unix::fs::MetadataExt::mode(
                    &std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?,
                );
                if mode & 0o077 != 0 {
                    tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "store key is readable by others: chmod 600");
                }
                let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    format!("store key {} must hold exactly 32 bytes (it has {})", path.display(), bytes.len())
                })?;
                Ok(StoreKey(Key::from(raw)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && may_create => {
                let mut raw = [0u8; 32];
                getrandom::fill(&mut raw).map_err(|e| format!("no randomness for the store key: {e}"))?;
                super::write_secret(path, &raw).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                tracing::info!(file = %path.display(), "created the model store key");
                Ok(StoreKey(Key::from(raw)))
            }
            Err(e) => Err(format!("store key {}: {e}", path.display())),
        }
    }

    #[cfg(test)]
    pub fn from_bytes(raw: [u8; 32]) -> StoreKey {
        StoreKey(Key::from(raw))
    }
}

fn nonce(salt: &[u8], index: u32, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..SALT].copy_from_slice(salt);
    n[SALT..SALT + 4].copy_from_slice(&index.to_be_bytes());
    n[SALT + 4..].copy_from_slice(&u32::from(last).to_be_bytes());
    XNonce::from(n)
}

/// Whether `bytes` begin like an encrypted store file.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Seals `plain` for the file named by `digest`, writing the result to `out`.
pub fn encrypt_to(key: &StoreKey, digest: &str, plain: &[u8], out: &mut impl Write) -> io::Result<()> {
    let cipher = XChaCha20Poly1305::new(&key.0);
    let mut salt = [0u8; SALT];
    getrandom::fill(&mut salt).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    out.write_all(MAGIC)?;
    out.write_all(&salt)?;
    let chunks: Vec<&[u8]> = if plain.is_empty() { vec![&[][..]] } else { plain.chunks(CHUNK).collect() };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let index = u32::try_from(i).map_err(|_| io::Error::other("model too large to encrypt"))?;
        let sealed = cipher
            .encrypt(&nonce(&salt, index, i + 1 == n), Payload { msg: chunk, aad: digest.as_bytes() })
            .map_err(|_| io::Error::other("encryption failed"))?;
        out.write_all(&sealed)?;
    }
    Ok(())
}

/// Opens a file sealed by [`encrypt_to`] for `digest`.
pub fn decrypt(key: &StoreKey, digest: &str, file: &[u8]) -> Result<Vec<u8>, String> {
    const FAILED: &str =
        "failed authentication: the file was modified, or the store key is not the one it was written with";
    let body = file.strip_prefix(MAGIC.as_slice()).ok_or("is not an encrypted store file")?;
    if body.len() < SALT + TAG {
        return Err("is truncated".into());
    }
    let (salt, sealed) = body.split_at(SALT);
    let cipher = XChaCha20Poly1305::new(&key.0);
    let chunks: Vec<&[u8]> = sealed.chunks(CHUNK + TAG).collect();
    let n = chunks.len();
    let mut plain = Vec::with_capacity(sealed.len().saturating_sub(n * TAG));
    for (i, chunk) in chunks.into_iter().enumerate() {
        let index = u32::try_from(i).map_err(|_| "has too many chunks".to_owned())?;
        let opened = cipher
            .decrypt(&nonce(salt, index, i + 1 == n), Payload { msg: chunk, aad: digest.as_bytes() })
            .map_err(|_| FAILED.to_owned())?;
        plain.extend_from_slice(&opened);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &StoreKey, digest: &str, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encrypt_to(key, digest, plain, &mut out).expect("encrypt");
        out
    }

    #[test]
    fn round_trips_across_chunk_boundaries() {
        let key = StoreKey::from_bytes([7; 32]);
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = seal(&key, "d", &plain);
            assert!(is_encrypted(&sealed));
            assert_eq!(decrypt(&key, "d", &sealed).expect("opens"), plain, "len {len}");
        }
    }

    #[test]
    fn tampering_truncation_wrong_key_and_wrong_name_fail() {
        let key = StoreKey::from_bytes([7; 32]);
        let plain: Vec<u8> = (0..(2 * CHUNK + 100)).map(|i| (i % 13) as u8).collect();
        let sealed = seal(&key, "d", &plain);
        let mut flipped = sealed.clone();
        flipped[40] ^= 1;
        assert!(decrypt(&key, "d", &flipped).is_err());
        // Dropping the last chunk leaves a non-final chunk last.
        assert!(decrypt(&key, "d", &sealed[..8 + SALT + 2 * (CHUNK + TAG)]).is_err());
        assert!(decrypt(&StoreKey::from_bytes([8; 32]), "d", &sealed).is_err());
        assert!(decrypt(&key, "other", &sealed).is_err());
        assert!(decrypt(&key, "d", b"OPSTENC1short").is_err());
    }
}
