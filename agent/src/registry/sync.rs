//! The registry client's loop and the model lifecycle of registry models.
//!
//! At start it serves what the store holds (re-verified) before touching the network. Each poll
//! updates the root chain, verifies the index and brings every model to its version policy. An
//! install is download (resumable, capped) → verify digests and signatures → decompress →
//! fsync → load → golden vectors → warm-up → persist → activate (an atomic switch, or a canary
//! when the model has one). Any failure leaves what serves untouched. Canary verdicts, manual
//! rollbacks, load/unload and air-gap bundle imports arrive as commands on the same task, so
//! the store state has one writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::client::{FetchOptions, Fetcher};
use super::dsse::Envelope;
use super::trust::Trusted;
use super::versions::{self, Intake, ServingChange};
use super::{
    check_hex_digest, now, sha256_hex, IndexEntry, RegistryError, SemVer, Statement, MANIFEST_TYPE, MAX_MANIFEST_BYTES,
    PREDICATE_TYPE, STATEMENT_TYPE,
};
use crate::api::events::LifecycleKind;
use crate::api::{InferenceService, Verdict};
pub use crate::config::RegistryConfig;
use crate::config::{valid_name, Config, ModelConfig, VersionPolicy};
use crate::engine::Served;
use crate::lifecycle;
use crate::locks::RwLockExt;
use crate::store::{InstalledModel, InstalledVersion, Rejection, Store, StoreState};
use crate::verdicts::SiteVerdict;

/// What one poll (or import) did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PollReport {
    pub index_version: u64,
    /// Versions that became the default.
    pub installed: Vec<(String, String)>,
    /// Versions that started as canaries.
    pub canaries: Vec<(String, String)>,
    pub failed: Vec<(String, String)>,
    /// Installs put off by a network or disk error (a cut download): retried soon.
    pub deferred: Vec<(String, String)>,
}

type Reply<T> = oneshot::Sender<Result<T, RegistryError>>;

/// Requests to the running registry task.
pub enum Command {
    PollNow(Reply<PollReport>),
    /// Take back the newest version of a model (its canary, else its default version).
    Rollback {
        model: String,
        reply: Reply<String>,
    },
    /// Stop serving a model until `Load`; `Ok(false)`: not a registry model.
    Unload {
        model: String,
        reply: Reply<bool>,
    },
    Load {
        model: String,
        reply: Reply<bool>,
    },
    /// New `[registry]` settings (a reload): a new client and trusted root, the running ones
    /// kept when they cannot be built.
    Reconfigure {
        cfg: RegistryConfig,
        reply: Reply<()>,
    },
    /// Install from an air-gap bundle (a tar of registry files).
    Import {
        bundle: PathBuf,
        reply: Reply<PollReport>,
    },
}

pub struct RegistrySync {
    cfg: RegistryConfig,
    fetcher: Arc<Fetcher>,
    trusted: Trusted,
    store: Store,
    state: StoreState,
    state_dir: PathBuf,
    service: InferenceService,
    config: Arc<RwLock<Arc<Config>>>,
    /// Versions the site's other box rejected (verified), when verdicts are shared.
    peer_verdicts: Option<mpsc::UnboundedReceiver<SiteVerdict>>,
}

/// How a rejection that came from the site's other box starts (it is not shared again).
const PEER_REASON: &str = "rejected by the site's other box";

