//! The registry client's loop: serve what the store holds (re-verified) before touching the
//! network, then poll: update the root chain, verify the index, and install every model whose
//! newest version on the configured channel is not the one serving. An install is
//! download (resumable, capped) → verify digests and signatures → decompress → fsync → load →
//! golden vectors → persist → activate. Any failure leaves what serves untouched.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::client::{FetchOptions, Fetcher};
use super::dsse::Envelope;
use super::trust::Trusted;
use super::{
    check_hex_digest, now, sha256_hex, IndexEntry, RegistryError, SemVer, Statement, MANIFEST_TYPE, MAX_MANIFEST_BYTES,
    PREDICATE_TYPE, STATEMENT_TYPE,
};
use crate::api::events::{Event, LifecycleKind};
use crate::api::InferenceService;
use crate::config::{valid_name, Config};
use crate::engine::Served;
use crate::store::{InstalledModel, InstalledVersion, Rejection, Store, StoreState};

/// `[registry]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    pub url: String,
    pub trusted_root: PathBuf,
    pub poll_interval: Duration,
    pub channel: String,
    pub allow_http: bool,
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
    /// Largest compressed blob downloaded.
    pub max_blob_bytes: u64,
    /// Largest model a blob may decompress to.
    pub max_model_bytes: u64,
}

/// What one poll did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PollReport {
    pub index_version: u64,
    pub installed: Vec<(String, String)>,
    pub failed: Vec<(String, String)>,
}

/// Requests to the running registry task.
pub enum Command {
    PollNow(oneshot::Sender<Result<PollReport, RegistryError>>),
}

pub struct RegistrySync {
    cfg: RegistryConfig,
    fetcher: Fetcher,
    trusted: Trusted,
    store: Store,
    state: StoreState,
    service: InferenceService,
    config: Arc<RwLock<Arc<Config>>>,
}

fn lifecycle(service: &InferenceService, model: &str, version: &str, kind: LifecycleKind, detail: String) {
    let events = service.events.clone();
    let event = Event::Lifecycle { model: model.to_owned(), version: version.to_owned(), kind, detail };
    tokio::spawn(async move {
        let _ = events.record(event).await;
    });
}

impl RegistrySync {
    pub fn open(
        cfg: RegistryConfig,
        state_dir: &std::path::Path,
        service: InferenceService,
        config: Arc<RwLock<Arc<Config>>>,
    ) -> Result<RegistrySync, RegistryError> {
        let opts = FetchOptions { allow_http: cfg.allow_http, ca: cfg.ca.clone(), timeout: cfg.timeout };
        let fetcher = Fetcher::new(&cfg.url, &opts)?;
        let trusted = Trusted::load(state_dir, &cfg.trusted_root)?;
        let store = Store::open(state_dir).map_err(|e| RegistryError::Io(format!("model store: {e}")))?;
        let state = store.load_state()?;
        Ok(RegistrySync { cfg, fetcher, trusted, store, state, service, config })
    }

    fn model_config(&self, name: &str) -> crate::config::ModelConfig {
        self.config.read().unwrap_or_else(|p| p.into_inner()).model(name)
    }

    fn save(&self) {
        if let Err(e) = self.store.save_state(&self.state) {
            tracing::error!(error = %e, "cannot persist store state");
        }
    }

