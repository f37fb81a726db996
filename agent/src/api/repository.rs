//! The serving table: per model name, the versions serving (each an `Arc<Served>`), the default
//! version, an optional canary, and the model's status. Every change is one short critical
//! section: requests that already hold a handle finish on it, new ones see the new table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::InferError;
use crate::config::CanaryConfig;
use crate::engine::Served;
use crate::locks::{MutexExt, RwLockExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Unavailable,
}

impl ModelState {
    /// The V2 repository-index state names (Triton's).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable => "UNAVAILABLE",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub state: ModelState,
    /// The default version serving, or the one that was tried.
    pub version: Option<String>,
    /// Why the model is unavailable (or why the last attempt failed while an older one serves).
    pub reason: Option<String>,
}

/// A canary's verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Promote { model: String, version: String, detail: String },
    Rollback { model: String, version: String, reason: String },
}

#[derive(Default)]
struct Stats {
    requests: u64,
    errors: u64,
    /// Engine run times of the most recent requests (bounded).
    latencies: Vec<Duration>,
}

const LATENCY_SAMPLES: usize = 2048;

impl Stats {
    fn record(&mut self, error: bool, run: Option<Duration>) {
        self.requests += 1;
        if error {
            self.errors += 1;
        }
        if let Some(d) = run {
            if self.latencies.len() >= LATENCY_SAMPLES {
                let i = (self.requests as usize) % LATENCY_SAMPLES;
                self.latencies[i] = d;
            } else {
                self.latencies.push(d);
            }
        }
    }

    fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    fn p99(&self) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut v = self.latencies.clone();
        v.sort();
        Some(v[((v.len() - 1) as f64 * 0.99).round() as usize])
    }
}

struct Canary {
    version: String,
    cfg: CanaryConfig,
    counter: AtomicU64,
    started: Instant,
    candidate: Mutex<Stats>,
    stable: Mutex<Stats>,
}

struct Entry {
    versions: BTreeMap<String, Arc<Served>>,
    default: Option<String>,
    canary: Option<Arc<Canary>>,
    status: ModelStatus,
    switched_at: Option<Instant>,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            versions: BTreeMap::new(),
            default: None,
            canary: None,
            status: ModelStatus { state: ModelState::Loading, version: None, reason: None },
            switched_at: None,
        }
    }

    fn refresh_status(&mut self) {
        if let Some(d) = &self.default {
            self.status.state = ModelState::Ready;
            self.status.version = Some(d.clone());
        }
    }
}

#[derive(Default)]
pub struct Repository {
    models: RwLock<BTreeMap<String, Entry>>,
}