/// The next peer verdict; never resolves without a channel.
async fn recv_peer(rx: &mut Option<mpsc::UnboundedReceiver<SiteVerdict>>) -> Option<SiteVerdict> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl RegistrySync {
    /// Applies the verdicts the site's other box shares.
    pub fn with_peer_verdicts(mut self, rx: mpsc::UnboundedReceiver<SiteVerdict>) -> Self {
        self.peer_verdicts = Some(rx);
        self
    }

    pub fn open(
        cfg: RegistryConfig,
        state_dir: &Path,
        service: InferenceService,
        config: Arc<RwLock<Arc<Config>>>,
    ) -> Result<RegistrySync, RegistryError> {
        let mut opts = FetchOptions::from(&cfg);
        opts.residency = service.privacy.as_ref().and_then(|p| p.guard.clone());
        let fetcher = Arc::new(Fetcher::new(&cfg.url, &opts)?);
        let trusted = Trusted::load(state_dir, &cfg.trusted_root)?;
        let store = Store::open(state_dir).map_err(|e| RegistryError::Io(format!("model store: {e}")))?;
        let key_file = config.read_locked().store_key_file.clone();
        let key = match key_file {
            // A missing key is created only for an empty store: stored models would then be
            // unreadable, and a silent new key would hide that.
            Some(path) => {
                Some(crate::store::crypt::StoreKey::load_or_create(&path, !store.has_models()).map_err(|e| {
                    let hint = if path.exists() {
                        String::new()
                    } else {
                        format!(
                            " (the store holds models: restore the key file, or delete {} to download them again)",
                            state_dir.join("store").join("models").display()
                        )
                    };
                    RegistryError::Io(format!("{e}{hint}"))
                })?)
            }
            None => None,
        };
        let store = store.with_key(key);
        let state = store.load_state()?;
        Ok(RegistrySync {
            cfg,
            fetcher,
            trusted,
            store,
            state,
            state_dir: state_dir.to_owned(),
            service,
            config,
            peer_verdicts: None,
        })
    }

    /// Swaps in new `[registry]` settings; on error nothing changes.
    fn reconfigure(&mut self, cfg: RegistryConfig) -> Result<(), RegistryError> {
        let mut opts = FetchOptions::from(&cfg);
        opts.residency = self.service.privacy.as_ref().and_then(|p| p.guard.clone());
        let fetcher = Arc::new(Fetcher::new(&cfg.url, &opts)?);
        if cfg.trusted_root != self.cfg.trusted_root {
            self.trusted = Trusted::load(&self.state_dir, &cfg.trusted_root)?;
        }
        tracing::info!(registry = %cfg.url, channel = %cfg.channel, "registry settings reloaded");
        self.fetcher = fetcher;
        self.cfg = cfg;
        Ok(())
    }

    fn model_config(&self, name: &str) -> ModelConfig {
        self.config.read_locked().model(name)
    }

    fn save(&self) {
        if let Err(e) = self.store.save_state(&self.state) {
            tracing::error!(error = %e, "cannot persist store state");
        }
    }

    fn reject(&mut self, name: &str, v: &InstalledVersion, reason: &str) {
        self.state.rejected.insert(
            v.manifest_sha256.clone(),
            Rejection { name: name.to_owned(), version: v.version.clone(), reason: reason.to_owned(), at: now() },
        );
    }

    // ---------------------------------------------------------------------------------------
    // Serving from the store
    // ---------------------------------------------------------------------------------------

    /// Serves every installed model from the store, re-hashing each file first. A tampered
    /// or unloadable default version falls back to the previous one; the bad one is dropped so
    /// the next poll installs it again from the registry.
    pub async fn serve_installed(&mut self) {
        let names: Vec<String> = self.state.installed.keys().cloned().collect();
        for name in names {
            self.serve_model_from_store(&name).await;
        }
        // The pipelines last accepted, as persisted (verified again by `Trusted::load`).
        if let Some((p, _)) = self.trusted.pipelines.clone() {
            self.apply_pipelines(&p);
        }
        self.save();
    }

    /// Serves the registry's pipelines; one that does not check out is refused by name (the
    /// others serve). Returns the refusals.
    fn apply_pipelines(&self, p: &outpost_proto::registry::pipeline::Pipelines) -> Vec<(String, String)> {
        let mut built = Vec::new();
        let mut refused = Vec::new();
        for doc in &p.pipelines {
            match crate::api::pipeline::Pipeline::build(doc, &p.version.to_string()) {
                Ok(pipe) => built.push(pipe),
                Err(e) => {
                    tracing::warn!(pipeline = %doc.name, error = %e, "pipeline refused");
                    refused.push((doc.name.clone(), e));
                }
            }
        }
        tracing::info!(version = p.version, pipelines = built.len(), "registry pipelines in force");
        self.service.pipelines.set("registry", built);
        refused
    }

    async fn serve_model_from_store(&mut self, name: &str) {
        let Some(entry) = self.state.installed.get(name).cloned() else { return };
        let cfg = self.model_config(name);
        if !cfg.enabled || self.state.unloaded.contains(name) {
            return;
        }
        let mut current = None;
        for v in std::iter::once(entry.current.clone()).chain(entry.previous.clone()) {
            match self.served_from_store(name, &v).await {
                Ok(served) => {
                    self.service.repository.activate(served);
                    current = Some(v);
                    break;
                }
                Err(e) => self.refused_at_start(name, &v, &e).await,
            }
        }
        let Some(current) = current else {
            self.state.installed.remove(name);
            return;
        };
        let mut model = InstalledModel::new(current.clone());
        if current != entry.current {
            tracing::warn!(model = %name, version = %current.version, "serving the previous version");
        } else {
            model.previous = entry.previous.clone();
        }
        for v in &entry.also {
            match self.served_from_store(name, v).await {
                Ok(served) => {
                    self.service.repository.add_version(served);
                    model.also.push(v.clone());
                }
                Err(e) => self.refused_at_start(name, v, &e).await,
            }
        }
        if let (Some(c), Some(canary)) = (&entry.candidate, cfg.canary.clone()) {
            match self.served_from_store(name, c).await {
                Ok(served) => {
                    self.service.repository.add_version(served);
                    self.service.repository.start_canary(name, &c.version, canary);
                    model.candidate = Some(c.clone());
                    lifecycle::record(
                        &self.service,
                        name,
                        &c.version,
                        LifecycleKind::CanaryStarted,
                        "canary resumed at start".into(),
                    )
                    .await;
                }
                Err(e) => self.refused_at_start(name, c, &e).await,
            }
        }
        self.state.installed.insert(name.to_owned(), model);
    }

    async fn refused_at_start(&mut self, name: &str, v: &InstalledVersion, e: &RegistryError) {
        tracing::error!(model = %name, version = %v.version, error = %e, "installed version refused at start");
        self.service.repository.set_failed(name, &v.version, &e.to_string());
        lifecycle::record(&self.service, name, &v.version, LifecycleKind::Refused, e.to_string()).await;
        self.state.pending_errors.insert(
            name.to_owned(),
            Rejection { name: name.to_owned(), version: v.version.clone(), reason: e.to_string(), at: now() },
        );
        let _ = std::fs::remove_file(self.store.model_path(&v.model_sha256));
    }

    /// Loads an installed version from the store (re-verified) into a ready `Served`.
    async fn served_from_store(&self, name: &str, v: &InstalledVersion) -> Result<Served, RegistryError> {
        let manifest = self.store.read_manifest(&v.manifest_sha256)?;
        let stmt = self.verify_manifest(name, &v.version, &manifest)?;
        let onnx = self.store.read_model(&v.model_sha256)?;
        if stmt.model_sha256()? != v.model_sha256 {
            return Err(RegistryError::Digest("stored model does not belong to its manifest".into()));
        }
        self.prepare(name, &stmt, onnx).await
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
        if let Some(decl) = &p.processing {
            crate::engine::package::check_files(decl).map_err(RegistryError::Invalid)?;
        }
        if let Some(min) = &p.min_agent_version {
            let ours = SemVer::parse(env!("CARGO_PKG_VERSION"));
            match (SemVer::parse(min), ours) {
                (Some(min), Some(ours)) if ours >= min => {}
                _ => return Err(RegistryError::Refused(format!("needs agent version {min} or newer"))),
            }
        }
        Ok(stmt)
    }

    /// Load, golden vectors, warm-up (the golden cases run every plan they need), worker
    /// threads: a `Served` ready to take traffic. Off the request path.
    async fn prepare(&self, name: &str, stmt: &Statement, onnx: Vec<u8>) -> Result<Served, RegistryError> {
        let golden = serde_json::to_vec(&stmt.predicate.golden).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let cfg = self.model_config(name);
        let cfg2 = cfg.clone();
        // The package's files, from the store (re-hashed on the way in).
        let decl = stmt.predicate.processing.clone();
        let mut files = std::collections::BTreeMap::new();
        for (file, f) in decl.iter().flat_map(|d| d.files.iter()) {
            files.insert(file.clone(), self.store.read_file(&f.sha256)?);
        }
        let (mut prepared, package) = tokio::task::spawn_blocking(move || {
            let prepared = crate::engine::prepare(&onnx, Some(&golden), &cfg2.prepare_options(onnx.len()))
                .map_err(|e| RegistryError::Refused(e.to_string()))?;
            match &decl {
                None => Ok((prepared, None)),
                Some(decl) => {
                    let (package, detail) = crate::engine::package::prepare(decl, &files, &prepared.model)
                        .map_err(|e| RegistryError::Refused(format!("package refused: {e}")))?;
                    let mut prepared = prepared;
                    prepared.detail = format!("{}; {detail}", prepared.detail);
                    Ok((prepared, Some(package)))
                }
            }
        })
        .await
        .map_err(|e| RegistryError::Refused(format!("loader task failed: {e}")))??;
        crate::failpoint::hit("mid-activation");
        let version = stmt.predicate.version.clone();
        let detail = std::mem::take(&mut prepared.detail);
        lifecycle::record(&self.service, name, &version, LifecycleKind::Verified, detail).await;
        let mut served = lifecycle::start(name, &version, prepared, &cfg);
        // What the signed manifest allows; the configuration's `may_leave_site = false` is
        // applied live by the router.
        served.may_leave_site = stmt.predicate.residency.may_leave_site;
        served.package = package.map(Arc::new);
        Ok(served)
    }

    // ---------------------------------------------------------------------------------------
    // Polling
    // ---------------------------------------------------------------------------------------

    /// One poll of the registry (and of the import spool directory).
    pub async fn poll_once(&mut self) -> Result<PollReport, RegistryError> {
        self.import_spool().await;
        let fetcher = self.fetcher.clone();
        let result = self.sync_from(&fetcher).await;
        self.service.metrics.set_section(
            "registry",
            serde_json::json!({
                "url": fetcher.url(),
                "channel": self.cfg.channel,
                "last_poll_at": now(),
                "result": match &result {
                    Ok(r) if r.failed.is_empty() && r.deferred.is_empty() => "ok".to_owned(),
                    Ok(r) => format!("{} refused, {} deferred", r.failed.len(), r.deferred.len()),
                    Err(_) => "failed".to_owned(),
                },
                "index_version": result.as_ref().ok().map(|r| r.index_version),
                "error": result.as_ref().err().map(ToString::to_string)
                    .or_else(|| result.as_ref().ok().and_then(|r| r.failed.first().or(r.deferred.first())).map(|(m, e)| format!("{m}: {e}"))),
            }),
        );
        match &result {
            Ok(_) => {
                self.state.registry_error = None;
                self.service
                    .metrics
                    .set_gauge("registry_last_success_timestamp_seconds", outpost_proto::registry::now() as f64);
            }
            Err(e) => {
                tracing::warn!(registry = fetcher.url(), error = %e, "registry poll failed; serving what is installed");
                self.state.registry_error = Some(e.to_string());
            }
        }
        self.save();
        result
    }

    async fn sync_from(&mut self, fetcher: &Fetcher) -> Result<PollReport, RegistryError> {
        self.trusted.update_root(fetcher).await?;
        let index = self.trusted.update_index(fetcher, now()).await?;
        let mut report = PollReport { index_version: index.version, ..Default::default() };
        // The compliance baseline, when the registry publishes one. A refused one (forged,
        // rolled back, expired) leaves the trusted one in force.
        let mut new_baseline = None;
        match self.trusted.update_baseline(fetcher, now()).await {
            Ok((Some(b), true)) => {
                tracing::info!(baseline = %b.name, version = b.version, "compliance baseline accepted");
                self.service.metrics.set_alarm("baseline_refused", None);
                new_baseline = Some(b);
            }
            Ok(_) => self.service.metrics.set_alarm("baseline_refused", None),
            Err(e) => {
                tracing::warn!(error = %e, "compliance baseline refused; the trusted one stays in force");
                self.service.metrics.set_alarm("baseline_refused", Some(e.to_string()));
                report.failed.push(("baseline.json".into(), e.to_string()));
            }
        }
        // Pipelines, when the registry publishes them; refused ones leave the trusted ones.
        match self.trusted.update_pipelines(fetcher, now()).await {
            Ok((Some(p), true)) => report.failed.extend(self.apply_pipelines(&p)),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "pipelines refused; the trusted ones stay in force");
                report.failed.push(("pipelines.json".into(), e.to_string()));
            }
        }
        for (name, entries) in &index.models {
            if !valid_name(name) {
                let msg = format!("index names an invalid model '{}': refused", name.escape_debug());
                tracing::warn!("{msg}");
                report.failed.push((name.clone(), msg));
                continue;
            }
            let cfg = self.model_config(name);
            if !cfg.enabled || self.state.unloaded.contains(name) {
                continue;
            }
            let wanted: Vec<IndexEntry> = match &cfg.version_policy {
                VersionPolicy::Latest => self.pick(entries, None).into_iter().collect(),
                VersionPolicy::Pinned(list) => list.iter().filter_map(|v| self.pick(entries, Some(v))).collect(),
            };
            for entry in wanted {
                if self.is_installed(name, &entry) {
                    continue;
                }
                match self.install(fetcher, name, &entry, &cfg).await {
                    Ok(as_canary) => {
                        self.state.pending_errors.remove(name);
                        let item = (name.clone(), entry.version.clone());
                        if as_canary {
                            report.canaries.push(item);
                        } else {
                            report.installed.push(item);
                        }
                    }
                    Err(e) if e.is_transient() => {
                        // Network or disk, not the version: no verdict against it. A cut
                        // download resumes where it stopped.
                        tracing::warn!(model = %name, version = %entry.version, error = %e, "install deferred; retried soon, what serves keeps serving");
                        let pending = Rejection {
                            name: name.clone(),
                            version: entry.version.clone(),
                            reason: e.to_string(),
                            at: now(),
                        };
                        self.state.pending_errors.insert(name.clone(), pending);
                        report.deferred.push((name.clone(), e.to_string()));
                    }
                    Err(e) => {
                        tracing::warn!(model = %name, version = %entry.version, error = %e, "install refused; what serves keeps serving");
                        lifecycle::record(&self.service, name, &entry.version, LifecycleKind::Refused, e.to_string())
                            .await;
                        self.service.repository.set_failed(name, &entry.version, &e.to_string());
                        let rejection = Rejection {
                            name: name.clone(),
                            version: entry.version.clone(),
                            reason: e.to_string(),
                            at: now(),
                        };
                        if matches!(e, RegistryError::Refused(_)) {
                            // Deterministic: the same bytes would fail again. Not retried, and
                            // not installed by the site's other box either.
                            self.state.rejected.insert(entry.manifest.sha256.clone(), rejection.clone());
                            if let Some(sv) = &self.service.site_verdicts {
                                sv.publish(name, &entry.version, &entry.manifest.sha256, &e.to_string());
                            }
                        }
                        self.state.pending_errors.insert(name.clone(), rejection);
                        report.failed.push((name.clone(), e.to_string()));
                    }
                }
                self.save();
            }
            if let VersionPolicy::Pinned(list) = &cfg.version_policy {
                self.retire_unpinned(name, list);
            }
        }
        self.store.gc(&self.state);
        // Checked once what this poll installs is in place (the baseline may rule on it).
        if let Some(c) = &self.service.compliance {
            match new_baseline {
                Some(b) => c.set_baseline(b),
                None if !(report.installed.is_empty() && report.canaries.is_empty()) => c.recheck("models"),
                None => {}
            }
        }
        Ok(report)
    }

    fn is_installed(&self, name: &str, entry: &IndexEntry) -> bool {
        self.state.installed.get(name).is_some_and(|m| {
            m.current.manifest_sha256 == entry.manifest.sha256
                || m.candidate.as_ref().is_some_and(|c| c.manifest_sha256 == entry.manifest.sha256)
                || m.also.iter().any(|a| a.manifest_sha256 == entry.manifest.sha256)
        })
    }

    /// The newest version on our channel that was not rejected (or exactly `version`).
    fn pick(&self, entries: &[IndexEntry], version: Option<&str>) -> Option<IndexEntry> {
        entries
            .iter()
            .filter(|e| e.channel == self.cfg.channel)
            .filter(|e| version.is_none_or(|v| e.version == v))
            .filter(|e| !self.state.rejected.contains_key(&e.manifest.sha256))
            .filter_map(|e| SemVer::parse(&e.version).map(|v| (v, e)))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, e)| e.clone())
    }

    /// Pinned policy: versions no longer pinned stop serving; the highest pinned is the default.
    fn retire_unpinned(&mut self, name: &str, pinned: &[String]) {
        let Some(m) = self.state.installed.get_mut(name) else { return };
        let mut all: Vec<InstalledVersion> = std::iter::once(m.current.clone()).chain(m.also.drain(..)).collect();
        let (keep, drop): (Vec<_>, Vec<_>) = all.drain(..).partition(|v| pinned.contains(&v.version));
        for v in &drop {
            self.service.repository.remove_version(name, &v.version);
        }
        let mut keep = keep;
        keep.sort_by(|a, b| crate::api::repository::version_cmp(&a.version, &b.version));
        if let Some(top) = keep.pop() {
            self.service.repository.set_default(name, &top.version);
            m.current = top;
            m.also = keep;
        }
    }

    /// Installs one version; returns whether it started as a canary.
    async fn install(
        &mut self,
        fetcher: &Fetcher,
        name: &str,
        entry: &IndexEntry,
        cfg: &ModelConfig,
    ) -> Result<bool, RegistryError> {
        let (new, served) = self.fetch_and_prepare(fetcher, name, entry).await?;
        crate::failpoint::hit("before-persist");
        let serving_now = self.service.repository.serving(name, None).is_ok();
        let intake = match &cfg.version_policy {
            VersionPolicy::Pinned(_) => Intake::Pinned,
            VersionPolicy::Latest if cfg.canary.is_some() && serving_now => Intake::Canary,
            VersionPolicy::Latest => Intake::Replace,
        };
        let (m, t) = versions::install(self.state.installed.get(name).cloned(), new, intake);
        self.state.installed.insert(name.to_owned(), m);
        self.persist(name, &t);
        let canary = t.serving.iter().any(|c| matches!(c, ServingChange::StartCanary(_)));
        self.apply_serving(name, t.serving, Some(served), cfg).await;
        Ok(canary)
    }

    /// Records a transition's rejected versions and persists the state (before the serving
    /// table changes, so a crash never leaves it serving what the record does not hold).
    fn persist(&mut self, name: &str, t: &versions::Transition) {
        for (v, why) in &t.rejected {
            tracing::info!(model = name, version = %v.version, reason = %why, "version rejected");
            self.reject(name, v, why);
            // Shared with the site's other box (not what came from it).
            if let Some(sv) = self.service.site_verdicts.as_ref().filter(|_| !why.starts_with(PEER_REASON)) {
                sv.publish(name, &v.version, &v.manifest_sha256, why);
            }
        }
        self.save();
        if !t.rejected.is_empty() {
            self.store.gc(&self.state);
        }
    }

    /// Applies a transition's serving-table changes; `prepared` is the new version they name.
    async fn apply_serving(
        &self,
        name: &str,
        changes: Vec<ServingChange>,
        mut prepared: Option<Served>,
        cfg: &ModelConfig,
    ) {
        let repo = &self.service.repository;
        for change in changes {
            match change {
                ServingChange::Activate(version) => {
                    if let Some(served) = prepared.take() {
                        debug_assert_eq!(served.version, version);
                        lifecycle::activate_prepared(&self.service, served, "now the default version".into()).await;
                    }
                }
                ServingChange::Add(_) => {
                    if let Some(served) = prepared.take() {
                        repo.add_version(served);
                    }
                }
                ServingChange::StartCanary(version) => {
                    if let Some(c) = cfg.canary.clone() {
                        let share = c.share;
                        repo.start_canary(name, &version, c);
                        lifecycle::record(
                            &self.service,
                            name,
                            &version,
                            LifecycleKind::CanaryStarted,
                            format!("{:.0}% of traffic", share * 100.0),
                        )
                        .await;
                    }
                }
                ServingChange::Remove(version) => {
                    repo.remove_version(name, &version);
                }
                ServingChange::Restore(_) => {
                    if let Some(served) = prepared.take() {
                        repo.activate(served);
                    }
                }
            }
        }
    }

    async fn fetch_and_prepare(
        &mut self,
        fetcher: &Fetcher,
        name: &str,
        entry: &IndexEntry,
    ) -> Result<(InstalledVersion, Served), RegistryError> {
        check_hex_digest(&entry.manifest.sha256)?;
        if entry.manifest.size > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge(format!("manifest of {} bytes", entry.manifest.size)));
        }
        let rel = format!("manifests/{}.json", entry.manifest.sha256);
        let manifest = fetcher.get_body(&rel, entry.manifest.size).await?;
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
        let partial = self.store.partial_path(&blob.sha256);
        let metrics = self.service.metrics.clone();
        let (model, version) = (name.to_owned(), entry.version.clone());
        let show = move |p: &super::client::Progress, state: &str, error: Option<&str>| {
            metrics.set_section(
                "download",
                serde_json::json!({
                    "model": model, "version": version, "state": state,
                    "received_bytes": p.received, "total_bytes": p.total,
                    "rate_bytes_per_s": p.rate.round(), "eta_seconds": p.eta.map(|d| d.as_secs()),
                    "error": error, "at": now(),
                }),
            );
        };
        let last = std::sync::Mutex::new(None);
        let downloaded = fetcher
            .download(&format!("blobs/sha256/{}", blob.sha256), &partial, blob.size, &|p| {
                show(p, "downloading", None);
                if let Ok(mut l) = last.lock() {
                    *l = Some(p.clone());
                }
            })
            .await;
        let at = last.lock().ok().and_then(|l| l.clone()).unwrap_or(super::client::Progress {
            received: 0,
            total: blob.size,
            rate: 0.0,
            eta: None,
        });
        match &downloaded {
            Ok(()) => show(&at, "done", None),
            Err(e) => show(&at, "interrupted", Some(&e.to_string())),
        }
        downloaded?;
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
        self.fetch_package_files(fetcher, &stmt).await?;
        self.store.put_manifest(&entry.manifest.sha256, &manifest)?;
        let onnx = self.store.read_model(&model_sha)?;
        let served = self.prepare(name, &stmt, onnx).await?;
        let new = InstalledVersion {
            version: entry.version.clone(),
            manifest_sha256: entry.manifest.sha256.clone(),
            model_sha256: model_sha,
            installed_at: now(),
        };
        Ok((new, served))
    }

    /// Downloads the files a package's steps read (each capped at its signed size and checked
    /// against its signed digest) into the store. A file already stored is not fetched again.
    async fn fetch_package_files(&self, fetcher: &Fetcher, stmt: &Statement) -> Result<(), RegistryError> {
        let Some(decl) = &stmt.predicate.processing else { return Ok(()) };
        for (name, f) in &decl.files {
            if self.store.read_file(&f.sha256).is_ok() {
                continue;
            }
            let bytes = fetcher.get_body(&format!("blobs/sha256/{}", f.sha256), f.size).await?;
            let got = sha256_hex(&bytes);
            if got != f.sha256 || bytes.len() as u64 != f.size {
                return Err(RegistryError::Digest(format!(
                    "package file {name} has sha256 {got} ({} bytes); the signed manifest says {} ({} bytes)",
                    bytes.len(),
                    f.sha256,
                    f.size
                )));
            }
            self.store.put_file(&f.sha256, &bytes)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Verdicts and commands
    // ---------------------------------------------------------------------------------------

    /// A version the site's other box rejected: never installed here; taken back if it runs
    /// here as a canary, or as the default version when the previous one is still kept.
    async fn apply_peer_verdict(&mut self, v: SiteVerdict) {
        if self.state.rejected.contains_key(&v.manifest_sha256) {
            return;
        }
        let reason = format!("{PEER_REASON} {}: {}", v.node, v.reason);
        tracing::warn!(model = %v.model, version = %v.version, %reason, "version rejected by the site's other box");
        let rejection =
            Rejection { name: v.model.clone(), version: v.version.clone(), reason: reason.clone(), at: now() };
        self.state.rejected.insert(v.manifest_sha256.clone(), rejection);
        let Some(mut m) = self.state.installed.get(&v.model).cloned() else {
            self.save();
            return;
        };
        let runs_as_canary = m.candidate.as_ref().is_some_and(|c| c.manifest_sha256 == v.manifest_sha256);
        let runs_as_default = m.current.manifest_sha256 == v.manifest_sha256 && m.previous.is_some();
        let t = if runs_as_canary {
            versions::reject_canary(&mut m, &v.version, &reason)
        } else if runs_as_default {
            versions::roll_back(&mut m, &reason)
        } else {
            None
        };
        let Some(t) = t else {
            if m.current.manifest_sha256 == v.manifest_sha256 {
                tracing::warn!(model = %v.model, version = %v.version, "rejected by the site's other box, but no previous version is kept here: it keeps serving");
            }
            self.save();
            return;
        };
        let restored = match t.serving.first() {
            Some(ServingChange::Restore(_)) => match self.served_from_store(&v.model, &m.current).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(model = %v.model, error = %e, "the previous version does not load; the rejected one keeps serving");
                    self.save();
                    return;
                }
            },
            _ => None,
        };
        self.state.installed.insert(v.model.clone(), m);
        self.persist(&v.model, &t);
        self.apply_serving(&v.model, t.serving, restored, &self.model_config(&v.model)).await;
        lifecycle::record(&self.service, &v.model, &v.version, LifecycleKind::RolledBack, reason).await;
        self.store.gc(&self.state);
    }

    /// Persists a canary verdict the serving table has already applied.
    fn apply_verdict(&mut self, verdict: Verdict) {
        let (name, version) = match &verdict {
            Verdict::Promote { model, version, .. } | Verdict::Rollback { model, version, .. } => (model, version),
        };
        let Some(mut m) = self.state.installed.get(name).cloned() else { return };
        // The serving table applied the verdict on the request path already.
        let t = match &verdict {
            Verdict::Promote { detail, .. } => {
                tracing::info!(model = %name, version = %version, %detail, "canary promoted");
                versions::promote(&mut m, version)
            }
            Verdict::Rollback { reason, .. } => {
                tracing::warn!(model = %name, version = %version, %reason, "canary rolled back");
                versions::reject_canary(&mut m, version, &format!("rolled back: {reason}"))
            }
        };
        let Some(t) = t else { return };
        self.state.installed.insert(name.clone(), m);
        self.persist(name, &t);
        self.store.gc(&self.state);
    }

    /// Takes back the newest version: a running canary, else the default version (the
    /// previous one, still in the store, serves again). The version is recorded as rejected.
    async fn rollback(&mut self, name: &str) -> Result<String, RegistryError> {
        let mut m = self
            .state
            .installed
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("no installed registry model '{name}'")))?;
        let reason = "rolled back by an operator";
        let before = m.current.version.clone();
        let t = versions::roll_back(&mut m, reason)
            .ok_or_else(|| RegistryError::NotFound(format!("{name} has no previous version to roll back to")))?;
        // A version restored from the store is loaded (and re-verified) before anything changes.
        let restored = match t.serving.first() {
            Some(ServingChange::Restore(_)) => Some(self.served_from_store(name, &m.current).await?),
            _ => None,
        };
        let (bad, message) = match &restored {
            Some(_) => (before.clone(), format!("{name} rolled back from {before} to {}", m.current.version)),
            None => {
                let cand = t.rejected.first().map(|(v, _)| v.version.clone()).unwrap_or_default();
                (cand.clone(), format!("canary {cand} of {name} rolled back"))
            }
        };
        let detail =
            if restored.is_some() { format!("{reason}; {} serves", m.current.version) } else { reason.to_owned() };
        self.state.installed.insert(name.to_owned(), m);
        self.persist(name, &t);
        self.apply_serving(name, t.serving, restored, &self.model_config(name)).await;
        lifecycle::record(&self.service, name, &bad, LifecycleKind::RolledBack, detail).await;
        self.store.gc(&self.state);
        Ok(message)
    }

    fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("import")
    }

    /// Imports bundles dropped into `<state_dir>/import/` (by `outpost model import`).
    async fn import_spool(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.spool_dir()) else { return };
        let mut bundles: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "tar")).collect();
        bundles.sort();
        for b in bundles {
            let result = self.import(&b).await;
            let (dir, note) = match &result {
                Ok(r) if r.failed.is_empty() => ("done", format!("imported: {:?}\n", r.installed)),
                Ok(r) => ("failed", r.failed.iter().map(|(m, e)| format!("{m}: {e}\n")).collect()),
                Err(e) => ("failed", format!("{e}\n")),
            };
            let dest = self.spool_dir().join(dir);
            let _ = std::fs::create_dir_all(&dest);
            if let Some(file) = b.file_name() {
                let _ = std::fs::rename(&b, dest.join(file));
                let _ = std::fs::write(dest.join(file).with_extension("txt"), note);
            }
        }
    }

    /// Verifies and installs from a bundle exactly as from the registry (same trusted root,
    /// same rollback and expiry rules, same checks of every file).
    pub async fn import(&mut self, bundle: &Path) -> Result<PollReport, RegistryError> {
        let work = self.state_dir.join("import").join(format!(".unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| RegistryError::file(&work, e))?;
        let cap = self.cfg.max_blob_bytes.saturating_mul(8).max(64 << 20);
        let result = async {
            let b = bundle.to_path_buf();
            let w = work.clone();
            tokio::task::spawn_blocking(move || super::bundle::unpack(&b, &w, cap))
                .await
                .map_err(|e| RegistryError::Io(e.to_string()))??;
            let fetcher = Fetcher::new(&format!("file://{}", work.display()), &FetchOptions::default())?;
            self.sync_from(&fetcher).await
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        match &result {
            Ok(r) => tracing::info!(bundle = %bundle.display(), installed = r.installed.len(), "bundle imported"),
            Err(e) => tracing::warn!(bundle = %bundle.display(), error = %e, "bundle refused"),
        }
        self.save();
        result
    }

    async fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::PollNow(reply) => {
                let r = self.poll_once().await;
                let ok = r.is_ok();
                let _ = reply.send(r);
                return ok;
            }
            Command::Rollback { model, reply } => {
                let _ = reply.send(self.rollback(&model).await);
            }
            Command::Reconfigure { cfg, reply } => {
                let result = self.reconfigure(cfg);
                let applied = result.is_ok();
                let _ = reply.send(result);
                if applied {
                    // The new settings take effect now, not at the old interval's end.
                    return self.poll_once().await.is_ok();
                }
            }
            Command::Unload { model, reply } => {
                let known = self.state.installed.contains_key(&model);
                if known {
                    self.state.unloaded.insert(model.clone());
                    self.save();
                    lifecycle::unload(&self.service, &model, "unloaded through the repository API").await;
                }
                let _ = reply.send(Ok(known));
            }
            Command::Load { model, reply } => {
                let known = self.state.installed.contains_key(&model) || self.state.unloaded.contains(&model);
                if known {
                    self.state.unloaded.remove(&model);
                    self.serve_model_from_store(&model).await;
                    self.save();
                }
                let _ = reply.send(Ok(known));
            }
            Command::Import { bundle, reply } => {
                let _ = reply.send(self.import(&bundle).await);
            }
        }
        true
    }

    /// Runs until cancelled: serve installed models, then poll every `poll_interval` (with
    /// ±10 % jitter; backoff from 10 s after failures). `first_done` fires after the first poll.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut verdicts: mpsc::UnboundedReceiver<Verdict>,
        cancel: CancellationToken,
        first_done: oneshot::Sender<()>,
    ) {
        self.serve_installed().await;
        // With a peer box, its verdicts first: a version it rejected is never installed here,
        // even by this first poll (bounded: without a broker the poll goes ahead).
        if let Some(sv) = self.service.site_verdicts.clone() {
            if !sv.wait_synced(Duration::from_secs(10)).await {
                tracing::warn!("the site's verdicts did not arrive within 10 s (no broker?); polling without them");
            }
            while let Some(v) = self.peer_verdicts.as_mut().and_then(|rx| rx.try_recv().ok()) {
                self.apply_peer_verdict(v).await;
            }
        }
        let mut failures = tokio::select! {
            r = self.poll_once() => u32::from(!r.is_ok_and(|r| r.deferred.is_empty())),
            _ = cancel.cancelled() => return,
        };
        let _ = first_done.send(());
        let mut commands_open = true;
        loop {
            let base = self.cfg.poll_interval.as_secs_f64();
            let wait = if failures == 0 { base } else { (5.0 * 2f64.powi(failures.min(10) as i32)).min(base.max(5.0)) };
            let jitter = 1.0 + (jitter_fraction() - 0.5) * 0.2;
            let sleep = tokio::time::sleep(Duration::from_secs_f64((wait * jitter).max(0.1)));
            tokio::select! {
                // Verdicts first: a verdict is queued before the answer that caused it leaves,
                // so any later command sees it persisted.
                biased;
                Some(v) = verdicts.recv() => self.apply_verdict(v),
                Some(v) = recv_peer(&mut self.peer_verdicts) => self.apply_peer_verdict(v).await,
                _ = sleep => {
                    // A deferred install retries on the failure backoff, not the poll interval.
                    let clean = self.poll_once().await.is_ok_and(|r| r.deferred.is_empty());
                    failures = if clean { 0 } else { failures.saturating_add(1) };
                }
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(cmd) => {
                        if !self.handle(cmd).await {
                            failures = failures.saturating_add(1);
                        }
                    }
                    None => commands_open = false,
                },
                _ = cancel.cancelled() => return,
            }
        }
    }
}