    /// Serves every installed model from the store, re-hashing each file first. A tampered
    /// or unloadable current version falls back to the previous one; the bad one is dropped
    /// so the next poll installs it again from the registry.
    pub async fn serve_installed(&mut self) {
        let names: Vec<String> = self.state.installed.keys().cloned().collect();
        for name in names {
            let Some(entry) = self.state.installed.get(&name).cloned() else { continue };
            if !self.model_config(&name).enabled {
                continue;
            }
            let mut served = false;
            for (which, v) in [("current", Some(entry.current.clone())), ("previous", entry.previous.clone())] {
                let Some(v) = v else { continue };
                match self.activate_from_store(&name, &v).await {
                    Ok(()) => {
                        if which == "previous" {
                            // The previous version is now the current one.
                            self.state.installed.insert(name.clone(), InstalledModel { current: v, previous: None });
                        }
                        served = true;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(model = %name, version = %v.version, error = %e, "installed version refused at start");
                        self.service.repository.set_failed(&name, &v.version, &e.to_string());
                        lifecycle(&self.service, &name, &v.version, LifecycleKind::Refused, e.to_string());
                        self.state.pending_errors.insert(
                            name.clone(),
                            Rejection {
                                name: name.clone(),
                                version: v.version.clone(),
                                reason: e.to_string(),
                                at: now(),
                            },
                        );
                        let _ = std::fs::remove_file(self.store.model_path(&v.model_sha256));
                    }
                }
            }
            if !served {
                self.state.installed.remove(&name);
            }
        }
        self.save();
    }

    async fn activate_from_store(&self, name: &str, v: &InstalledVersion) -> Result<(), RegistryError> {
        let manifest = self.store.read_manifest(&v.manifest_sha256)?;
        let stmt = self.verify_manifest(name, &v.version, &manifest)?;
        let onnx = self.store.read_model(&v.model_sha256)?;
        if stmt.model_sha256()? != v.model_sha256 {
            return Err(RegistryError::Digest("stored model does not belong to its manifest".into()));
        }
        self.load_and_activate(name, &stmt, onnx).await
    }

    /// Checks a manifest's signature (index keys) and that it is the one the index names.
    fn verify_manifest(&self, name: &str, version: &str, bytes: &[u8]) -> Result<Statement, RegistryError> {
        let env = Envelope::parse(bytes)?;
        let keys = self.trusted.index_keys()?;
        let payload = env.verify(MANIFEST_TYPE, &keys.keys, keys.threshold, "manifest")?;
        let stmt: Statement =
            serde_json::from_slice(&payload).map_err(|e| RegistryError::Invalid(format!("manifest payload: {e}")))?;
        if stmt.kind != STATEMENT_TYPE || stmt.predicate_type != PREDICATE_TYPE {
            return Err(RegistryError::Invalid("manifest is not an Outpost model statement".into()));
        }
        let p = &stmt.predicate;
        if p.name != name || p.version != version {
            return Err(RegistryError::Digest(format!(
                "manifest is for {}@{}, the index entry is {name}@{version} (mix-and-match)",
                p.name, p.version
            )));
        }
        if p.format != "onnx" || p.blob.encoding != "zstd" {
            return Err(RegistryError::Invalid(format!(
                "unsupported format {} / encoding {}",
                p.format, p.blob.encoding
            )));
        }
        check_hex_digest(&p.blob.sha256)?;
        stmt.model_sha256()?;
        if let Some(min) = &p.min_agent_version {
            let ours = SemVer::parse(env!("CARGO_PKG_VERSION"));
            match (SemVer::parse(min), ours) {
                (Some(min), Some(ours)) if ours >= min => {}
                _ => return Err(RegistryError::Refused(format!("needs agent version {min} or newer"))),
            }
        }
        Ok(stmt)
    }

    async fn load_and_activate(&self, name: &str, stmt: &Statement, onnx: Vec<u8>) -> Result<(), RegistryError> {
        let golden = serde_json::to_vec(&stmt.predicate.golden).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let cfg = self.model_config(name);
        let cfg2 = cfg.clone();
        let prepared = tokio::task::spawn_blocking(move || crate::lifecycle::prepare(&onnx, Some(&golden), &cfg2))
            .await
            .map_err(|e| RegistryError::Refused(format!("loader task failed: {e}")))?
            .map_err(|e| RegistryError::Refused(e.to_string()))?;
        let version = stmt.predicate.version.clone();
        let served = Served::start(name, &version, Arc::new(prepared.model), cfg.instances, cfg.max_queue);
        self.service.repository.activate(served);
        lifecycle(&self.service, name, &version, LifecycleKind::Activated, prepared.detail);
        Ok(())
    }

