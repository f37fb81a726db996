//! Model lifecycle: find model sources, load them off the request path, reproduce their golden
//! vectors, warm up, then activate atomically. A failure at any step leaves whatever was
//! serving untouched and is reported to the event sink.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::api::events::{Event, LifecycleKind};
use crate::api::InferenceService;
use crate::config::{valid_name, ModelConfig};
use crate::engine::{Golden, LoadError, LoadedModel, Served};

/// Largest model file the agent reads.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;
/// Largest golden file the agent reads.
pub const MAX_GOLDEN_BYTES: u64 = 64 << 20;

/// A model on local disk: `<dir>/<name>/model.onnx` with an optional `golden.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub name: String,
    pub version: String,
    pub onnx: PathBuf,
    pub golden: Option<PathBuf>,
}

/// Lists the models in local model directories, sorted by name. When two directories hold the
/// same name, the first directory wins.
pub fn scan_local(dirs: &[PathBuf]) -> Vec<ModelSource> {
    let mut found: Vec<ModelSource> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("model.onnx").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
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
            found.push(ModelSource {
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

/// What a successful preparation measured.
#[derive(Debug)]
pub struct Prepared {
    pub model: LoadedModel,
    pub detail: String,
}

/// Loads a model and checks its golden vectors. Blocking: run on a blocking thread.
pub fn prepare(onnx: &[u8], golden: Option<&[u8]>, cfg: &ModelConfig) -> Result<Prepared, LoadError> {
    let started = Instant::now();
    let model = LoadedModel::load(onnx, cfg.plan_cache)?;
    let detail = match golden {
        Some(bytes) => {
            let golden = Golden::parse(bytes).map_err(LoadError::Golden)?;
            let report = golden.check(&model).map_err(LoadError::Golden)?;
            format!(
                "golden vectors reproduced: {} cases, max abs error {:.2e} (tolerance {:e}); loaded in {} ms",
                report.cases,
                report.max_abs_error,
                golden.tolerance.atol,
                started.elapsed().as_millis()
            )
        }
        None => {
            // Warm the batch-1 plan so the first request does not pay for optimization.
            let key = vec![1; model.symbol_count()];
            model.prepare(&key).map_err(|e| LoadError::Parse(e.to_string()))?;
            format!("no golden vectors; loaded in {} ms", started.elapsed().as_millis())
        }
    };
    Ok(Prepared { model, detail })
}

/// Loads, checks and activates one local model. A refusal is recorded and returned.
pub async fn install_local(service: &InferenceService, src: &ModelSource, cfg: &ModelConfig) -> Result<(), String> {
    service.repository.set_loading(&src.name, &src.version);
    let onnx_path = src.onnx.clone();
    let golden_path = src.golden.clone();
    let cfg_clone = cfg.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Prepared, String> {
        let onnx = read_capped(&onnx_path, MAX_MODEL_BYTES)?;
        let golden = match &golden_path {
            Some(p) => Some(read_capped(p, MAX_GOLDEN_BYTES)?),
            None => None,
        };
        prepare(&onnx, golden.as_deref(), &cfg_clone).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("loader task failed: {e}")));
    match result {
        Ok(prepared) => {
            let served = Served::start(
                &src.name,
                &src.version,
                Arc::new(prepared.model),
                cfg.instances,
                cfg.max_queue,
                cfg.cache_bytes,
            );
            service.repository.activate(served);
            let _ = service
                .events
                .record(Event::Lifecycle {
                    model: src.name.clone(),
                    version: src.version.clone(),
                    kind: LifecycleKind::Activated,
                    detail: prepared.detail,
                })
                .await;
            Ok(())
        }
        Err(reason) => {
            service.repository.set_failed(&src.name, &src.version, &reason);
            let _ = service
                .events
                .record(Event::Lifecycle {
                    model: src.name.clone(),
                    version: src.version.clone(),
                    kind: LifecycleKind::Refused,
                    detail: reason.clone(),
                })
                .await;
            Err(reason)
        }
    }
}

/// Takes a model out of service.
pub async fn unload(service: &InferenceService, name: &str, why: &str) {
    for old in service.repository.remove(name) {
        let _ = service
            .events
            .record(Event::Lifecycle {
                model: name.to_owned(),
                version: old.version.clone(),
                kind: LifecycleKind::Unloaded,
                detail: why.to_owned(),
            })
            .await;
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

impl LocalModels {
    /// Loads new and changed models, unloads the ones gone or disabled. Returns refusals.
    pub async fn reconcile(&self, service: &InferenceService, config: &crate::config::Config) -> Vec<(String, String)> {
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
        let mut refused = Vec::new();
        for src in sources {
            let fp = fingerprint(&src.onnx);
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
            m.insert(name.to_owned(), fingerprint(&src.onnx));
        }
        result
    }
}
