//! Local telemetry: counters and latency histograms per model, rendered as Prometheus text.

use crate::locks::{MutexExt, RwLockExt};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds of the latency histogram, seconds.
const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Outcome labels; anything else is counted as "internal".
const OUTCOMES: [&str; 8] =
    ["ok", "invalid_input", "not_found", "not_ready", "overloaded", "deadline", "unavailable", "internal"];

/// The model label used for requests naming a model that does not exist (bounded cardinality).
pub const UNKNOWN_MODEL: &str = "_unknown";

#[derive(Default)]
struct ModelMetrics {
    outcomes: [AtomicU64; OUTCOMES.len()],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Overflow counters' key: model, reason, result.
type OverflowKey = (String, &'static str, &'static str);

/// Reasons access control refuses a request, as `/metrics` labels them.
pub const ACCESS_DENIALS: [&str; 4] = ["unauthenticated", "forbidden", "rate_limited", "source_blocked"];

/// One model as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelGauge {
    pub name: String,
    /// The model's state word (`READY`, `LOADING`, …).
    pub state: &'static str,
    pub version: Option<String>,
    /// A version serves it.
    pub ready: bool,
    pub queue_depth: usize,
}

/// The overflow target's circuit breaker as the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerGauge {
    /// 0 closed, 1 open, 2 half-open.
    pub state: u8,
    pub opened: u64,
}

#[derive(Default)]
pub struct Metrics {
    models: RwLock<BTreeMap<String, Arc<ModelMetrics>>>,
    http_errors: AtomicU64,
    audit_refusals: AtomicU64,
    /// Requests refused by access control: unauthenticated, forbidden, rate limited.
    access_denied: [AtomicU64; 4],
    connections_refused: AtomicU64,
    /// HTTP connections accepted and not yet finished (each holds a `max_connections` slot).
    pub connections_open: AtomicU64,
    tls_failures: AtomicU64,
    /// Overflow attempts: (model, reason, result) → count and total microseconds.
    overflow: RwLock<BTreeMap<OverflowKey, (u64, u64)>>,
    /// Response cache lookups per model: (hits, misses).
    cache: RwLock<BTreeMap<String, (u64, u64)>>,
    /// Raised alarms: name → detail.
    alarms: RwLock<BTreeMap<String, String>>,
    /// Extra gauges set by other parts (audit and outbox backlog, disk use): name → value.
    gauges: RwLock<BTreeMap<String, f64>>,
    /// Per model, the request count at the last rate sample (for `summaries`).
    rate_samples: std::sync::Mutex<BTreeMap<String, (std::time::Instant, u64)>>,
    started: Option<std::time::Instant>,
}

/// One model's traffic at a glance (`/admin/status`, `outpost status`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSummary {
    pub requests: u64,
    /// Requests a second since the previous sample (at most every 10 s; since start at first).
    pub rate_per_s: f64,
    /// The 99th percentile of end-to-end latency since start, as the histogram's bucket bound
    /// (`None` past the last bucket or without requests).
    pub p99_ms: Option<f64>,
}

/// The process's resident memory, CPU time, open file descriptors and start time, from
/// `/proc/self` (the names Prometheus client libraries use); nothing where `/proc` is absent.
fn process_metrics(out: &mut String) {
    // CPU times are in clock ticks: 100 a second on Linux (USER_HZ).
    let ticks = 100.0;
    let rss_kb = std::fs::read_to_string("/proc/self/status").ok().and_then(|st| {
        st.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse::<f64>().ok())
    });
    if let Some(kb) = rss_kb {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            kb * 1024.0
        );
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): utime and stime are the 12th
        // and 13th.
        let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let f = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (f(11), f(12)) {
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
                 # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
                (u + s) / ticks
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}",
            fds.count()
        );
    }
}

