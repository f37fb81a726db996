//! Trusted registry state: the root (keys and thresholds) and the last verified index, kept
//! under `<state_dir>/registry/` and replaced only atomically. Implements root rotation, index
//! rollback protection and expiry (freeze) checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::client::{Fetched, Fetcher};
use super::dsse::Envelope;
use super::{
    parse_time, Baseline, Index, RegistryError, Role, Root, BASELINE_TYPE, INDEX_TYPE, MAX_BASELINE_BYTES,
    MAX_INDEX_BYTES, MAX_ROOT_BYTES, ROOT_TYPE,
};
use crate::store::write_atomic;
use outpost_proto::registry::pipeline::{Pipelines, MAX_PIPELINES_BYTES, PIPELINES_TYPE};

/// The keys of one role, with its threshold.
#[derive(Debug, Clone)]
pub struct RoleKeys {
    pub keys: BTreeMap<String, VerifyingKey>,
    pub threshold: usize,
}

fn role_keys(root: &Root, role: &Role, name: &str) -> Result<RoleKeys, RegistryError> {
    if role.threshold == 0 || role.threshold > role.keyids.len() {
        return Err(RegistryError::Invalid(format!(
            "{name} role threshold {} with {} keys",
            role.threshold,
            role.keyids.len()
        )));
    }
    let mut keys = BTreeMap::new();
    for id in &role.keyids {
        let pk =
            root.keys.get(id).ok_or_else(|| RegistryError::Invalid(format!("{name} role names unknown key {id}")))?;
        if pk.keyid()? != *id {
            return Err(RegistryError::Invalid(format!("key {id} does not hash to its id")));
        }
        keys.insert(id.clone(), pk.verifying_key()?);
    }
    Ok(RoleKeys { keys, threshold: role.threshold })
}

/// Parses a root envelope and checks it is signed by a threshold of its own root keys.
pub fn verify_root_self(bytes: &[u8]) -> Result<Root, RegistryError> {
    let env = Envelope::parse(bytes)?;
    let root: Root = serde_json::from_slice(&env.payload_bytes()?)
        .map_err(|e| RegistryError::Invalid(format!("root payload: {e}")))?;
    if root.kind != "root" {
        return Err(RegistryError::Invalid(format!("root _type is '{}'", root.kind)));
    }
    parse_time(&root.expires)?;
    let own = role_keys(&root, &root.roles.root, "root")?;
    role_keys(&root, &root.roles.index, "index")?;
    env.verify(ROOT_TYPE, &own.keys, own.threshold, &format!("root v{}", root.version))?;
    Ok(root)
}

/// Parses a compliance baseline envelope and checks it is signed by a threshold of the
/// root's index keys (expiry aside: the caller decides what an expired one means).
pub fn verify_baseline(root: &Root, bytes: &[u8]) -> Result<Baseline, RegistryError> {
    let env = Envelope::parse(bytes)?;
    let keys = role_keys(root, &root.roles.index, "index")?;
    let payload = env.verify(BASELINE_TYPE, &keys.keys, keys.threshold, "baseline")?;
    let baseline: Baseline =
        serde_json::from_slice(&payload).map_err(|e| RegistryError::Invalid(format!("baseline payload: {e}")))?;
    if baseline.kind != "baseline" {
        return Err(RegistryError::Invalid(format!("baseline _type is '{}'", baseline.kind)));
    }
    parse_time(&baseline.expires)?;
    if let Some(tls) = baseline.rules.tls.as_deref().filter(|t| !matches!(*t, "tls" | "mtls")) {
        return Err(RegistryError::Invalid(format!("baseline rule tls = '{tls}': \"tls\" or \"mtls\"")));
    }
    Ok(baseline)
}