fn hash_file(path: &Path) -> std::io::Result<String> {
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

/// Models configured `overflow = "remote_only"` whose installed signed manifest says
/// `may_leave_site = false`: the configuration may only tighten a manifest, so such a
/// configuration is refused. Reads the store only (manifests as stored; their signatures were
/// checked at install and are checked again when loaded).
pub fn residency_conflicts(cfg: &Config) -> Vec<String> {
    let store = Store::open_read_only(&cfg.node.state_dir);
    let Ok(state) = store.load_state() else { return Vec::new() };
    let stays = |v: &InstalledVersion| -> bool {
        let Ok(bytes) = store.read_manifest(&v.manifest_sha256) else { return false };
        let Ok(payload) = Envelope::parse(&bytes).and_then(|e| e.payload_bytes()) else { return false };
        serde_json::from_slice::<Statement>(&payload).is_ok_and(|s| !s.predicate.residency.may_leave_site)
    };
    cfg.models
        .iter()
        .filter(|(_, m)| m.overflow.mode == crate::config::OverflowMode::RemoteOnly)
        .filter(|(name, _)| state.installed.get(*name).is_some_and(|m| m.all().any(stays)))
        .map(|(name, _)| {
            format!(
                "models.{name}.overflow = \"remote_only\": the signed manifest of {name} says may_leave_site = false, \
                 and the configuration can only tighten it"
            )
        })
        .collect()
}