impl Repository {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.models.read_locked()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.models.write_locked()
    }

    /// The handle a request for `name` goes to: the given version, or the default version —
    /// or, for a canary's share of requests, the candidate.
    pub fn serving(&self, name: &str, version: Option<&str>) -> Result<Arc<Served>, InferError> {
        let models = self.read();
        let entry = models.get(name).ok_or_else(|| InferError::ModelNotFound(name.to_owned()))?;
        if let Some(v) = version {
            return entry
                .versions
                .get(v)
                .cloned()
                .ok_or_else(|| InferError::VersionNotFound { model: name.to_owned(), version: v.to_owned() });
        }
        if let Some(c) = &entry.canary {
            let n = c.counter.fetch_add(1, Ordering::Relaxed) as f64;
            // Exactly `share` of requests, evenly spread: request n goes to the candidate when
            // floor((n + 1) * share) steps up.
            if ((n + 1.0) * c.cfg.share).floor() > (n * c.cfg.share).floor() {
                if let Some(s) = entry.versions.get(&c.version) {
                    return Ok(s.clone());
                }
            }
        }
        entry
            .default
            .as_ref()
            .and_then(|d| entry.versions.get(d))
            .cloned()
            .ok_or_else(|| InferError::NotReady(name.to_owned()))
    }

    /// Marks a model as loading; a version already serving keeps serving.
    pub fn set_loading(&self, name: &str, version: &str) {
        let mut models = self.write();
        let entry = models.entry(name.to_owned()).or_insert_with(Entry::new);
        if entry.default.is_none() {
            entry.status = ModelStatus { state: ModelState::Loading, version: Some(version.to_owned()), reason: None };
        }
    }

    /// Makes `served` the default version, replacing the previous default (returned; it drains
    /// and is released once the requests holding it finish). Other versions stay.
    pub fn activate(&self, served: Served) -> Option<Arc<Served>> {
        let mut models = self.write();
        let entry = models.entry(served.name.clone()).or_insert_with(Entry::new);
        let version = served.version.clone();
        let old_default = entry.default.replace(version.clone());
        entry.versions.insert(version.clone(), Arc::new(served));
        entry.canary = None;
        entry.status.reason = None;
        entry.switched_at = Some(Instant::now());
        entry.refresh_status();
        match old_default {
            Some(old) if old != version => entry.versions.remove(&old),
            _ => None,
        }
    }

    /// Adds a version that serves only when asked for by version (or as a canary).
    pub fn add_version(&self, served: Served) {
        let mut models = self.write();
        let entry = models.entry(served.name.clone()).or_insert_with(Entry::new);
        let version = served.version.clone();
        entry.versions.insert(version.clone(), Arc::new(served));
        if entry.default.is_none() {
            entry.default = Some(version);
            entry.switched_at = Some(Instant::now());
        }
        entry.refresh_status();
    }

    /// Makes an already added version the default.
    pub fn set_default(&self, name: &str, version: &str) -> bool {
        let mut models = self.write();
        let Some(entry) = models.get_mut(name) else { return false };
        if !entry.versions.contains_key(version) {
            return false;
        }
        entry.default = Some(version.to_owned());
        entry.switched_at = Some(Instant::now());
        entry.refresh_status();
        true
    }

    /// Removes one version; the default moves to the highest remaining one.
    pub fn remove_version(&self, name: &str, version: &str) -> Option<Arc<Served>> {
        let mut models = self.write();
        let entry = models.get_mut(name)?;
        let removed = entry.versions.remove(version);
        if entry.canary.as_ref().is_some_and(|c| c.version == version) {
            entry.canary = None;
        }
        if entry.default.as_deref() == Some(version) {
            entry.default = entry.versions.keys().max_by(|a, b| version_cmp(a, b)).cloned();
            entry.switched_at = Some(Instant::now());
        }
        entry.refresh_status();
        removed
    }

    /// Sends `cfg.share` of the default route's requests to `version` (already added).
    pub fn start_canary(&self, name: &str, version: &str, cfg: CanaryConfig) {
        let mut models = self.write();
        if let Some(entry) = models.get_mut(name) {
            entry.canary = Some(Arc::new(Canary {
                version: version.to_owned(),
                cfg,
                counter: AtomicU64::new(0),
                started: Instant::now(),
                candidate: Mutex::new(Stats::default()),
                stable: Mutex::new(Stats::default()),
            }));
        }
    }

    /// The canary candidate of a model, if one runs.
    pub fn canary_version(&self, name: &str) -> Option<String> {
        self.read().get(name).and_then(|e| e.canary.as_ref().map(|c| c.version.clone()))
    }

    /// Records a request's outcome for the canary of `name`, if one runs; applies and returns
    /// its verdict once there is one. `error` counts failures the model is answerable for.
    pub fn observe(&self, name: &str, version: &str, error: bool, run: Option<Duration>) -> Option<Verdict> {
        let verdict = {
            let models = self.read();
            let entry = models.get(name)?;
            let canary = entry.canary.as_ref()?;
            let is_candidate = canary.version == version;
            if !is_candidate && entry.default.as_deref() != Some(version) {
                return None;
            }
            let stats = if is_candidate { &canary.candidate } else { &canary.stable };
            stats.locked().record(error, run);
            judge(name, canary)?
        };
        // Apply: the route changes now; persisting it is the caller's business.
        let mut models = self.write();
        let entry = models.get_mut(name)?;
        let still_same = entry.canary.as_ref().is_some_and(|c| match &verdict {
            Verdict::Promote { version, .. } | Verdict::Rollback { version, .. } => &c.version == version,
        });
        if !still_same {
            return None;
        }
        entry.canary = None;
        match &verdict {
            Verdict::Rollback { version, .. } => {
                entry.versions.remove(version);
            }
            Verdict::Promote { version, .. } => {
                if let Some(old) = entry.default.replace(version.clone()) {
                    entry.versions.remove(&old);
                }
                entry.switched_at = Some(Instant::now());
            }
        }
        entry.refresh_status();
        Some(verdict)
    }

    /// Records a failed load. Versions already serving keep serving; the reason is kept.
    pub fn set_failed(&self, name: &str, version: &str, reason: &str) {
        let mut models = self.write();
        let entry = models.entry(name.to_owned()).or_insert_with(Entry::new);
        match &entry.default {
            Some(d) => entry.status.reason = Some(format!("version {version} refused: {reason}; {d} still serving")),
            None => {
                entry.status = ModelStatus {
                    state: ModelState::Unavailable,
                    version: Some(version.to_owned()),
                    reason: Some(reason.to_owned()),
                }
            }
        }
    }

    /// Takes a model out of service; requests in flight finish on their handles.
    pub fn remove(&self, name: &str) -> Vec<Arc<Served>> {
        self.write().remove(name).map(|e| e.versions.into_values().collect()).unwrap_or_default()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn status(&self, name: &str) -> Option<ModelStatus> {
        self.read().get(name).map(|e| e.status.clone())
    }

    /// Versions serving, sorted.
    pub fn versions(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> =
            self.read().get(name).map(|e| e.versions.keys().cloned().collect()).unwrap_or_default();
        v.sort_by(|a, b| version_cmp(a, b));
        v
    }

    /// When the default version last changed.
    pub fn switched_at(&self, name: &str) -> Option<Instant> {
        self.read().get(name).and_then(|e| e.switched_at)
    }

    /// Every model with its status and default handle, sorted by name.
    pub fn list(&self) -> Vec<(String, ModelStatus, Option<Arc<Served>>)> {
        self.read()
            .iter()
            .map(|(k, e)| (k.clone(), e.status.clone(), e.default.as_ref().and_then(|d| e.versions.get(d)).cloned()))
            .collect()
    }

    /// Whether a signed manifest of any loaded version of `name` keeps its requests on the box
    /// (`may_leave_site = false`).
    pub fn must_stay(&self, name: &str) -> bool {
        self.read().get(name).is_some_and(|e| e.versions.values().any(|s| !s.may_leave_site))
    }

    /// Every model as the metrics show it.
    pub fn gauges(&self) -> Vec<crate::telemetry::ModelGauge> {
        self.list()
            .into_iter()
            .map(|(name, status, served)| crate::telemetry::ModelGauge {
                name,
                state: status.state.as_str(),
                version: status.version,
                ready: served.is_some(),
                queue_depth: served.map_or(0, |s| s.queue_depth()),
            })
            .collect()
    }

    /// Every serving handle (all versions), for metrics.
    pub fn all_served(&self) -> Vec<Arc<Served>> {
        self.read().values().flat_map(|e| e.versions.values().cloned()).collect()
    }

    pub fn ready_count(&self) -> usize {
        self.read().values().filter(|e| e.default.is_some()).count()
    }
}

