//! The model store under the state directory: content-addressed files, written atomically
//! (temp file → fsync → rename → fsync directory), and the store's state file that says which
//! versions are installed and which were rejected. Everything is re-hashed when read.
//!
//! Layout: `<state_dir>/store/{models/<sha256>.onnx, manifests/<sha256>.json, tmp/, state.json}`.
//!
//! With a device key ([`crypt::StoreKey`], the default) model files are encrypted at rest and
//! decrypted only into memory; manifests (signed, public metadata) and the state file are not.

pub mod crypt;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use outpost_proto::registry::{hex, RegistryError};

use outpost_proto::fsutil::{fsync_dir, temp_sibling};
pub use outpost_proto::fsutil::{write_atomic, write_secret};

/// Why a key file (the store key, the HMAC key, the node key) cannot be loaded or created;
/// `what` names the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {}: {why}", path.display())]
    Invalid { what: &'static str, path: PathBuf, why: String },
    /// The system's random source failed (`getrandom::Error` is not a `std::error::Error`).
    #[error("no randomness for the {what}: {why}")]
    Random { what: &'static str, why: String },
    #[error("{what} {}: {source}", path.display())]
    Key {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: RegistryError,
    },
}

/// Creates a secret of `len` random bytes at `path` (mode 0600). A secret configured as a
/// systemd credential is never created: it must be provisioned.
pub fn create_secret(what: &'static str, path: &Path, len: usize) -> Result<Vec<u8>, KeyFileError> {
    if crate::credentials::is_credential(path) {
        let why = "no such credential; a credential is provisioned (systemd-creds encrypt, then \
                   LoadCredentialEncrypted=), not created by the agent"
            .to_owned();
        return Err(KeyFileError::Invalid { what, path: path.to_owned(), why });
    }
    let mut raw = vec![0u8; len];
    getrandom::fill(&mut raw).map_err(|e| KeyFileError::Random { what, why: e.to_string() })?;
    write_secret(path, &raw).map_err(|source| KeyFileError::Io { what, path: path.to_owned(), source })?;
    Ok(raw)
}

/// One installed version of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledVersion {
    pub version: String,
    pub manifest_sha256: String,
    pub model_sha256: String,
    pub installed_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledModel {
    /// The default version.
    pub current: InstalledVersion,
    /// The version before it, kept (not served) for an instant rollback.
    #[serde(default)]
    pub previous: Option<InstalledVersion>,
    /// A new version serving a share of traffic as a canary.
    #[serde(default)]
    pub candidate: Option<InstalledVersion>,
    /// Further versions served side by side (pinned version policy).
    #[serde(default)]
    pub also: Vec<InstalledVersion>,
}

impl InstalledModel {
    pub fn new(current: InstalledVersion) -> Self {
        InstalledModel { current, previous: None, candidate: None, also: Vec::new() }
    }

    /// Every version whose files must be kept.
    pub fn all(&self) -> impl Iterator<Item = &InstalledVersion> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .chain(self.candidate.as_ref())
            .chain(self.also.iter())
    }
}

/// A version that will not be installed again (failed golden vectors, rolled back, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub name: String,
    pub version: String,
    pub reason: String,
    pub at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    #[serde(default)]
    pub installed: BTreeMap<String, InstalledModel>,
    /// Keyed by manifest sha256.
    #[serde(default)]
    pub rejected: BTreeMap<String, Rejection>,
    /// The last problem with a version that is not (yet) installed, per model name: shown by
    /// `outpost model list`, cleared when that model installs.
    #[serde(default)]
    pub pending_errors: BTreeMap<String, Rejection>,
    /// The last registry-wide problem (index signature, expiry, rollback, unreachable).
    #[serde(default)]
    pub registry_error: Option<String>,
    /// Models taken out of service by hand (`.../unload`): not served until loaded again.
    #[serde(default)]
    pub unloaded: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Encrypts model files at rest; `None` stores them as plain ONNX (`[store] encrypt = false`).
    key: Option<crypt::StoreKey>,
}