/// The HELP text of a gauge other parts set.
fn gauge_help(name: &str) -> &'static str {
    match name {
        "audit_backlog_records" => "Audit records not yet acknowledged upstream.",
        "audit_retained_bytes" => "Audit record bytes kept on disk (what the quota counts).",
        "audit_disk_bytes" => "Disk bytes the audit log's segment files take.",
        "telemetry_backlog_bytes" => "Telemetry snapshot bytes waiting to go upstream.",
        "mqtt_connected" => "1 while connected to the MQTT broker, 0 otherwise.",
        "upstream_last_success_timestamp_seconds" => "When a send round upstream last succeeded (Unix time).",
        "registry_last_success_timestamp_seconds" => "When a registry poll last succeeded (Unix time).",
        _ => "A gauge set by the agent.",
    }
}

/// The 99th percentile's bucket bound of a cumulative histogram of `count` observations.
fn p99_bound(buckets: &[u64], count: u64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let want = count - count / 100;
    BUCKETS.iter().zip(buckets).find(|(_, c)| **c >= want).map(|(le, _)| le * 1000.0)
}

impl Metrics {
    pub fn new() -> Self {
        Metrics { started: Some(std::time::Instant::now()), ..Self::default() }
    }

    /// Every model's requests, recent rate and p99, by name.
    pub fn summaries(&self) -> BTreeMap<String, ModelSummary> {
        let now = std::time::Instant::now();
        let since_start = self.started.map_or(1.0, |s| now.duration_since(s).as_secs_f64().max(1.0));
        let models: Vec<(String, Arc<ModelMetrics>)> =
            self.models.read_locked().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut samples = self.rate_samples.locked();
        models
            .into_iter()
            .map(|(name, m)| {
                let count = m.count.load(Ordering::Relaxed);
                let buckets: Vec<u64> = m.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
                let rate_per_s = match samples.get(&name) {
                    Some((t, c)) if now.duration_since(*t).as_secs_f64() >= 1.0 => {
                        count.saturating_sub(*c) as f64 / now.duration_since(*t).as_secs_f64()
                    }
                    _ => count as f64 / since_start,
                };
                let stale = samples.get(&name).is_none_or(|(t, _)| now.duration_since(*t).as_secs() >= 10);
                if stale {
                    samples.insert(name.clone(), (now, count));
                }
                (name, ModelSummary { requests: count, rate_per_s, p99_ms: p99_bound(&buckets, count) })
            })
            .collect()
    }

