//! Model lifecycle: local model sources, and the one way a prepared model goes into service
//! ([`start`], [`activate_prepared`]) for local and registry models alike. Preparation itself
//! (load, golden vectors, plan, warm-up) is the engine's ([`crate::engine::prepare`]). A failure
//! at any step leaves whatever was serving untouched and is recorded as an event.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::events::{Event, LifecycleKind};
use crate::api::InferenceService;
use crate::config::{valid_name, ModelConfig};
use crate::engine::package::{Package, Processing};
use crate::engine::{Prepared, Served};

/// Largest model file the agent reads.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;
/// Largest golden file the agent reads.
pub const MAX_GOLDEN_BYTES: u64 = 64 << 20;

/// A model on local disk: `<dir>/<name>/model.onnx` with an optional `golden.json` and an
/// optional `package.json` (processing steps, their files beside it).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub name: String,
    pub version: String,
    pub onnx: PathBuf,
    pub golden: Option<PathBuf>,
    /// `package.json`: processing steps shipped with the model, when present.
    pub package: Option<PathBuf>,
}

/// Lists the models in local model directories, sorted by name. When two directories hold the
/// same name, the first directory wins.
pub fn scan_local(dirs: &[PathBuf]) -> Vec<ModelSource> {
    let mut found: Vec<ModelSource> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut names: Vec<String> = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            if path.join("model.onnx").is_file() {
                names.extend(e.file_name().into_string().ok());
            } else if path.is_dir() {
                tracing::warn!(dir = %path.display(), "a directory in local_models.dirs without model.onnx: not a model");
            }
        }
        names.sort();
        for name in names {
            if !valid_name(&name) {
                tracing::warn!(dir = %dir.display(), name = %name, "skipping model directory with an invalid name");
                continue;
            }
            if found.iter().any(|m| m.name == name) {
                continue;
            }
            let base = dir.join(&name);
            let golden = base.join("golden.json");
            let package = base.join("package.json");
            found.push(ModelSource {
                package: package.is_file().then_some(package),
                name,
                version: "1".to_owned(),
                onnx: base.join("model.onnx"),
                golden: golden.is_file().then_some(golden),
            });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() as u64 > cap {
        return Err(format!("{} is larger than {cap} bytes", path.display()));
    }
    Ok(buf)
}

/// Largest `pipelines.json` of a local model directory.
pub const MAX_PIPELINES_BYTES: u64 = 1 << 20;

/// The pipelines of the local model directories: each directory's `pipelines.json` (a JSON
/// list of pipeline documents, unsigned like local models), the first directory winning a
/// name. Returns them with the refusals (name or file, reason).
pub fn scan_pipelines(dirs: &[PathBuf]) -> (Vec<crate::api::pipeline::Pipeline>, Vec<(String, String)>) {
    use crate::api::pipeline::{Pipeline, PipelineDoc};
    let (mut found, mut refused): (Vec<Pipeline>, Vec<(String, String)>) = (Vec::new(), Vec::new());
    for dir in dirs {
        let path = dir.join("pipelines.json");
        if !path.is_file() {
            continue;
        }
        let docs = read_capped(&path, MAX_PIPELINES_BYTES).and_then(|b| {
            serde_json::from_slice::<Vec<PipelineDoc>>(&b).map_err(|e| format!("{}: {e}", path.display()))
        });
        let docs = match docs {
            Ok(d) => d,
            Err(e) => {
                refused.push((path.display().to_string(), e));
                continue;
            }
        };
        for doc in docs {
            if found.iter().any(|p| p.name == doc.name) {
                continue;
            }
            match Pipeline::build(&doc, "1") {
                Ok(p) => found.push(p),
                Err(e) => refused.push((doc.name.clone(), e)),
            }
        }
    }
    (found, refused)
}

/// Largest `package.json`.
pub const MAX_PACKAGE_DECL_BYTES: u64 = 64 << 20;