/// Decompresses the zstd file `blob` a buffer at a time, handing each to `each`, refused past
/// `max_size` bytes; returns the sha256 (hex) of what it decompressed to.
fn decompress_each(
    blob: &Path,
    max_size: u64,
    mut each: impl FnMut(&[u8]) -> Result<(), RegistryError>,
) -> Result<String, RegistryError> {
    let input = File::open(blob).map_err(|e| RegistryError::file(blob, e))?;
    let mut decoder =
        zstd::stream::read::Decoder::new(input).map_err(|e| RegistryError::Invalid(format!("zstd: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = decoder.read(&mut buf).map_err(|e| RegistryError::Invalid(format!("blob does not decompress: {e}")))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max_size {
            return Err(RegistryError::TooLarge(format!("blob decompresses past {max_size} bytes")));
        }
        hasher.update(&buf[..n]);
        each(&buf[..n])?;
        crate::failpoint::hit("store-decompress");
    }
    Ok(hex::encode(&hasher.finalize()))
}

/// Where a model being installed is written: as it is, or sealed with the device key.
enum ModelWriter {
    Plain(io::BufWriter<File>),
    Sealed(crypt::Sealer<io::BufWriter<File>>),
}

impl ModelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            ModelWriter::Plain(w) => w.write_all(data),
            ModelWriter::Sealed(s) => s.write(data),
        }
    }

    fn finish(self) -> io::Result<File> {
        let w = match self {
            ModelWriter::Plain(w) => w,
            ModelWriter::Sealed(s) => s.finish()?,
        };
        w.into_inner().map_err(|e| e.into_error())
    }
}

impl Store {
    pub fn open(state_dir: &Path) -> io::Result<Store> {
        let root = state_dir.join("store");
        for d in ["models", "manifests", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        // Leftovers of an interrupted install are dropped; resumable downloads (.partial) stay.
        for dir in [root.join("tmp"), root.join("models"), root.join("manifests"), root.clone()] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".tmp") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(Store { root, key: None })
    }

    /// The store of `state_dir` for reading only: creates and removes nothing (a read-only
    /// command run as another user must leave no file behind).
    pub fn open_read_only(state_dir: &Path) -> Store {
        Store { root: state_dir.join("store"), key: None }
    }

    /// Encrypts models written from now on with `key`, and reads encrypted ones with it.
    pub fn with_key(mut self, key: Option<crypt::StoreKey>) -> Store {
        self.key = key;
        self
    }

