//! Local telemetry: counters and latency histograms per model, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::api::Repository;

/// Upper bounds of the latency histogram, seconds.
const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Outcome labels; anything else is counted as "internal".
const OUTCOMES: [&str; 7] = ["ok", "invalid_input", "not_found", "not_ready", "overloaded", "deadline", "internal"];

/// The model label used for requests naming a model that does not exist (bounded cardinality).
pub const UNKNOWN_MODEL: &str = "_unknown";

#[derive(Default)]
struct ModelMetrics {
    outcomes: [AtomicU64; OUTCOMES.len()],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    models: RwLock<BTreeMap<String, Arc<ModelMetrics>>>,
    http_errors: AtomicU64,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn model(&self, name: &str) -> Arc<ModelMetrics> {
        if let Some(m) = self.models.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return m.clone();
        }
        self.models.write().unwrap_or_else(|p| p.into_inner()).entry(name.to_owned()).or_default().clone()
    }

    pub fn record_request(&self, model: &str, outcome: &str, latency: Duration) {
        let m = self.model(model);
        let idx = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(OUTCOMES.len() - 1);
        m.outcomes[idx].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                m.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        m.count.fetch_add(1, Ordering::Relaxed);
        m.sum_us.fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Requests refused before reaching a model (bad body, unknown route).
    pub fn record_http_error(&self) {
        self.http_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, repo: &Repository) -> String {
        let mut out = String::with_capacity(4096);
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP outpost_inference_requests_total Inference requests by model and outcome.\n");
        out.push_str("# TYPE outpost_inference_requests_total counter\n");
        for (name, m) in models.iter() {
            for (i, o) in OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "outpost_inference_requests_total{{model=\"{name}\",outcome=\"{o}\"}} {}",
                    m.outcomes[i].load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP outpost_inference_failures_total Inference requests that did not succeed.\n");
        out.push_str("# TYPE outpost_inference_failures_total counter\n");
        for (name, m) in models.iter() {
            let failed: u64 = m.outcomes[1..].iter().map(|c| c.load(Ordering::Relaxed)).sum();
            let _ = writeln!(out, "outpost_inference_failures_total{{model=\"{name}\"}} {failed}");
        }
        out.push_str("# HELP outpost_inference_duration_seconds End-to-end inference latency.\n");
        out.push_str("# TYPE outpost_inference_duration_seconds histogram\n");
        for (name, m) in models.iter() {
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "outpost_inference_duration_seconds_bucket{{model=\"{name}\",le=\"{le}\"}} {}",
                    m.buckets[i].load(Ordering::Relaxed)
                );
            }
            let count = m.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "outpost_inference_duration_seconds_bucket{{model=\"{name}\",le=\"+Inf\"}} {count}");
            let sum = m.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "outpost_inference_duration_seconds_sum{{model=\"{name}\"}} {sum}");
            let _ = writeln!(out, "outpost_inference_duration_seconds_count{{model=\"{name}\"}} {count}");
        }
        drop(models);
        out.push_str("# HELP outpost_queue_depth Requests queued or running per model.\n");
        out.push_str("# TYPE outpost_queue_depth gauge\n");
        let listed = repo.list();
        for (name, _, served) in &listed {
            let depth = served.as_ref().map_or(0, |s| s.queue_depth());
            let _ = writeln!(out, "outpost_queue_depth{{model=\"{name}\"}} {depth}");
        }
        out.push_str("# HELP outpost_model_ready 1 when the model serves, 0 otherwise.\n");
        out.push_str("# TYPE outpost_model_ready gauge\n");
        for (name, status, served) in &listed {
            let version = status.version.as_deref().unwrap_or("");
            let _ = writeln!(
                out,
                "outpost_model_ready{{model=\"{name}\",version=\"{version}\"}} {}",
                u8::from(served.is_some())
            );
        }
        out.push_str("# HELP outpost_http_rejected_total HTTP requests refused before reaching a model.\n");
        out.push_str("# TYPE outpost_http_rejected_total counter\n");
        let _ = writeln!(out, "outpost_http_rejected_total {}", self.http_errors.load(Ordering::Relaxed));
        out
    }
}
