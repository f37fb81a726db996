//! Model lifecycle: find model sources, load them off the request path, reproduce their golden
//! vectors, warm up, then activate atomically. A failure at any step leaves whatever was
//! serving untouched and is reported to the event sink.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::events::{Event, LifecycleKind};
use crate::api::InferenceService;
use crate::config::{valid_name, ModelConfig};
use crate::engine::rewrite::{self, Candidate, Variant};
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
    /// Size of the ONNX file (how batched runs are sized: `ModelConfig::serve_options`).
    pub bytes: usize,
}

/// Runs of the first golden case timed per candidate, and the time they may take.
const TIMED_RUNS: usize = 25;
const TIMING_BUDGET: Duration = Duration::from_millis(300);
/// A rewrite must beat the published graph by this factor to replace it.
const REWRITE_MARGIN: f64 = 0.95;
/// A candidate whose first run is this many times slower than the fastest passing plan is
/// rejected without its golden check.
const SLOWER_SKIP: u32 = 3;

/// The median of up to `runs` timed runs of the first golden case (at least 3 when `runs`
/// allows, then as many as fit in the timing budget), after one untimed run that builds the plan.
fn median_run(model: &LoadedModel, golden: &Golden, runs: usize) -> Result<Duration, String> {
    let case = golden.cases.first().ok_or("golden file has no cases")?;
    let inputs = model.validate(case.inputs.clone()).map_err(|e| e.to_string())?;
    model.run(inputs.clone()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut times = Vec::with_capacity(runs);
    while times.len() < runs.max(1) && (times.len() < 3 || started.elapsed() < TIMING_BUDGET) {
        let t = Instant::now();
        model.run(inputs.clone()).map_err(|e| e.to_string())?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

/// Loads a model and checks its golden vectors. For a quantized model, every candidate graph
/// (see [`crate::engine::rewrite`]) is loaded, checked and timed, and the fastest that
/// reproduces the golden vectors is kept; none passing refuses the model. Blocking: run on a
/// blocking thread.
pub fn prepare(onnx: &[u8], golden: Option<&[u8]>, cfg: &ModelConfig) -> Result<Prepared, LoadError> {
    let started = Instant::now();
    let proto = LoadedModel::parse(onnx)?;
    let golden = golden.map(|g| Golden::parse(g).map_err(LoadError::Golden)).transpose()?;
    let (mut model, mut detail) = match &golden {
        Some(golden) if rewrite::is_quantized(&proto) => choose(&proto, golden, cfg, started)?,
        Some(golden) => {
            let model = LoadedModel::load_proto(&proto, Variant::Published, cfg.plan_cache)?;
            let report = golden.check(&model).map_err(LoadError::Golden)?;
            let detail = format!(
                "golden vectors reproduced: {} cases, max abs error {:.2e} (tolerance {:e}); loaded in {} ms",
                report.cases,
                report.max_abs_error,
                golden.tolerance.atol,
                started.elapsed().as_millis()
            );
            (model, detail)
        }
        None => {
            let model = LoadedModel::load_proto(&proto, Variant::Published, cfg.plan_cache)?;
            (model, format!("no golden vectors; loaded in {} ms", started.elapsed().as_millis()))
        }
    };
    if let Some(golden) =
        golden.as_ref().filter(|_| onnx.len() >= crate::engine::model::LARGE_MODEL_BYTES && model.symbol_count() > 0)
    {
        detail.push_str(&consider_symbolic(&model, golden));
    }
    model.allow_non_finite = cfg.allow_non_finite;
    // Batching joins callers' rows in one run: only for models whose rows are independent.
    if let (Some(golden), Some(policy)) = (&golden, &cfg.batch) {
        if policy.max_batch > 1 && model.batch_axis() {
            if let Err(why) = golden.rows_independent(&model) {
                detail.push_str(&format!("; batching off: {why}"));
                model.rows_depend = Some(why);
            }
        }
    }
    warm(&model, cfg, onnx.len())?;
    Ok(Prepared { model, detail, bytes: onnx.len() })
}

/// The symbolic plan is kept when at most this much slower than a concrete one, for a model
/// whose only dynamic dimension is the batch: its concrete plans are few (one per batch size
/// it runs at) and built at load.
const SYMBOLIC_SLACK: f64 = 1.10;

/// As [`SYMBOLIC_SLACK`], for a model with another dynamic dimension (a sequence length):
/// concrete plans would follow the lengths traffic brings, each built while requests wait (a
/// MiniLM plan: about a second of a core) and each holding its own packed copy of the weights
/// (MiniLM: ~45 MB), evicted and rebuilt once more lengths than `plan_cache` are in use. Where
/// the two run about equally fast (MiniLM; BENCHMARKS.md, engine), a narrow margin would let
/// the load-time timing decide by chance from one start to the next.
const SYMBOLIC_SLACK_FREE_DIMS: f64 = 1.5;

/// Whether a symbolic plan timed at `symbolic` is kept over concrete plans timed at `concrete`.
fn keeps_symbolic(symbolic: Duration, concrete: Duration, free_dimension: bool) -> bool {
    let slack = if free_dimension { SYMBOLIC_SLACK_FREE_DIMS } else { SYMBOLIC_SLACK };
    symbolic.as_secs_f64() <= concrete.as_secs_f64() * slack
}

/// Large models: one plan with symbolic dimensions instead of one per batch size and sequence
/// length (each holds its own packed copy of the weights), kept only when it reproduces the
/// golden vectors and runs within 10 % of a concrete plan (50 % with a dynamic dimension besides
/// the batch: [`SYMBOLIC_SLACK_FREE_DIMS`]). tract's symbolic plans are as fast as concrete
/// ones on transformers and several times slower on convolutions.
fn consider_symbolic(model: &LoadedModel, golden: &Golden) -> String {
    let Ok(concrete) = median_run(model, golden, TIMED_RUNS) else { return String::new() };
    match model.set_symbolic(true) {
        Ok(true) => {}
        Ok(false) => return String::new(),
        Err(e) => return format!("; concrete plans per shape ({e})"),
    }
    let verdict = golden.check(model).map_err(|e| format!("golden vectors: {e}")).and_then(|_| {
        let t = median_run(model, golden, TIMED_RUNS)?;
        if keeps_symbolic(t, concrete, model.signature.has_free_dimension()) {
            Ok(t)
        } else {
            Err(format!("{} µs vs {} µs concrete", t.as_micros(), concrete.as_micros()))
        }
    });
    match verdict {
        Ok(t) => {
            tracing::info!(
                symbolic_us = t.as_micros() as u64,
                concrete_us = concrete.as_micros() as u64,
                "one symbolic plan for every shape"
            );
            format!(
                "; one symbolic plan for every shape ({} µs vs {} µs concrete)",
                t.as_micros(),
                concrete.as_micros()
            )
        }
        Err(why) => {
            let _ = model.set_symbolic(false);
            format!("; concrete plans per shape (symbolic plan: {why})")
        }
    }
}

/// Builds the plans traffic will need, before it arrives: batch 1, each preferred batch size,
/// then every other size a batch can run at up to `max_batch` (as the batch sizes in effect
/// round them up), as many as the plan cache keeps. A plan built under traffic holds a core
/// for the build while the requests of that size wait: the first seconds of batched traffic
/// had a p99 twice the later one (BENCHMARKS.md).
fn warm(model: &LoadedModel, cfg: &ModelConfig, bytes: usize) -> Result<(), LoadError> {
    let mut sizes = vec![1];
    if let Some(b) = cfg.batch_policy(bytes).filter(|_| model.batch_axis() && model.symbol_count() == 1) {
        let wanted = std::iter::once(1).chain(b.preferred.iter().copied()).chain(2..=b.max_batch);
        let room = cfg.plan_cache.max(1);
        sizes.clear();
        for n in wanted.map(|n| b.run_rows(n)) {
            if sizes.len() == room {
                break;
            }
            if !sizes.contains(&n) {
                sizes.push(n);
            }
        }
    }
    if model.symbol_count() == 0 {
        return model.prepare(&[]).map_err(|e| LoadError::Parse(e.to_string()));
    }
    if model.symbol_count() == 1 {
        for n in sizes {
            model.prepare(&[n]).map_err(|e| LoadError::Parse(e.to_string()))?;
        }
    }
    Ok(())
}

/// The plan chooser: the fastest candidate that reproduces the golden vectors.
fn choose(
    proto: &tract_onnx::pb::ModelProto,
    golden: &Golden,
    cfg: &ModelConfig,
    started: Instant,
) -> Result<(LoadedModel, String), LoadError> {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut best: Option<(LoadedModel, Duration, crate::engine::GoldenReport)> = None;
    let mut first_error: Option<LoadError> = None;
    // Rewrites first, the published graph last: a candidate whose first run is far slower than
    // the fastest passing one is not worth its golden check (tract's integer kernels can be
    // 25x slower than the float rewrite).
    let mut variants: Vec<(Variant, Option<tract_onnx::pb::ModelProto>)> =
        rewrite::variants(proto).into_iter().map(|(v, p)| (v, Some(p))).collect();
    variants.push((Variant::Published, None));
    for (variant, rewritten) in variants {
        let loaded = LoadedModel::load_proto(rewritten.as_ref().unwrap_or(proto), variant, cfg.plan_cache);
        let checked = loaded.and_then(|m| {
            if let Some((_, fastest, _)) = &best {
                let first = median_run(&m, golden, 1).map_err(LoadError::Golden)?;
                if first > *fastest * SLOWER_SKIP {
                    return Err(LoadError::Slower(format!(
                        "one run took {} µs, over {SLOWER_SKIP}x the fastest passing plan ({} µs)",
                        first.as_micros(),
                        fastest.as_micros()
                    )));
                }
            }
            let report = golden.check(&m).map_err(LoadError::Golden)?;
            let time = median_run(&m, golden, TIMED_RUNS).map_err(LoadError::Golden)?;
            Ok((m, time, report))
        });
        match checked {
            Ok((m, time, report)) => {
                candidates.push(Candidate { variant, outcome: Ok(time) });
                let better = match &best {
                    None => true,
                    // A rewrite must beat the published graph by the margin to replace it.
                    Some(_) if variant == Variant::Published => {
                        best.as_ref().is_some_and(|(_, t, _)| time.as_secs_f64() * REWRITE_MARGIN <= t.as_secs_f64())
                    }
                    Some((_, t, _)) => time < *t,
                };
                if better {
                    best = Some((m, time, report));
                }
            }
            Err(e) => {
                candidates.push(Candidate { variant, outcome: Err(e.to_string()) });
                // The published graph's own failure leads the refusal message.
                if variant == Variant::Published {
                    first_error = Some(e);
                } else {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    // Reported in the publisher's order: the graph as published first.
    candidates.sort_by_key(|c| c.variant != Variant::Published);
    let summary = candidates
        .iter()
        .map(|c| match &c.outcome {
            Ok(t) => format!("{} {} µs", c.variant.as_str(), t.as_micros()),
            Err(e) => format!("{} rejected ({e})", c.variant.as_str()),
        })
        .collect::<Vec<_>>()
        .join("; ");
    match best {
        Some((model, _, report)) => {
            tracing::info!(plan = model.variant.as_str(), candidates = %summary, "plan chosen");
            let detail = format!(
                "golden vectors reproduced: {} cases, max abs error {:.2e} (tolerance {:e}); plan {} chosen of: {summary}; loaded in {} ms",
                report.cases,
                report.max_abs_error,
                golden.tolerance.atol,
                model.variant.as_str(),
                started.elapsed().as_millis()
            );
            let mut model = model;
            model.candidates = candidates;
            Ok((model, detail))
        }
        None => Err(match first_error {
            Some(LoadError::Golden(m)) if candidates.len() > 1 => {
                LoadError::Golden(format!("{m} (no candidate plan passes: {summary})"))
            }
            Some(e) => e,
            None => LoadError::Golden(format!("no candidate plan passes: {summary}")),
        }),
    }
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
            let served =
                Served::start(&src.name, &src.version, Arc::new(prepared.model), &cfg.serve_options(prepared.bytes));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_with_a_sequence_dimension_keeps_its_symbolic_plan_at_a_wider_margin() {
        let ms = Duration::from_millis;
        // Batch only: concrete plans are few and built at load, so 10 % decides.
        assert!(keeps_symbolic(ms(109), ms(100), false));
        assert!(!keeps_symbolic(ms(115), ms(100), false));
        // A sequence length as well: a load-time timing 17 % apart still keeps one plan.
        assert!(keeps_symbolic(ms(117), ms(100), true));
        assert!(keeps_symbolic(ms(150), ms(100), true));
        // Several times slower (convolutions with a symbolic size) still goes concrete.
        assert!(!keeps_symbolic(ms(151), ms(100), true));
        assert!(!keeps_symbolic(ms(700), ms(100), true));
    }
}