    /// Whether any model file is stored (a missing key must then not be replaced silently).
    pub fn has_models(&self) -> bool {
        std::fs::read_dir(self.root.join("models"))
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".onnx")))
            .unwrap_or(false)
    }

    /// Writes a model file (encrypted when there is a key) atomically under its digest.
    fn write_model(&self, sha: &str, plain: &[u8]) -> io::Result<PathBuf> {
        self.write_sealed(self.model_path(sha), sha, plain)
    }

    /// Writes `plain` durably at `dest` (encrypted with the store key, bound to `sha`).
    fn write_sealed(&self, dest: PathBuf, sha: &str, plain: &[u8]) -> io::Result<PathBuf> {
        let dir = dest.parent().unwrap_or(Path::new(".")).to_owned();
        let tmp = temp_sibling(&dest);
        let result = (|| {
            let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            let mut w = io::BufWriter::new(f);
            match &self.key {
                Some(k) => crypt::encrypt_to(k, sha, plain, &mut w)?,
                None => w.write_all(plain)?,
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
            fsync_dir(&dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| dest)
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn load_state(&self) -> Result<StoreState, RegistryError> {
        match std::fs::read(self.state_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                RegistryError::Io(format!("store state {} is unreadable: {e}", self.state_path().display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StoreState::default()),
            Err(e) => Err(RegistryError::file(self.state_path(), e)),
        }
    }

    pub fn save_state(&self, state: &StoreState) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| RegistryError::Io(e.to_string()))?;
        write_atomic(&self.state_path(), &bytes).map_err(|e| RegistryError::Io(format!("saving store state: {e}")))
    }

    pub fn model_path(&self, sha: &str) -> PathBuf {
        self.root.join("models").join(format!("{sha}.onnx"))
    }

    /// A package file (a tokenizer, a labels file) by its sha256.
    pub fn file_path(&self, sha: &str) -> PathBuf {
        self.root.join("files").join(sha)
    }

    /// Stores a package file whose digest the caller checked (encrypted like models).
    pub fn put_file(&self, sha: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        std::fs::create_dir_all(self.root.join("files"))
            .map_err(|e| RegistryError::file(self.root.join("files"), e))?;
        self.write_sealed(self.file_path(sha), sha, bytes)
            .map(|_| ())
            .map_err(|e| RegistryError::Io(format!("storing package file: {e}")))
    }

    /// Reads a stored package file, decrypting and re-hashing it: a file changed on disk is
    /// refused.
    pub fn read_file(&self, sha: &str) -> Result<Vec<u8>, RegistryError> {
        self.open_sealed(&self.file_path(sha), sha, "package file").map(|(plain, _)| plain)
    }

    /// Reads `path` (stored under `sha`), decrypting it with the store key when it is
    /// encrypted, and checks it still hashes to `sha`. Returns the plain bytes and whether the
    /// file was encrypted.
    fn open_sealed(&self, path: &Path, sha: &str, what: &str) -> Result<(Vec<u8>, bool), RegistryError> {
        let bytes = std::fs::read(path).map_err(|e| RegistryError::file(path, e))?;
        let encrypted = crypt::is_encrypted(&bytes);
        let plain = match (&self.key, encrypted) {
            (Some(k), true) => crypt::decrypt(k, sha, &bytes)
                .map_err(|e| RegistryError::Digest(format!("stored {what} {} {e}", path.display())))?,
            (None, true) => {
                return Err(RegistryError::Digest(format!(
                    "stored {what} {} is encrypted and [store] encrypt = false: no key to open it",
                    path.display()
                )))
            }
            (_, false) => bytes,
        };
        let got = outpost_proto::registry::sha256_hex(&plain);
        if got != sha {
            return Err(RegistryError::Digest(format!(
                "stored {what} {} was modified on disk (sha256 now {got})",
                path.display()
            )));
        }
        Ok((plain, encrypted))
    }

    pub fn manifest_path(&self, sha: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{sha}.json"))
    }

    /// Where a blob download in progress is kept (resumable across restarts).
    pub fn partial_path(&self, blob_sha: &str) -> PathBuf {
        self.root.join("tmp").join(format!("{blob_sha}.partial"))
    }

    pub fn put_manifest(&self, sha: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        write_atomic(&self.manifest_path(sha), bytes).map_err(|e| RegistryError::Io(format!("storing manifest: {e}")))
    }

    /// Reads a stored manifest and checks it still has its digest.
    pub fn read_manifest(&self, sha: &str) -> Result<Vec<u8>, RegistryError> {
        let bytes =
            std::fs::read(self.manifest_path(sha)).map_err(|e| RegistryError::Io(format!("manifest {sha}: {e}")))?;
        let got = outpost_proto::registry::sha256_hex(&bytes);
        if got != sha {
            return Err(RegistryError::Digest(format!("stored manifest {sha} was modified (now {got})")));
        }
        Ok(bytes)
    }

    /// Decompresses a verified zstd blob into the store under the model's sha256, as a stream
    /// (memory: a few buffers, whatever the size), in two passes: the first only hashes what
    /// the blob decompresses to, capped at `max_size` bytes, so that a blob that is not the
    /// signed model never reaches the disk; the second writes it (encrypted) to a temporary
    /// file that becomes the model after an fsync.
    pub fn install_model(&self, blob: &Path, model_sha: &str, max_size: u64) -> Result<PathBuf, RegistryError> {
        let got = decompress_each(blob, max_size, |_| Ok(()))?;
        if got != model_sha {
            return Err(RegistryError::Digest(format!(
                "decompressed model has sha256 {got}, manifest says {model_sha}"
            )));
        }
        let dest = self.model_path(model_sha);
        let dir = dest.parent().unwrap_or(Path::new(".")).to_owned();
        let tmp = temp_sibling(&dest);
        let storing = |e: io::Error| RegistryError::Io(format!("storing model: {e}"));
        let result = (|| {
            let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(storing)?;
            let mut out = match &self.key {
                Some(k) => {
                    ModelWriter::Sealed(crypt::Sealer::new(k, model_sha, io::BufWriter::new(f)).map_err(storing)?)
                }
                None => ModelWriter::Plain(io::BufWriter::new(f)),
            };
            let again = decompress_each(blob, max_size, |chunk| out.write(chunk).map_err(storing))?;
            if again != model_sha {
                return Err(RegistryError::Digest(format!("blob changed while it was installed (now {again})")));
            }
            let f = out.finish().map_err(storing)?;
            f.sync_all().map_err(storing)?;
            std::fs::rename(&tmp, &dest).map_err(storing)?;
            fsync_dir(&dir).map_err(storing)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| dest)
    }

    /// Reads an installed model into memory (decrypting it), re-hashing it: a file changed on
    /// disk, or one the key cannot open, is refused. A plain file left by a version without
    /// encryption is encrypted in place once its digest checks.
    pub fn read_model(&self, sha: &str) -> Result<Vec<u8>, RegistryError> {
        let (plain, encrypted) = self.open_sealed(&self.model_path(sha), sha, "model")?;
        if self.key.is_some() && !encrypted {
            match self.write_model(sha, &plain) {
                Ok(_) => tracing::info!(model_sha256 = sha, "encrypted a plain stored model"),
                Err(e) => tracing::warn!(model_sha256 = sha, error = %e, "cannot encrypt a plain stored model"),
            }
        }
        Ok(plain)
    }

    /// Deletes models and manifests no installed version refers to, and partial downloads
    /// untouched for a week (younger ones are kept to resume).
    pub fn gc(&self, state: &StoreState) {
        let mut keep_models = Vec::new();
        let mut keep_manifests: Vec<String> = state.rejected.keys().cloned().collect();
        for m in state.installed.values() {
            for v in m.all() {
                keep_models.push(format!("{}.onnx", v.model_sha256));
                keep_manifests.push(format!("{}.json", v.manifest_sha256));
            }
        }
        let sweep = |dir: PathBuf, keep: &dyn Fn(&str) -> bool| {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !keep(&name) {
                        tracing::debug!(file = %e.path().display(), "store gc");
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        };
        sweep(self.root.join("models"), &|n| keep_models.iter().any(|k| k == n));
        // Package files: those the kept manifests name (read only when any file is stored).
        let files_dir = self.root.join("files");
        let any_file = std::fs::read_dir(&files_dir).is_ok_and(|mut d| d.next().is_some());
        let keep_files: Vec<String> = keep_manifests
            .iter()
            .filter(|_| any_file)
            .filter_map(|m| {
                let bytes = std::fs::read(self.manifest_path(m.trim_end_matches(".json"))).ok()?;
                let env = outpost_proto::registry::dsse::Envelope::parse(&bytes).ok()?;
                let stmt: outpost_proto::registry::Statement =
                    serde_json::from_slice(&env.payload_bytes().ok()?).ok()?;
                Some(stmt.predicate.processing?.files.into_values().map(|f| f.sha256).collect::<Vec<_>>())
            })
            .flatten()
            .collect();
        sweep(files_dir, &|n| keep_files.iter().any(|k| k == n));
        sweep(self.root.join("manifests"), &|n| keep_manifests.iter().any(|k| *k == n || k == &n.replace(".json", "")));
        let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 86400);
        if let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) {
            for e in entries.flatten() {
                let stale = e.metadata().and_then(|m| m.modified()).map(|t| t < week_ago).unwrap_or(true);
                if stale {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