    fn model(&self, name: &str) -> Arc<ModelMetrics> {
        if let Some(m) = self.models.read_locked().get(name) {
            return m.clone();
        }
        self.models.write_locked().entry(name.to_owned()).or_default().clone()
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

    /// Answers withheld because their audit record could not be kept.
    pub fn record_audit_refusal(&self) {
        self.audit_refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Raises (`Some(detail)`) or clears (`None`) an alarm; transitions are logged.
    pub fn set_alarm(&self, name: &str, detail: Option<String>) {
        let mut alarms = self.alarms.write_locked();
        match detail {
            Some(d) => {
                if alarms.insert(name.to_owned(), d.clone()).is_none() {
                    tracing::error!(alarm = name, detail = %d, "alarm raised");
                }
            }
            None => {
                if alarms.remove(name).is_some() {
                    tracing::info!(alarm = name, "alarm cleared");
                }
            }
        }
    }

    pub fn alarms(&self) -> BTreeMap<String, String> {
        self.alarms.read_locked().clone()
    }

    /// A gauge set by another part, if it was.
    pub fn gauge(&self, name: &str) -> Option<f64> {
        self.gauges.read_locked().get(name).copied()
    }

    pub fn set_gauge(&self, name: &str, value: f64) {
        self.gauges.write_locked().insert(name.to_owned(), value);
    }

    /// A snapshot for upstream telemetry: counters and histograms per model, what serves,
    /// gauges, alarms.
    pub fn snapshot(&self, serving: &[ModelGauge]) -> serde_json::Value {
        let models = self.models.read_locked();
        let per_model: serde_json::Map<String, serde_json::Value> = models
            .iter()
            .map(|(name, m)| {
                let outcomes: serde_json::Map<String, serde_json::Value> = OUTCOMES
                    .iter()
                    .enumerate()
                    .map(|(i, o)| ((*o).to_owned(), serde_json::json!(m.outcomes[i].load(Ordering::Relaxed))))
                    .collect();
                let buckets: Vec<u64> = m.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
                (
                    name.clone(),
                    serde_json::json!({
                        "requests": outcomes,
                        "latency_buckets_le_s": BUCKETS,
                        "latency_buckets": buckets,
                        "latency_count": m.count.load(Ordering::Relaxed),
                        "latency_sum_us": m.sum_us.load(Ordering::Relaxed),
                    }),
                )
            })
            .collect();
        let versions: serde_json::Map<String, serde_json::Value> = serving
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    serde_json::json!({ "state": m.state, "version": m.version, "queue_depth": m.queue_depth }),
                )
            })
            .collect();
        serde_json::json!({
            "models": per_model,
            "serving": versions,
            "gauges": *self.gauges.read_locked(),
            "alarms": self.alarms(),
        })
    }

    /// Requests refused before reaching a model (bad body, unknown route).
    pub fn record_http_error(&self) {
        self.http_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A request refused by access control; `kind` is one of [`ACCESS_DENIALS`].
    pub fn record_access_denied(&self, kind: &str) {
        let i = ACCESS_DENIALS.iter().position(|k| *k == kind).unwrap_or(0);
        self.access_denied[i].fetch_add(1, Ordering::Relaxed);
    }

    /// One response cache lookup.
    pub fn record_cache(&self, model: &str, hit: bool) {
        let mut m = self.cache.write_locked();
        let e = m.entry(model.to_owned()).or_insert((0, 0));
        if hit {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// One attempt to answer from the overflow target; `result` is "ok" or "failed".
    pub fn record_overflow(&self, model: &str, reason: &'static str, result: &'static str, latency: Duration) {
        let mut m = self.overflow.write_locked();
        let e = m.entry((model.to_owned(), reason, result)).or_insert((0, 0));
        e.0 += 1;
        e.1 += latency.as_micros() as u64;
    }

    /// A connection closed at accept because `http.max_connections` were open.
    pub fn record_connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A TLS handshake that failed or timed out (includes refused client certificates).
    pub fn record_tls_failure(&self) {
        self.tls_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4, with what serves and the overflow breaker as
    /// the caller sees them.
    pub fn render(&self, serving: &[ModelGauge], breaker: Option<BreakerGauge>) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP outpost_build_info The agent's version (the value is always 1).\n# TYPE outpost_build_info gauge\n\
             outpost_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        process_metrics(&mut out);
        let models = self.models.read_locked();
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
        for m in serving {
            let _ = writeln!(out, "outpost_queue_depth{{model=\"{}\"}} {}", m.name, m.queue_depth);
        }
        out.push_str("# HELP outpost_model_ready 1 when the model serves, 0 otherwise.\n");
        out.push_str("# TYPE outpost_model_ready gauge\n");
        for m in serving {
            let version = m.version.as_deref().unwrap_or("");
            let _ = writeln!(
                out,
                "outpost_model_ready{{model=\"{}\",version=\"{version}\"}} {}",
                m.name,
                u8::from(m.ready)
            );
        }
        out.push_str("# HELP outpost_http_rejected_total HTTP requests refused before reaching a model.\n");
        out.push_str("# TYPE outpost_http_rejected_total counter\n");
        let _ = writeln!(out, "outpost_http_rejected_total {}", self.http_errors.load(Ordering::Relaxed));
        out.push_str(
            "# HELP outpost_http_access_denied_total Requests refused by authentication, role or rate limit.\n",
        );
        out.push_str("# TYPE outpost_http_access_denied_total counter\n");
        for (i, k) in ACCESS_DENIALS.iter().enumerate() {
            let _ = writeln!(
                out,
                "outpost_http_access_denied_total{{reason=\"{k}\"}} {}",
                self.access_denied[i].load(Ordering::Relaxed)
            );
        }
        {
            let m = self.cache.read_locked();
            out.push_str("# HELP outpost_cache_requests_total Response cache lookups by model and result.\n");
            out.push_str("# TYPE outpost_cache_requests_total counter\n");
            for (model, (hits, misses)) in m.iter() {
                let _ = writeln!(out, "outpost_cache_requests_total{{model=\"{model}\",result=\"hit\"}} {hits}");
                let _ = writeln!(out, "outpost_cache_requests_total{{model=\"{model}\",result=\"miss\"}} {misses}");
            }
        }
        {
            let m = self.overflow.read_locked();
            out.push_str(
                "# HELP outpost_overflow_requests_total Requests tried on the overflow target, by reason and result.\n",
            );
            out.push_str("# TYPE outpost_overflow_requests_total counter\n");
            for ((model, reason, result), (n, _)) in m.iter() {
                let _ = writeln!(
                    out,
                    "outpost_overflow_requests_total{{model=\"{model}\",reason=\"{reason}\",result=\"{result}\"}} {n}"
                );
            }
        }
        if let Some(b) = breaker {
            out.push_str(
                "# HELP outpost_overflow_breaker_state The overflow target's circuit breaker: 0 closed, 1 open, 2 half-open.\n",
            );
            out.push_str("# TYPE outpost_overflow_breaker_state gauge\n");
            let _ = writeln!(out, "outpost_overflow_breaker_state {}", b.state);
            out.push_str("# HELP outpost_overflow_breaker_opened_total Times the overflow breaker opened.\n");
            out.push_str("# TYPE outpost_overflow_breaker_opened_total counter\n");
            let _ = writeln!(out, "outpost_overflow_breaker_opened_total {}", b.opened);
        }
        out.push_str(
            "# HELP outpost_http_connections_refused_total Connections closed at accept (http.max_connections).\n",
        );
        out.push_str("# TYPE outpost_http_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "outpost_http_connections_refused_total {}",
            self.connections_refused.load(Ordering::Relaxed)
        );
        out.push_str("# HELP outpost_http_connections_open HTTP connections being served.\n");
        out.push_str("# TYPE outpost_http_connections_open gauge\n");
        let _ = writeln!(out, "outpost_http_connections_open {}", self.connections_open.load(Ordering::Relaxed));
        out.push_str("# HELP outpost_tls_handshake_failures_total TLS handshakes that failed or timed out.\n");
        out.push_str("# TYPE outpost_tls_handshake_failures_total counter\n");
        let _ = writeln!(out, "outpost_tls_handshake_failures_total {}", self.tls_failures.load(Ordering::Relaxed));
        out.push_str(
            "# HELP outpost_audit_refusals_total Answers withheld because their audit record could not be kept.\n",
        );
        out.push_str("# TYPE outpost_audit_refusals_total counter\n");
        let _ = writeln!(out, "outpost_audit_refusals_total {}", self.audit_refusals.load(Ordering::Relaxed));
        out.push_str("# HELP outpost_alarm 1 while an alarm is raised.\n");
        out.push_str("# TYPE outpost_alarm gauge\n");
        for name in [
            "audit_quota_full",
            "telemetry_dropped",
            "upstream_unreachable",
            "residency_refused",
            "mqtt_not_authorized",
        ] {
            let on = self.alarms.read().map(|a| a.contains_key(name)).unwrap_or(false);
            let _ = writeln!(out, "outpost_alarm{{name=\"{name}\"}} {}", u8::from(on));
        }
        for (name, v) in self.gauges.read_locked().iter() {
            let _ = writeln!(
                out,
                "# HELP outpost_{name} {}\n# TYPE outpost_{name} gauge\noutpost_{name} {v}",
                gauge_help(name)
            );
        }
        out
    }
}