fn judge(name: &str, c: &Canary) -> Option<Verdict> {
    let cand = c.candidate.locked();
    if cand.requests < c.cfg.min_requests {
        return None;
    }
    let stable = c.stable.locked();
    let (ce, se) = (cand.error_rate(), stable.error_rate());
    if ce > se + c.cfg.max_error_rate {
        return Some(Verdict::Rollback {
            model: name.to_owned(),
            version: c.version.clone(),
            reason: format!(
                "canary error rate {:.1}% over {} requests vs {:.1}% for the stable version (allowed +{:.1}%)",
                ce * 100.0,
                cand.requests,
                se * 100.0,
                c.cfg.max_error_rate * 100.0
            ),
        });
    }
    if let (Some(cp), Some(sp)) = (cand.p99(), stable.p99()) {
        // A ratio alone would condemn a 10 µs model for scheduling noise: the regression must
        // also be at least half a millisecond.
        let slower = cp.as_secs_f64() > sp.as_secs_f64() * c.cfg.max_latency_ratio
            && cp.saturating_sub(sp) > Duration::from_micros(500);
        if stable.latencies.len() >= 10 && slower {
            return Some(Verdict::Rollback {
                model: name.to_owned(),
                version: c.version.clone(),
                reason: format!(
                    "canary p99 latency {} us vs {} us for the stable version (allowed {}x)",
                    cp.as_micros(),
                    sp.as_micros(),
                    c.cfg.max_latency_ratio
                ),
            });
        }
    }
    if c.started.elapsed() >= c.cfg.window {
        return Some(Verdict::Promote {
            model: name.to_owned(),
            version: c.version.clone(),
            detail: format!(
                "canary held for {} s: {} requests, error rate {:.1}%, p99 {} us",
                c.cfg.window.as_secs(),
                cand.requests,
                ce * 100.0,
                cand.p99().map_or(0, |d| d.as_micros())
            ),
        });
    }
    None
}

/// Orders semantic versions numerically, anything else as text.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use outpost_proto::registry::SemVer;
    match (SemVer::parse(a), SemVer::parse(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}