/// A local model prepared, with its package when it has one. Blocking: loads, checks the
/// golden vectors (the model's, then the package's).
pub fn prepare_local(src: &ModelSource, cfg: &ModelConfig) -> Result<(Prepared, Option<Package>), String> {
    let onnx = read_capped(&src.onnx, MAX_MODEL_BYTES)?;
    let golden = match &src.golden {
        Some(p) => Some(read_capped(p, MAX_GOLDEN_BYTES)?),
        None => None,
    };
    let mut prepared = crate::engine::prepare(&onnx, golden.as_deref(), &cfg.prepare_options(onnx.len()))
        .map_err(|e| e.to_string())?;
    let Some(path) = &src.package else { return Ok((prepared, None)) };
    let decl: Processing = serde_json::from_slice(&read_capped(path, MAX_PACKAGE_DECL_BYTES)?)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files = std::collections::BTreeMap::new();
    for name in crate::engine::package::needed_files(&decl) {
        if !valid_name(name) {
            return Err(format!(
                "{}: file name '{}' must be 1-128 of [A-Za-z0-9._-]",
                path.display(),
                name.escape_debug()
            ));
        }
        let bytes = read_capped(&dir.join(name), crate::engine::package::MAX_PACKAGE_FILE_BYTES)?;
        // A local package may still pin its files' digests.
        if let Some(want) = decl.files.get(name) {
            let got = outpost_proto::registry::sha256_hex(&bytes);
            if got != want.sha256 {
                return Err(format!("package file {name} has sha256 {got}; package.json says {}", want.sha256));
            }
        }
        files.insert(name.to_owned(), bytes);
    }
    let (package, detail) = crate::engine::package::prepare(&decl, &files, &prepared.model)?;
    prepared.detail = format!("{}; {detail}", prepared.detail);
    Ok((prepared, Some(package)))
}

/// Records a lifecycle event and waits for the event sink (the audit log among them) to take
/// it: an activation is not reported done before its record is.
pub async fn record(service: &InferenceService, model: &str, version: &str, kind: LifecycleKind, detail: String) {
    let event = Event::Lifecycle { model: model.to_owned(), version: version.to_owned(), kind, detail };
    let _ = service.events.record(event).await;
}

/// Starts the worker threads of a prepared model: a `Served` ready to take traffic, not yet
/// in the serving table.
pub fn start(name: &str, version: &str, prepared: Prepared, cfg: &ModelConfig) -> Served {
    Served::start(name, version, Arc::new(prepared.model), &cfg.serve_options(prepared.bytes))
}

/// Makes a started model the default version of its name (an atomic switch: requests in
/// flight finish on the version they started on) and records the activation.
pub async fn activate_prepared(service: &InferenceService, served: Served, detail: String) {
    let (name, version) = (served.name.clone(), served.version.clone());
    service.repository.activate(served);
    record(service, &name, &version, LifecycleKind::Activated, detail).await;
}

/// Loads, checks and activates one local model. A refusal is recorded and returned.
pub async fn install_local(service: &InferenceService, src: &ModelSource, cfg: &ModelConfig) -> Result<(), String> {
    service.repository.set_loading(&src.name, &src.version);
    let (src_clone, cfg_clone) = (src.clone(), cfg.clone());
    let result = tokio::task::spawn_blocking(move || prepare_local(&src_clone, &cfg_clone))
        .await
        .unwrap_or_else(|e| Err(format!("loader task failed: {e}")));
    match result {
        Ok((prepared, package)) => {
            let detail = prepared.detail.clone();
            let mut served = start(&src.name, &src.version, prepared, cfg);
            served.package = package.map(Arc::new);
            activate_prepared(service, served, detail).await;
            Ok(())
        }
        Err(reason) => {
            service.repository.set_failed(&src.name, &src.version, &reason);
            record(service, &src.name, &src.version, LifecycleKind::Refused, reason.clone()).await;
            Err(reason)
        }
    }
}

/// Takes a model out of service.
pub async fn unload(service: &InferenceService, name: &str, why: &str) {
    for old in service.repository.remove(name) {
        record(service, name, &old.version, LifecycleKind::Unloaded, why.to_owned()).await;
    }
}