    /// One poll: root chain, index, installs.
    pub async fn poll_once(&mut self) -> Result<PollReport, RegistryError> {
        let result = self.poll_inner().await;
        match &result {
            Ok(_) => self.state.registry_error = None,
            Err(e) => {
                tracing::warn!(registry = self.fetcher.url(), error = %e, "registry poll failed; serving what is installed");
                self.state.registry_error = Some(e.to_string());
            }
        }
        self.save();
        result
    }

    async fn poll_inner(&mut self) -> Result<PollReport, RegistryError> {
        self.trusted.update_root(&self.fetcher).await?;
        let index = self.trusted.update_index(&self.fetcher, now()).await?;
        let mut report = PollReport { index_version: index.version, ..Default::default() };
        for (name, entries) in &index.models {
            if !valid_name(name) {
                let msg = format!("index names an invalid model '{}': refused", name.escape_debug());
                tracing::warn!("{msg}");
                report.failed.push((name.clone(), msg));
                continue;
            }
            if !self.model_config(name).enabled {
                continue;
            }
            let Some(entry) = self.pick(entries) else { continue };
            let current = self.state.installed.get(name).map(|m| m.current.manifest_sha256.clone());
            if current.as_deref() == Some(entry.manifest.sha256.as_str()) {
                continue;
            }
            match self.install(name, &entry).await {
                Ok(()) => {
                    self.state.pending_errors.remove(name);
                    report.installed.push((name.clone(), entry.version.clone()));
                }
                Err(e) => {
                    tracing::warn!(model = %name, version = %entry.version, error = %e, "install refused; current version keeps serving");
                    lifecycle(&self.service, name, &entry.version, LifecycleKind::Refused, e.to_string());
                    self.service.repository.set_failed(name, &entry.version, &e.to_string());
                    let rejection = Rejection {
                        name: name.clone(),
                        version: entry.version.clone(),
                        reason: e.to_string(),
                        at: now(),
                    };
                    if matches!(e, RegistryError::Refused(_)) {
                        // Deterministic: the same bytes would fail again. Not retried.
                        self.state.rejected.insert(entry.manifest.sha256.clone(), rejection.clone());
                    }
                    self.state.pending_errors.insert(name.clone(), rejection);
                    report.failed.push((name.clone(), e.to_string()));
                }
            }
            self.save();
        }
        self.store.gc(&self.state);
        Ok(report)
    }

