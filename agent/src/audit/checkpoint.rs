//! Signed checkpoints of the log's head. The node signs (node, seq, hash, time) with its ed25519
//! key every `checkpoint_every` records, after `checkpoint_interval` with new records, and at
//! shutdown. A checkpoint is itself the next record of the chain (so it travels upstream with
//! the records, in order) and is also appended to `checkpoints.ndjson` beside the segments, so
//! `audit verify` detects records cut from the tail, a deleted last segment, or a rewritten
//! record whose hash was recomputed, as far back as the last checkpoint still on the box.

use crate::store::KeyFileError;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::VerifyingKey;

use outpost_proto::registry::KeyPair;

/// The side file of checkpoints, one JSON object per line.
pub const FILE: &str = "checkpoints.ndjson";
/// The side file is trimmed to its newest checkpoints past this size.
const FILE_LIMIT: u64 = 1 << 20;

/// The node's signing key and name.
pub struct Signer {
    pub key: KeyPair,
    pub node: String,
}

pub use outpost_proto::audit::Checkpoint;

impl Signer {
    /// Signs the head `(seq, hash)` of this node's log.
    pub fn sign(&self, seq: u64, hash: &str, time_ms: i64) -> Checkpoint {
        Checkpoint::sign(&self.key, &self.node, seq, hash, time_ms)
    }
}

/// Appends one checkpoint to the side file and makes it durable. Past [`FILE_LIMIT`] the file
/// is rewritten (atomically) with its newer half.
pub fn append_file(dir: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let path = dir.join(FILE);
    let mut line = serde_json::to_vec(cp).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    f.write_all(&line)?;
    f.sync_data()?;
    if f.metadata()?.len() > FILE_LIMIT {
        let data = std::fs::read(&path)?;
        let cut = data[data.len() / 2..].iter().position(|&b| b == b'\n').map_or(0, |i| data.len() / 2 + i + 1);
        crate::store::write_atomic(&path, &data[cut..])?;
    }
    Ok(())
}

/// The checkpoints of the side file, in file order. An unreadable whole line is reported (the
/// file is append-only: anything else is damage or tampering); a last line without its newline
/// is a write cut short by a crash, and is left out.
pub fn read_file(dir: &Path) -> Result<Vec<Checkpoint>, String> {
    let path = dir.join(FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = Vec::new();
    for (i, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
        let Some(line) = line.strip_suffix(b"\n") else { break };
        if line.is_empty() {
            continue;
        }
        let cp = serde_json::from_slice(line)
            .map_err(|e| format!("{} line {} is not a checkpoint: {e}", path.display(), i + 1))?;
        out.push(cp);
    }
    Ok(out)
}

/// The node key: loaded from `path`, or created there (0600, with its `.pub` beside it) when
/// missing.
pub fn load_or_create_key(path: &Path) -> Result<KeyPair, KeyFileError> {
    const WHAT: &str = "node key";
    let key_error = |source| KeyFileError::Key { what: WHAT, path: path.to_owned(), source };
    if path.exists() {
        return KeyPair::load(path).map_err(key_error);
    }
    if crate::credentials::is_credential(path) {
        let why = "no such credential; a credential is provisioned (outpost keygen, systemd-creds encrypt, then \
                   LoadCredentialEncrypted=), not created by the agent"
            .to_owned();
        return Err(KeyFileError::Invalid { what: WHAT, path: path.to_owned(), why });
    }
    let key = KeyPair::generate().map_err(key_error)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| KeyFileError::Io {
            what: WHAT,
            path: parent.to_owned(),
            source,
        })?;
    }
    key.save(&path.with_extension(""), Some("outpost node key: signs audit checkpoints")).map_err(key_error)?;
    tracing::info!(path = %path.display(), keyid = %key.keyid, "created the node key");
    Ok(key)
}

/// The node's public key for verification: `<key>.pub` beside the key, else derived from the
/// private key file. Reads only.
pub fn public_key(key_path: &Path) -> Result<VerifyingKey, KeyFileError> {
    let pub_path = key_path.with_extension("pub");
    if pub_path.exists() {
        return outpost_proto::registry::keys::load_public(&pub_path)
            .and_then(|p| p.verifying_key())
            .map_err(|source| KeyFileError::Key { what: "node public key", path: pub_path, source });
    }
    KeyPair::load(key_path).and_then(|k| k.public().verifying_key()).map_err(|source| KeyFileError::Key {
        what: "node key",
        path: key_path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_as_signed() {
        let signer = Signer { key: KeyPair::generate().unwrap(), node: "n1".into() };
        let key = signer.key.public().verifying_key().unwrap();
        let cp = signer.sign(7, "ab", 1000);
        assert!(cp.is_signed_by(&key));
        assert_eq!(Checkpoint::from_body(&cp.body()), Some(cp.clone()));
        for forged in [
            Checkpoint { seq: 8, ..cp.clone() },
            Checkpoint { hash: "ac".into(), ..cp.clone() },
            Checkpoint { time_ms: 1001, ..cp.clone() },
            Checkpoint { node: "n2".into(), ..cp.clone() },
            Checkpoint { sig: "AAAA".into(), ..cp.clone() },
        ] {
            assert!(!forged.is_signed_by(&key), "{forged:?}");
        }
        let other = KeyPair::generate().unwrap().public().verifying_key().unwrap();
        assert!(!cp.is_signed_by(&other));
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_left_out_and_a_damaged_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer { key: KeyPair::generate().unwrap(), node: "n1".into() };
        append_file(dir.path(), &signer.sign(1, "aa", 1)).unwrap();
        append_file(dir.path(), &signer.sign(2, "bb", 2)).unwrap();
        let path = dir.path().join(FILE);
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 20]).unwrap();
        assert_eq!(read_file(dir.path()).unwrap().len(), 1, "the torn last line is not a checkpoint yet");
        let mut damaged = whole.clone();
        damaged[5] = b'#';
        std::fs::write(&path, &damaged).unwrap();
        assert!(read_file(dir.path()).unwrap_err().contains("line 1 is not a checkpoint"));
    }
}