/// Keeps the local model directories and the serving table in step (at start and on reload).
#[derive(Default)]
pub struct LocalModels {
    /// Model name → (file size, modification time) of the model.onnx that was loaded.
    loaded: std::sync::Mutex<std::collections::HashMap<String, (u64, Option<std::time::SystemTime>)>>,
    /// Models unloaded through the repository API: not served until loaded again.
    unloaded: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn fingerprint(path: &Path) -> (u64, Option<std::time::SystemTime>) {
    std::fs::metadata(path).map(|m| (m.len(), m.modified().ok())).unwrap_or((0, None))
}

/// A local model's fingerprint: its model file's, and for a package every file beside it
/// (the declaration, a tokenizer, a labels file), so that a changed step file reloads it.
fn source_fingerprint(src: &ModelSource) -> (u64, Option<std::time::SystemTime>) {
    let (mut len, mut at) = fingerprint(&src.onnx);
    let Some(dir) = src.package.as_ref().and_then(|p| p.parent()) else { return (len, at) };
    let Ok(entries) = std::fs::read_dir(dir) else { return (len, at) };
    for (i, e) in entries.flatten().take(256).enumerate() {
        let (l, t) = fingerprint(&e.path());
        len = len.wrapping_add(l.rotate_left(i as u32 % 64 + 1));
        at = at.max(t);
    }
    (len, at)
}

impl LocalModels {
    /// Loads new and changed models, unloads the ones gone or disabled. Returns refusals.
    /// Settings for a model that is neither local nor can come from a registry are warned of.
    pub async fn reconcile(&self, service: &InferenceService, config: &crate::config::Config) -> Vec<(String, String)> {
        let local = scan_local(&config.local_models);
        if config.registry.is_none() {
            for name in config.models.keys().filter(|n| !local.iter().any(|s| &s.name == *n)) {
                tracing::warn!(model = %name, "[models.{name}] names no local model and there is no [registry]: ignored");
            }
        }
        let (pipelines, mut refused) = scan_pipelines(&config.local_models);
        for (name, reason) in &refused {
            tracing::warn!(pipeline = %name, %reason, "local pipeline refused");
        }
        service.pipelines.set("local", pipelines);
        let unloaded = self.unloaded.lock().map(|u| u.clone()).unwrap_or_default();
        let sources: Vec<ModelSource> = scan_local(&config.local_models)
            .into_iter()
            .filter(|s| config.model(&s.name).enabled && !unloaded.contains(&s.name))
            .collect();
        let previous: Vec<String> = self.loaded.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        for name in previous {
            if !sources.iter().any(|s| s.name == name) {
                unload(service, &name, "removed from configuration").await;
                if let Ok(mut m) = self.loaded.lock() {
                    m.remove(&name);
                }
            }
        }
        for src in sources {
            let fp = source_fingerprint(&src);
            let unchanged = self.loaded.lock().map(|m| m.get(&src.name) == Some(&fp)).unwrap_or(false);
            if unchanged {
                continue;
            }
            if let Err(reason) = install_local(service, &src, &config.model(&src.name)).await {
                refused.push((src.name.clone(), reason));
            }
            // Remembered even when refused, so an unchanged bad file is not retried on every reload.
            if let Ok(mut m) = self.loaded.lock() {
                m.insert(src.name.clone(), fp);
            }
        }
        refused
    }
}

impl LocalModels {
    /// Whether `name` is a model of the local directories.
    pub fn knows(&self, config: &crate::config::Config, name: &str) -> bool {
        scan_local(&config.local_models).iter().any(|s| s.name == name)
    }

    /// Stops serving a local model until [`LocalModels::load`].
    pub async fn unload(&self, service: &InferenceService, name: &str) {
        if let Ok(mut u) = self.unloaded.lock() {
            u.insert(name.to_owned());
        }
        if let Ok(mut m) = self.loaded.lock() {
            m.remove(name);
        }
        unload(service, name, "unloaded through the repository API").await;
    }

    /// Serves a local model again (loading it from disk).
    pub async fn load(
        &self,
        service: &InferenceService,
        config: &crate::config::Config,
        name: &str,
    ) -> Result<(), String> {
        if let Ok(mut u) = self.unloaded.lock() {
            u.remove(name);
        }
        if let Ok(mut m) = self.loaded.lock() {
            m.remove(name);
        }
        let src = scan_local(&config.local_models)
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("unknown model '{name}'"))?;
        let result = install_local(service, &src, &config.model(name)).await;
        if let Ok(mut m) = self.loaded.lock() {
            m.insert(name.to_owned(), source_fingerprint(&src));
        }
        result
    }
}