    /// The newest version on our channel that was not rejected.
    fn pick(&self, entries: &[IndexEntry]) -> Option<IndexEntry> {
        entries
            .iter()
            .filter(|e| e.channel == self.cfg.channel)
            .filter(|e| !self.state.rejected.contains_key(&e.manifest.sha256))
            .filter_map(|e| SemVer::parse(&e.version).map(|v| (v, e)))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, e)| e.clone())
    }

    async fn install(&mut self, name: &str, entry: &IndexEntry) -> Result<(), RegistryError> {
        check_hex_digest(&entry.manifest.sha256)?;
        if entry.manifest.size > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge(format!("manifest of {} bytes", entry.manifest.size)));
        }
        let rel = format!("manifests/{}.json", entry.manifest.sha256);
        let manifest = self.fetcher.get_body(&rel, entry.manifest.size).await?;
        let got = sha256_hex(&manifest);
        if got != entry.manifest.sha256 || manifest.len() as u64 != entry.manifest.size {
            return Err(RegistryError::Digest(format!(
                "manifest {} has sha256 {got} ({} bytes); the signed index says {} ({} bytes)",
                rel,
                manifest.len(),
                entry.manifest.sha256,
                entry.manifest.size
            )));
        }
        let stmt = self.verify_manifest(name, &entry.version, &manifest)?;
        let blob = stmt.predicate.blob.clone();
        if blob.size > self.cfg.max_blob_bytes {
            return Err(RegistryError::TooLarge(format!(
                "blob of {} bytes exceeds registry.max_blob_bytes = {}",
                blob.size, self.cfg.max_blob_bytes
            )));
        }
        if blob.uncompressed_size > self.cfg.max_model_bytes {
            return Err(RegistryError::TooLarge(format!(
                "model of {} bytes exceeds registry.max_model_bytes = {}",
                blob.uncompressed_size, self.cfg.max_model_bytes
            )));
        }
        let model_sha = stmt.model_sha256()?.to_owned();
        lifecycle(
            &self.service,
            name,
            &entry.version,
            LifecycleKind::Verified,
            "manifest signature and digest verified".into(),
        );
        let partial = self.store.partial_path(&blob.sha256);
        self.fetcher.download(&format!("blobs/sha256/{}", blob.sha256), &partial, blob.size).await?;
        let got = {
            let p = partial.clone();
            tokio::task::spawn_blocking(move || hash_file(&p))
                .await
                .map_err(|e| RegistryError::Io(e.to_string()))?
                .map_err(|e| RegistryError::Io(e.to_string()))?
        };
        if got != blob.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(RegistryError::Digest(format!("blob has sha256 {got}; the manifest says {}", blob.sha256)));
        }
        crate::failpoint::hit("after-verify");
        let store = self.store.clone();
        let (p, sha, cap) = (partial.clone(), model_sha.clone(), blob.uncompressed_size);
        tokio::task::spawn_blocking(move || store.install_model(&p, &sha, cap))
            .await
            .map_err(|e| RegistryError::Io(e.to_string()))?
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&partial);
            })?;
        let _ = std::fs::remove_file(&partial);
        self.store.put_manifest(&entry.manifest.sha256, &manifest)?;
        let onnx = self.store.read_model(&model_sha)?;
        self.load_and_activate(name, &stmt, onnx).await?;
        crate::failpoint::hit("before-persist");
        let new = InstalledVersion {
            version: entry.version.clone(),
            manifest_sha256: entry.manifest.sha256.clone(),
            model_sha256: model_sha,
            installed_at: now(),
        };
        let previous = self.state.installed.get(name).map(|m| m.current.clone());
        self.state.installed.insert(name.to_owned(), InstalledModel { current: new, previous });
        self.save();
        Ok(())
    }

    /// Runs until cancelled: serve installed models, then poll every `poll_interval` (with
    /// ±10 % jitter; exponential backoff after failures). `first_done` fires after the first poll.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
        first_done: oneshot::Sender<()>,
    ) {
        self.serve_installed().await;
        let mut failures = tokio::select! {
            r = self.poll_once() => u32::from(r.is_err()),
            _ = cancel.cancelled() => return,
        };
        let _ = first_done.send(());
        loop {
            let base = self.cfg.poll_interval.as_secs_f64();
            let wait = if failures == 0 { base } else { (5.0 * 2f64.powi(failures.min(10) as i32)).min(base.max(5.0)) };
            let jitter = 1.0 + (jitter_fraction() - 0.5) * 0.2;
            let sleep = tokio::time::sleep(Duration::from_secs_f64((wait * jitter).max(0.1)));
            let ok = tokio::select! {
                _ = sleep => self.poll_once().await.is_ok(),
                cmd = commands.recv() => match cmd {
                    Some(Command::PollNow(reply)) => {
                        let r = self.poll_once().await;
                        let ok = r.is_ok();
                        let _ = reply.send(r);
                        ok
                    }
                    // Nobody can ask any more: keep polling on the timer.
                    None => {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                            _ = cancel.cancelled() => return,
                        }
                        self.poll_once().await.is_ok()
                    }
                },
                _ = cancel.cancelled() => return,
            };
            failures = if ok { 0 } else { failures.saturating_add(1) };
        }
    }
}

fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(super::hex::encode(&h.finalize()))
}

fn jitter_fraction() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}
