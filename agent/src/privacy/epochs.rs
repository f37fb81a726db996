//! Pseudonymization key epochs: the key that turns a parameter into its `hmac:` pseudonym (and
//! keys the input digest) is replaced every `privacy.key_period`. Each inference record names
//! its epoch (`key_epoch`). Destroying an epoch's key (`outpost audit forget --before DATE`)
//! makes that epoch's pseudonyms unlinkable to anyone's value: crypto-shredding, with the
//! records and their hash chain left as they are.
//!
//! Epoch keys are random, so nothing derives a destroyed one again. They are kept in
//! `<state_dir>/privacy/epochs.json` (0600), each wrapped (XOR) with a pad the HMAC key
//! derives for that epoch id, so the file is no use without the HMAC key, which may be a
//! systemd credential. Ids only grow, so no pad is ever used for two keys.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::locks::RwLockExt;
use outpost_proto::registry::hex;

pub const KEY_LEN: usize = 32;

/// One epoch as stored: its key wrapped.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    id: u64,
    start_ms: i64,
    end_ms: i64,
    key: String,
}

/// An epoch whose key was destroyed: kept so that searches can say what they cannot link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Destroyed {
    pub id: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    pub destroyed_ms: i64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct File {
    epochs: Vec<Stored>,
    #[serde(default)]
    destroyed: Vec<Destroyed>,
}