/// Parses a `pipelines.json` envelope and checks it is signed by a threshold of the index
/// role. Each pipeline's own checks are the serving side's (`api::pipeline`).
pub fn verify_pipelines(root: &Root, bytes: &[u8]) -> Result<Pipelines, RegistryError> {
    let env = Envelope::parse(bytes)?;
    let keys = role_keys(root, &root.roles.index, "index")?;
    let payload = env.verify(PIPELINES_TYPE, &keys.keys, keys.threshold, "pipelines")?;
    let p: Pipelines =
        serde_json::from_slice(&payload).map_err(|e| RegistryError::Invalid(format!("pipelines payload: {e}")))?;
    if p.kind != "pipelines" {
        return Err(RegistryError::Invalid(format!("pipelines _type is '{}'", p.kind)));
    }
    parse_time(&p.expires)?;
    Ok(p)
}

/// A signed document kept beside the index (the baseline, the pipelines): versioned and
/// expiring.
pub(super) trait SignedDoc: Clone {
    const FILE: &'static str;
    const WHAT: &'static str;
    const MAX_BYTES: u64;
    fn verify(root: &Root, bytes: &[u8]) -> Result<Self, RegistryError>;
    fn version(&self) -> u64;
    fn expires(&self) -> &str;
}

impl SignedDoc for Baseline {
    const FILE: &'static str = "baseline.json";
    const WHAT: &'static str = "baseline";
    const MAX_BYTES: u64 = MAX_BASELINE_BYTES;
    fn verify(root: &Root, bytes: &[u8]) -> Result<Self, RegistryError> {
        verify_baseline(root, bytes)
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> &str {
        &self.expires
    }
}

impl SignedDoc for Pipelines {
    const FILE: &'static str = "pipelines.json";
    const WHAT: &'static str = "pipelines";
    const MAX_BYTES: u64 = MAX_PIPELINES_BYTES;
    fn verify(root: &Root, bytes: &[u8]) -> Result<Self, RegistryError> {
        verify_pipelines(root, bytes)
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn expires(&self) -> &str {
        &self.expires
    }
}

/// Fetches and verifies a signed document, if the registry publishes one; returns the one now
/// trusted and whether it changed. A forged, rolled-back or expired one is refused and the
/// trusted one stays; an accepted one is persisted in `dir`.
async fn update_doc<T: SignedDoc>(
    slot: &mut Option<(T, Vec<u8>)>,
    root: &Root,
    dir: &Path,
    fetcher: &Fetcher,
    now: i64,
) -> Result<(Option<T>, bool), RegistryError> {
    let bytes = match fetcher.get_body(T::FILE, T::MAX_BYTES).await {
        Ok(b) => b,
        Err(RegistryError::NotFound(_)) => return Ok((slot.as_ref().map(|(b, _)| b.clone()), false)),
        Err(e) => return Err(e),
    };
    if slot.as_ref().is_some_and(|(_, old)| *old == bytes) {
        return Ok((slot.as_ref().map(|(b, _)| b.clone()), false));
    }
    let doc = T::verify(root, &bytes)?;
    if let Some((old, _)) = slot.as_ref() {
        if doc.version() <= old.version() {
            return Err(RegistryError::Rollback(format!(
                "{} version {} is not newer than the trusted version {}",
                T::WHAT,
                doc.version(),
                old.version()
            )));
        }
    }
    if parse_time(doc.expires())? <= now {
        return Err(RegistryError::Expired(format!("{} v{} expired at {}", T::WHAT, doc.version(), doc.expires())));
    }
    write_atomic(&dir.join(T::FILE), &bytes).map_err(|e| RegistryError::Io(e.to_string()))?;
    *slot = Some((doc.clone(), bytes));
    Ok((Some(doc), true))
}

/// The baseline last accepted from the registry (`<state_dir>/registry/baseline.json`),
/// verified against the trusted root there; `None` when there is none.
pub fn persisted_baseline(state_dir: &Path) -> Result<Option<Baseline>, RegistryError> {
    let dir = state_dir.join("registry");
    let Ok(bytes) = std::fs::read(dir.join("baseline.json")) else {
        return Ok(None);
    };
    let root_bytes = std::fs::read(dir.join("root.json")).map_err(|e| RegistryError::file(dir.join("root.json"), e))?;
    let root = verify_root_self(&root_bytes)?;
    verify_baseline(&root, &bytes).map(Some)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    index_etag: Option<String>,
}

/// What the agent trusts right now.
pub struct Trusted {
    dir: PathBuf,
    pub root: Root,
    /// The last verified index and its envelope bytes.
    pub index: Option<(Index, Vec<u8>)>,
    index_etag: Option<String>,
    /// The last verified compliance baseline and its envelope bytes.
    pub baseline: Option<(Baseline, Vec<u8>)>,
    /// The last verified pipelines and their envelope bytes.
    pub pipelines: Option<(Pipelines, Vec<u8>)>,
}

impl Trusted {
    /// Loads the persisted trusted state; the pinned root starts trust on first use and
    /// replaces a persisted root of a lower version.
    pub fn load(state_dir: &Path, pinned: &Path) -> Result<Trusted, RegistryError> {
        let dir = state_dir.join("registry");
        std::fs::create_dir_all(&dir).map_err(|e| RegistryError::file(&dir, e))?;
        let pinned_bytes =
            std::fs::read(pinned).map_err(|e| RegistryError::Io(format!("trusted root {}: {e}", pinned.display())))?;
        let pinned_root = verify_root_self(&pinned_bytes)
            .map_err(|e| RegistryError::Invalid(format!("trusted root {}: {e}", pinned.display())))?;
        let persisted =
            std::fs::read(dir.join("root.json")).ok().and_then(|b| verify_root_self(&b).ok().map(|r| (r, b)));
        let root = match persisted {
            Some((r, _)) if r.version >= pinned_root.version => r,
            _ => {
                write_atomic(&dir.join("root.json"), &pinned_bytes).map_err(|e| RegistryError::Io(e.to_string()))?;
                pinned_root
            }
        };
        let meta: Meta =
            std::fs::read(dir.join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let mut t = Trusted { dir, root, index: None, index_etag: meta.index_etag, baseline: None, pipelines: None };
        if let Ok(bytes) = std::fs::read(t.dir.join(Pipelines::FILE)) {
            match verify_pipelines(&t.root, &bytes) {
                Ok(p) => t.pipelines = Some((p, bytes)),
                Err(e) => tracing::warn!(error = %e, "persisted pipelines no longer verify; refetching"),
            }
        }
        // Likewise the persisted baseline: its version is the floor.
        if let Ok(bytes) = std::fs::read(t.dir.join("baseline.json")) {
            match verify_baseline(&t.root, &bytes) {
                Ok(b) => t.baseline = Some((b, bytes)),
                Err(e) => tracing::warn!(error = %e, "persisted compliance baseline no longer verifies; refetching"),
            }
        }
        // The persisted index is re-verified against the root (expiry aside): its version is
        // the floor for rollback protection.
        if let Ok(bytes) = std::fs::read(t.dir.join("index.json")) {
            match t.verify_index(&bytes) {
                Ok(index) => t.index = Some((index, bytes)),
                Err(e) => {
                    tracing::warn!(error = %e, "persisted index no longer verifies; refetching");
                    t.index_etag = None;
                }
            }
        }
        Ok(t)
    }

    pub fn index_keys(&self) -> Result<RoleKeys, RegistryError> {
        role_keys(&self.root, &self.root.roles.index, "index")
    }

    fn verify_index(&self, bytes: &[u8]) -> Result<Index, RegistryError> {
        let env = Envelope::parse(bytes)?;
        let keys = self.index_keys()?;
        let payload = env.verify(INDEX_TYPE, &keys.keys, keys.threshold, "index")?;
        let index: Index =
            serde_json::from_slice(&payload).map_err(|e| RegistryError::Invalid(format!("index payload: {e}")))?;
        if index.kind != "index" {
            return Err(RegistryError::Invalid(format!("index _type is '{}'", index.kind)));
        }
        parse_time(&index.expires)?;
        Ok(index)
    }

    /// Follows the root rotation chain: `roots/<N+1>.json` must be signed by a threshold of
    /// root keys of version N *and* of version N+1.
    pub async fn update_root(&mut self, fetcher: &Fetcher) -> Result<bool, RegistryError> {
        let mut changed = false;
        for _ in 0..1024 {
            let next = self.root.version + 1;
            let bytes = match fetcher.get_body(&format!("roots/{next}.json"), MAX_ROOT_BYTES).await {
                Ok(b) => b,
                Err(RegistryError::NotFound(_)) => break,
                Err(e) => return Err(e),
            };
            let env = Envelope::parse(&bytes)?;
            let new: Root = serde_json::from_slice(&env.payload_bytes()?)
                .map_err(|e| RegistryError::Invalid(format!("root v{next} payload: {e}")))?;
            if new.version != next {
                return Err(RegistryError::Rollback(format!("roots/{next}.json holds version {}", new.version)));
            }
            let old_keys = role_keys(&self.root, &self.root.roles.root, "root")?;
            env.verify(
                ROOT_TYPE,
                &old_keys.keys,
                old_keys.threshold,
                &format!("root v{next} (by v{} keys)", self.root.version),
            )?;
            let checked = verify_root_self(&bytes)?;
            write_atomic(&self.dir.join("root.json"), &bytes).map_err(|e| RegistryError::Io(e.to_string()))?;
            tracing::info!(version = next, "registry root rotated");
            self.root = checked;
            changed = true;
        }
        Ok(changed)
    }

    /// Fetches and verifies the index; returns the index now trusted. Errors leave the trusted
    /// state as it was.
    pub async fn update_index(&mut self, fetcher: &Fetcher, now: i64) -> Result<Index, RegistryError> {
        let root_expires = parse_time(&self.root.expires)?;
        if root_expires <= now {
            return Err(RegistryError::Expired(format!(
                "root v{} expired at {}",
                self.root.version, self.root.expires
            )));
        }
        let etag = if self.index.is_some() { self.index_etag.as_deref() } else { None };
        let (bytes, new_etag) = match fetcher.get("index.json", MAX_INDEX_BYTES, etag).await? {
            Fetched::NotModified => {
                let Some((index, _)) = &self.index else {
                    return Err(RegistryError::Fetch("index.json: 304 without a trusted index".into()));
                };
                if parse_time(&index.expires)? <= now {
                    return Err(RegistryError::Expired(format!(
                        "index v{} expired at {}",
                        index.version, index.expires
                    )));
                }
                return Ok(index.clone());
            }
            Fetched::Body { bytes, etag } => (bytes, etag),
        };
        let index = self.verify_index(&bytes)?;
        if let Some((old, old_bytes)) = &self.index {
            if index.version < old.version {
                return Err(RegistryError::Rollback(format!(
                    "index version {} is older than the trusted version {}",
                    index.version, old.version
                )));
            }
            if index.version == old.version && bytes != *old_bytes {
                return Err(RegistryError::Rollback(format!(
                    "index version {} was re-signed with different content",
                    index.version
                )));
            }
        }
        if parse_time(&index.expires)? <= now {
            return Err(RegistryError::Expired(format!("index v{} expired at {}", index.version, index.expires)));
        }
        write_atomic(&self.dir.join("index.json"), &bytes).map_err(|e| RegistryError::Io(e.to_string()))?;
        self.index_etag = new_etag;
        let meta = serde_json::to_vec(&Meta { index_etag: self.index_etag.clone() }).unwrap_or_default();
        write_atomic(&self.dir.join("meta.json"), &meta).map_err(|e| RegistryError::Io(e.to_string()))?;
        self.index = Some((index.clone(), bytes));
        Ok(index)
    }

    /// Fetches and verifies the compliance baseline, if the registry publishes one; returns
    /// the baseline now trusted and whether it changed. A forged, rolled-back or expired one
    /// is refused and the trusted one stays.
    pub async fn update_baseline(
        &mut self,
        fetcher: &Fetcher,
        now: i64,
    ) -> Result<(Option<Baseline>, bool), RegistryError> {
        update_doc(&mut self.baseline, &self.root, &self.dir, fetcher, now).await
    }

    /// Fetches and verifies the pipelines, if the registry publishes them; as
    /// [`Trusted::update_baseline`].
    pub async fn update_pipelines(
        &mut self,
        fetcher: &Fetcher,
        now: i64,
    ) -> Result<(Option<Pipelines>, bool), RegistryError> {
        update_doc(&mut self.pipelines, &self.root, &self.dir, fetcher, now).await
    }
}
