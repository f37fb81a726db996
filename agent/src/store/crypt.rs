//! Encryption at rest for stored models: XChaCha20-Poly1305 with a device key.
//!
//! File layout: `OPSTENC1` (8 bytes) ‖ salt (16 random bytes) ‖ chunks. The plaintext is cut
//! into 1 MiB chunks, each sealed on its own (ciphertext ‖ 16-byte tag) with the nonce
//! salt ‖ chunk index (u32 BE) ‖ last-chunk flag (u32 BE) and the file's model digest as
//! associated data. A flipped bit, a reordered or dropped chunk, a truncated file, a file
//! renamed to another digest or a wrong key all fail authentication. Plaintext exists only
//! in memory.

use super::KeyFileError;
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
    pub fn load_or_create(path: &Path, may_create: bool) -> Result<StoreKey, KeyFileError> {
        const WHAT: &str = "store key";
        let io = |source| KeyFileError::Io { what: WHAT, path: path.to_owned(), source };
        match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(path).map_err(io)?);
                if mode & 0o077 != 0 {
                    tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "store key is readable by others: chmod 600");
                }
                let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyFileError::Invalid {
                    what: WHAT,
                    path: path.to_owned(),
                    why: format!("must hold exactly 32 bytes (it has {})", bytes.len()),
                })?;
                Ok(StoreKey(Key::from(raw)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && may_create => {
                let raw = super::create_secret(WHAT, path, 32)?;
                tracing::info!(file = %path.display(), "created the model store key");
                let raw: [u8; 32] = raw.as_slice().try_into().unwrap_or([0; 32]);
                Ok(StoreKey(Key::from(raw)))
            }
            Err(e) => Err(io(e)),
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
    let mut sealer = Sealer::new(key, digest, out)?;
    sealer.write(plain)?;
    sealer.finish().map(|_| ())
}

/// Seals a file as it is written, a chunk at a time (memory: one chunk), in the format
/// [`decrypt`] opens: the last chunk (possibly empty) is marked as the last.
pub struct Sealer<W: Write> {
    cipher: XChaCha20Poly1305,
    salt: [u8; SALT],
    digest: String,
    out: W,
    pending: Vec<u8>,
    index: u32,
}

impl<W: Write> Sealer<W> {
    pub fn new(key: &StoreKey, digest: &str, mut out: W) -> io::Result<Self> {
        let mut salt = [0u8; SALT];
        getrandom::fill(&mut salt).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
        out.write_all(MAGIC)?;
        out.write_all(&salt)?;
        Ok(Sealer {
            cipher: XChaCha20Poly1305::new(&key.0),
            salt,
            digest: digest.to_owned(),
            out,
            pending: Vec::with_capacity(CHUNK),
            index: 0,
        })
    }

    fn seal(&mut self, upto: usize, last: bool) -> io::Result<()> {
        let sealed = self
            .cipher
            .encrypt(
                &nonce(&self.salt, self.index, last),
                Payload { msg: &self.pending[..upto], aad: self.digest.as_bytes() },
            )
            .map_err(|_| io::Error::other("encryption failed"))?;
        self.out.write_all(&sealed)?;
        self.pending.drain(..upto);
        self.index = self.index.checked_add(1).ok_or_else(|| io::Error::other("model too large to encrypt"))?;
        Ok(())
    }

    /// Seals every full chunk but the newest (which may turn out to be the last).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let mut data = data;
        while !data.is_empty() {
            let room = (CHUNK + 1).saturating_sub(self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..room]);
            data = &data[room..];
            if self.pending.len() > CHUNK {
                self.seal(CHUNK, false)?;
            }
        }
        Ok(())
    }

    /// Seals what is left as the last chunk and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let n = self.pending.len();
        self.seal(n, true)?;
        Ok(self.out)
    }
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
    fn sealing_in_pieces_opens_like_sealing_at_once() {
        let key = StoreKey::from_bytes([7; 32]);
        for len in [0, CHUNK, 2 * CHUNK + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut sealer = Sealer::new(&key, "d", Vec::new()).expect("sealer");
            for piece in plain.chunks(7919) {
                sealer.write(piece).expect("write");
            }
            let sealed = sealer.finish().expect("finish");
            assert_eq!(sealed.len(), seal(&key, "d", &plain).len(), "len {len}");
            assert_eq!(decrypt(&key, "d", &sealed).expect("opens"), plain, "len {len}");
        }
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