/// An epoch with its key, as the agent uses it.
#[derive(Clone)]
pub struct EpochKey {
    pub id: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    pub key: [u8; KEY_LEN],
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey").field("id", &self.id).field("end_ms", &self.end_ms).finish_non_exhaustive()
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn pad(master: &[u8], id: u64) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(master) {
        mac.update(b"outpost pseudonym key epoch\0");
        mac.update(&id.to_le_bytes());
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

fn wrap(master: &[u8], id: u64, key: &[u8; KEY_LEN]) -> String {
    let p = pad(master, id);
    let wrapped: Vec<u8> = key.iter().zip(p).map(|(k, p)| k ^ p).collect();
    hex::encode(&wrapped)
}

fn unwrap(master: &[u8], s: &Stored) -> Result<EpochKey, String> {
    let bytes = hex::decode(&s.key)
        .filter(|b| b.len() == KEY_LEN)
        .ok_or_else(|| format!("key epoch {}: the stored key is not {KEY_LEN} bytes of hex", s.id))?;
    let p = pad(master, s.id);
    let mut key = [0u8; KEY_LEN];
    for (i, b) in bytes.iter().enumerate() {
        key[i] = b ^ p[i];
    }
    Ok(EpochKey { id: s.id, start_ms: s.start_ms, end_ms: s.end_ms, key })
}

/// The epochs file of a state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("privacy").join("epochs.json")
}

fn read(path: &Path) -> Result<File, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{}: {e}: restore it from a backup, or remove it to start a new key epoch (the records of \
                 earlier epochs can then no longer be linked to anyone)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write(path: &Path, file: &File) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let bytes = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
    crate::store::write_secret(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// What a search can use: the keys still held, and the epochs destroyed.
pub struct Keys {
    pub keys: Vec<EpochKey>,
    pub destroyed: Vec<Destroyed>,
}

/// Reads every epoch key (for `outpost audit find`; reads only).
pub fn load_all(state_dir: &Path, master: &[u8]) -> Result<Keys, String> {
    let file = read(&path(state_dir))?;
    let keys = file.epochs.iter().map(|s| unwrap(master, s)).collect::<Result<Vec<_>, _>>()?;
    Ok(Keys { keys, destroyed: file.destroyed })
}

/// The agent's epochs: the current one in memory, the file rewritten at each change.
pub struct Epochs {
    path: PathBuf,
    master: Vec<u8>,
    period_ms: i64,
    /// The file as last written, and the current epoch's key.
    state: RwLock<(File, EpochKey)>,
}

impl Epochs {
    /// Opens the epochs of `state_dir`, starting the first (or the next, when the newest has
    /// ended) as needed.
    pub fn open(state_dir: &Path, master: &[u8], period: std::time::Duration) -> Result<Epochs, String> {
        let path = path(state_dir);
        let mut file = read(&path)?;
        let period_ms = (period.as_millis() as i64).max(1);
        let now = now_ms();
        let newest = file.epochs.iter().max_by_key(|s| s.id).map(|s| unwrap(master, s)).transpose()?;
        let current = match newest {
            Some(k) if k.end_ms > now => k,
            _ => {
                let k = Self::next(&mut file, master, now, period_ms)?;
                write(&path, &file)?;
                k
            }
        };
        Ok(Epochs { path, master: master.to_vec(), period_ms, state: RwLock::new((file, current)) })
    }

    /// Appends a new epoch starting `now` to `file`.
    fn next(file: &mut File, master: &[u8], now: i64, period_ms: i64) -> Result<EpochKey, String> {
        let id = file.epochs.iter().map(|s| s.id).chain(file.destroyed.iter().map(|d| d.id)).max().unwrap_or(0) + 1;
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| format!("no randomness for a pseudonym key: {e}"))?;
        let k = EpochKey { id, start_ms: now, end_ms: now.saturating_add(period_ms), key };
        file.epochs.push(Stored { id, start_ms: k.start_ms, end_ms: k.end_ms, key: wrap(master, id, &key) });
        Ok(k)
    }

    /// The epoch to pseudonymize with now; starts the next one when the current has ended.
    /// Should the next one fail to be kept on disk, the current one goes on (and the next
    /// call tries again): a record is never keyed by an epoch the file does not hold.
    pub fn current(&self) -> EpochKey {
        let now = now_ms();
        {
            let s = self.state.read_locked();
            if s.1.end_ms > now {
                return s.1.clone();
            }
        }
        let mut s = self.state.write_locked();
        if s.1.end_ms > now {
            return s.1.clone();
        }
        if let Err(e) = self.advance(&mut s, now) {
            tracing::error!(error = %e, "the next pseudonym key epoch could not be kept; the current one goes on");
        }
        s.1.clone()
    }

    fn advance(&self, s: &mut (File, EpochKey), now: i64) -> Result<u64, String> {
        let mut file = s.0.clone();
        // The ending epoch ends now (a rotation before its time).
        if let Some(cur) = file.epochs.iter_mut().find(|e| e.id == s.1.id) {
            cur.end_ms = cur.end_ms.min(now);
        }
        let k = Self::next(&mut file, &self.master, now, self.period_ms)?;
        write(&self.path, &file)?;
        let id = k.id;
        *s = (file, k);
        Ok(id)
    }

    /// Ends the current epoch now and starts the next: (ended, started).
    pub fn rotate(&self) -> Result<(u64, u64), String> {
        let mut s = self.state.write_locked();
        let ended = s.1.id;
        let started = self.advance(&mut s, now_ms())?;
        Ok((ended, started))
    }

    /// Destroys the keys of the epochs that ended at or before `before_ms` (never the current
    /// one); returns what was destroyed.
    pub fn forget(&self, before_ms: i64) -> Result<Vec<Destroyed>, String> {
        let mut s = self.state.write_locked();
        let now = now_ms();
        let cutoff = before_ms.min(now);
        let current = s.1.id;
        let mut file = s.0.clone();
        let (gone, kept): (Vec<Stored>, Vec<Stored>) =
            file.epochs.drain(..).partition(|e| e.id != current && e.end_ms <= cutoff);
        file.epochs = kept;
        let destroyed: Vec<Destroyed> = gone
            .iter()
            .map(|e| Destroyed { id: e.id, start_ms: e.start_ms, end_ms: e.end_ms, destroyed_ms: now })
            .collect();
        if destroyed.is_empty() {
            return Ok(destroyed);
        }
        file.destroyed.extend(destroyed.iter().cloned());
        write(&self.path, &file)?;
        s.0 = file;
        Ok(destroyed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_persist_and_are_destroyed_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let master = [7u8; 32];
        let e = Epochs::open(dir.path(), &master, std::time::Duration::from_secs(3600)).unwrap();
        let first = e.current();
        assert_eq!(first.id, 1);
        // A second open (a restart) goes on with the same epoch and key.
        let again = Epochs::open(dir.path(), &master, std::time::Duration::from_secs(3600)).unwrap().current();
        assert_eq!((again.id, again.key), (1, first.key));
        // The file alone does not give the key: it is wrapped with the HMAC key.
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert!(!text.contains(&hex::encode(&first.key)));
        let wrong = load_all(dir.path(), &[8u8; 32]).unwrap();
        assert_ne!(wrong.keys[0].key, first.key);

        assert_eq!(e.rotate().unwrap(), (1, 2));
        let second = e.current();
        assert_ne!(second.key, first.key);
        // The current epoch is never destroyed, whatever the date.
        let gone = e.forget(i64::MAX).unwrap();
        assert_eq!(gone.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1]);
        let keys = load_all(dir.path(), &master).unwrap();
        assert_eq!(keys.keys.iter().map(|k| k.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(keys.destroyed[0].id, 1);
        assert!(!std::fs::read_to_string(path(dir.path())).unwrap().contains(&wrap(&master, 1, &first.key)));
        // Ids are never reused after a destruction.
        assert_eq!(e.rotate().unwrap(), (2, 3));
        assert!(e.forget(0).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_epochs_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("privacy")).unwrap();
        std::fs::write(path(dir.path()), b"{not json").unwrap();
        let e = Epochs::open(dir.path(), &[1u8; 32], std::time::Duration::from_secs(60)).err().unwrap();
        assert!(e.contains("epochs.json"), "{e}");
    }
}
