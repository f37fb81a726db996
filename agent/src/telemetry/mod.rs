//! Local telemetry: counters and latency histograms per model and version, exposed for
//! Prometheus (see `exposition`).

mod exposition;

pub use exposition::to_text_format;

use crate::locks::{MutexExt, RwLockExt};
use std::collections::BTreeMap;
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
    /// Cumulative: each counts the requests at or under its bound.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    /// Successful requests' end-to-end microseconds (the failures' are `sum_us` minus these).
    ok_us: AtomicU64,
    /// Engine runs that served requests here, and their microseconds.
    runs: AtomicU64,
    run_us: AtomicU64,
    /// When the last request finished, milliseconds since the epoch.
    last_ms: AtomicU64,
}

/// One model version's statistics (Triton's statistics extension, over HTTP and gRPC).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VersionStats {
    pub name: String,
    pub version: String,
    pub last_inference_ms: u64,
    pub success: u64,
    pub success_ns: u64,
    pub fail: u64,
    pub fail_ns: u64,
    pub executions: u64,
    /// Engine time of the runs that answered successes.
    pub compute_ns: u64,
}

/// Counters read out of [`ModelMetrics`] (or summed over versions).
#[derive(Default)]
struct Totals {
    outcomes: [u64; OUTCOMES.len()],
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_us: u64,
}

impl ModelMetrics {
    fn totals(&self) -> Totals {
        Totals {
            outcomes: std::array::from_fn(|i| self.outcomes[i].load(Ordering::Relaxed)),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            count: self.count.load(Ordering::Relaxed),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.outcomes.iter_mut().zip(o.outcomes).for_each(|(a, b)| *a += b);
        self.buckets.iter_mut().zip(o.buckets).for_each(|(a, b)| *a += b);
        self.count += o.count;
        self.sum_us += o.sum_us;
    }
}

/// Alarms always exposed (0 when not raised), so a dashboard can alert on them before the
/// first one is raised; others appear once raised.
const ALARMS: [&str; 7] = [
    "audit_quota_full",
    "compliance_drift",
    "telemetry_dropped",
    "upstream_unreachable",
    "residency_refused",
    "mqtt_not_authorized",
    "restart_needed",
];

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
    /// Request counters and latency per (model, version); the version is empty when no
    /// version was looked up (an unknown model, a request refused before routing).
    models: RwLock<BTreeMap<(String, String), Arc<ModelMetrics>>>,
    http_errors: AtomicU64,
    audit_refusals: AtomicU64,
    /// Requests refused by access control: unauthenticated, forbidden, rate limited.
    access_denied: [AtomicU64; 4],
    connections_refused: AtomicU64,
    residency_refused: AtomicU64,
    /// HTTP connections accepted and not yet finished (each holds a `max_connections` slot).
    pub connections_open: AtomicU64,
    tls_failures: AtomicU64,
    /// Overflow attempts: (model, reason, result) → count and total microseconds.
    overflow: RwLock<BTreeMap<OverflowKey, (u64, u64)>>,
    /// Response cache lookups per model: (hits, misses).
    cache: RwLock<BTreeMap<String, (u64, u64)>>,
    /// Raised alarms: name → detail.
    alarms: RwLock<BTreeMap<String, String>>,
    /// Status sections set by other parts (the last reload, the registry's last poll and
    /// download): name → JSON, shown in `/admin/status`.
    sections: RwLock<BTreeMap<String, serde_json::Value>>,
    /// Status sections computed when asked (the webhook queues): name → how.
    providers: RwLock<BTreeMap<String, Provider>>,
    /// Where alarm transitions are announced as events.
    announcer: std::sync::OnceLock<crate::events::Announcer>,
    /// Extra gauges set by other parts (audit and outbox backlog, disk use): name → value.
    gauges: RwLock<BTreeMap<String, f64>>,
    /// Per model, the request count at the last rate sample (for `summaries`).
    rate_samples: std::sync::Mutex<BTreeMap<String, (std::time::Instant, u64)>>,
    started: Option<std::time::Instant>,
}

/// Computes a status section when `/admin/status` is asked.
pub type Provider = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

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
        "ha_verdict_last_sync_timestamp_seconds" => "When a verdict of the site's other box last arrived (Unix time).",
        "ha_verdicts_ignored" => {
            "Messages on the site's verdict topics ignored (not signed by a key of the site, malformed)."
        }
        "ha_master" => "1 while keepalived holds this box MASTER of its VRRP instance, else 0.",
        "compliance_drifts" => "Rules of the compliance baseline the configuration breaks (0: it holds).",
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

    /// Every model's requests, recent rate and p99 (all its versions together), by name.
    pub fn summaries(&self) -> BTreeMap<String, ModelSummary> {
        let now = std::time::Instant::now();
        let since_start = self.started.map_or(1.0, |s| now.duration_since(s).as_secs_f64().max(1.0));
        let mut samples = self.rate_samples.locked();
        self.per_model()
            .into_iter()
            .map(|(name, t)| {
                let count = t.count;
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
                (name, ModelSummary { requests: count, rate_per_s, p99_ms: p99_bound(&t.buckets, count) })
            })
            .collect()
    }

    /// Each model's counters summed over its versions.
    fn per_model(&self) -> BTreeMap<String, Totals> {
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for ((name, _), m) in self.models.read_locked().iter() {
            out.entry(name.clone()).or_default().add(&m.totals());
        }
        out
    }

    fn model(&self, name: &str, version: &str) -> Arc<ModelMetrics> {
        let key = (name.to_owned(), version.to_owned());
        if let Some(m) = self.models.read_locked().get(&key) {
            return m.clone();
        }
        self.models.write_locked().entry(key).or_default().clone()
    }

    /// Every model version's statistics (`model`: that model's only), by name and version;
    /// requests no version served are left out.
    pub fn statistics(&self, model: Option<&str>) -> Vec<VersionStats> {
        self.models
            .read_locked()
            .iter()
            .filter(|((name, version), _)| !version.is_empty() && model.is_none_or(|m| m == name))
            .map(|((name, version), m)| {
                let t = m.totals();
                let ok_us = m.ok_us.load(Ordering::Relaxed);
                VersionStats {
                    name: name.clone(),
                    version: version.clone(),
                    last_inference_ms: m.last_ms.load(Ordering::Relaxed),
                    success: t.outcomes[0],
                    success_ns: ok_us.saturating_mul(1000),
                    fail: t.count.saturating_sub(t.outcomes[0]),
                    fail_ns: t.sum_us.saturating_sub(ok_us).saturating_mul(1000),
                    executions: m.runs.load(Ordering::Relaxed),
                    compute_ns: m.run_us.load(Ordering::Relaxed).saturating_mul(1000),
                }
            })
            .collect()
    }

    /// One request's outcome, end-to-end latency and engine run time, under the version that
    /// served it (`""` when none did).
    pub fn record_request(&self, model: &str, version: &str, outcome: &str, latency: Duration, run: Option<Duration>) {
        let m = self.model(model, version);
        if outcome == "ok" {
            m.ok_us.fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
            if let Some(r) = run {
                m.runs.fetch_add(1, Ordering::Relaxed);
                m.run_us.fetch_add(r.as_micros() as u64, Ordering::Relaxed);
            }
        }
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        m.last_ms.store(now_ms, Ordering::Relaxed);
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
                    self.announce(crate::events::Notice {
                        kind: "alarm.raised".into(),
                        subject: Some(name.to_owned()),
                        data: serde_json::json!({ "alarm": name, "detail": d }),
                    });
                }
            }
            None => {
                if alarms.remove(name).is_some() {
                    tracing::info!(alarm = name, "alarm cleared");
                    self.announce(crate::events::Notice {
                        kind: "alarm.cleared".into(),
                        subject: Some(name.to_owned()),
                        data: serde_json::json!({ "alarm": name }),
                    });
                }
            }
        }
    }

    pub fn alarms(&self) -> BTreeMap<String, String> {
        self.alarms.read_locked().clone()
    }

    /// Sets a status section (see `sections`).
    pub fn set_section(&self, name: &str, value: serde_json::Value) {
        self.sections.write_locked().insert(name.to_owned(), value);
    }

    /// A status section, if it was set (or has a provider).
    pub fn section(&self, name: &str) -> Option<serde_json::Value> {
        let provider = self.providers.read_locked().get(name).cloned();
        match provider {
            Some(p) => Some(p()),
            None => self.sections.read_locked().get(name).cloned(),
        }
    }

    /// Sets how a status section is computed when asked.
    pub fn set_provider(&self, name: &str, provider: Provider) {
        self.providers.write_locked().insert(name.to_owned(), provider);
    }

    /// Sets where alarm transitions are announced (once; later calls are ignored).
    pub fn set_announcer(&self, announcer: crate::events::Announcer) {
        let _ = self.announcer.set(announcer);
    }

    /// Announces an event, when an announcer is set.
    pub fn announce(&self, notice: crate::events::Notice) {
        if let Some(a) = self.announcer.get() {
            a.announce(notice);
        }
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
        let per_model: serde_json::Map<String, serde_json::Value> = self
            .per_model()
            .into_iter()
            .map(|(name, t)| {
                let outcomes: serde_json::Map<String, serde_json::Value> =
                    OUTCOMES.iter().zip(t.outcomes).map(|(o, n)| ((*o).to_owned(), serde_json::json!(n))).collect();
                (
                    name,
                    serde_json::json!({
                        "requests": outcomes,
                        "latency_buckets_le_s": BUCKETS,
                        "latency_buckets": t.buckets,
                        "latency_count": t.count,
                        "latency_sum_us": t.sum_us,
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

    /// An outbound connection refused for residency (its destination is off the allow-list).
    pub fn record_residency_refused(&self) {
        self.residency_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed at accept because `http.max_connections` were open.
    pub fn record_connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A TLS handshake that failed or timed out (includes refused client certificates).
    pub fn record_tls_failure(&self) {
        self.tls_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition (OpenMetrics, through the `prometheus-client` crate), with what serves
    /// and the overflow breaker as the caller sees them.
    pub fn render(&self, serving: &[ModelGauge], breaker: Option<BreakerGauge>) -> String {
        let mut x = exposition::Exposition::default();
        x.gauge("outpost_build_info", "The agent's version (the value is always 1).")
            .level(&[("version", env!("CARGO_PKG_VERSION"))], 1);
        exposition::process_metrics(&mut x);
        {
            let models = self.models.read_locked();
            let f = x.counter("outpost_inference_requests", "Inference requests by model, version and outcome.");
            for ((name, version), m) in models.iter() {
                for (i, o) in OUTCOMES.iter().enumerate() {
                    f.count(
                        &[("model", name), ("version", version), ("outcome", o)],
                        m.outcomes[i].load(Ordering::Relaxed),
                    );
                }
            }
            let f = x.counter(
                "outpost_inference_failures",
                "Inference requests that did not succeed, by model and version.",
            );
            for ((name, version), m) in models.iter() {
                let failed: u64 = m.outcomes[1..].iter().map(|c| c.load(Ordering::Relaxed)).sum();
                f.count(&[("model", name), ("version", version)], failed);
            }
            let f = x
                .histogram("outpost_inference_duration_seconds", "End-to-end inference latency, by model and version.");
            for ((name, version), m) in models.iter() {
                let t = m.totals();
                f.histogram(
                    &[("model", name), ("version", version)],
                    &BUCKETS,
                    &t.buckets,
                    t.count,
                    t.sum_us as f64 / 1e6,
                );
            }
        }
        let f = x.gauge("outpost_queue_depth", "Requests queued or running per model.");
        for m in serving {
            f.level(&[("model", &m.name)], m.queue_depth as i64);
        }
        let f = x.gauge("outpost_model_ready", "1 when the model serves, 0 otherwise.");
        for m in serving {
            f.level(&[("model", &m.name), ("version", m.version.as_deref().unwrap_or(""))], i64::from(m.ready));
        }
        x.counter("outpost_http_rejected", "HTTP requests refused before reaching a model.")
            .count(&[], self.http_errors.load(Ordering::Relaxed));
        let f = x.counter("outpost_http_access_denied", "Requests refused by authentication, role or rate limit.");
        for (i, k) in ACCESS_DENIALS.iter().enumerate() {
            f.count(&[("reason", k)], self.access_denied[i].load(Ordering::Relaxed));
        }
        let f = x.counter("outpost_cache_requests", "Response cache lookups by model and result.");
        for (model, (hits, misses)) in self.cache.read_locked().iter() {
            f.count(&[("model", model), ("result", "hit")], *hits);
            f.count(&[("model", model), ("result", "miss")], *misses);
        }
        let f = x.counter("outpost_overflow_requests", "Requests tried on the overflow target, by reason and result.");
        for ((model, reason, result), (n, _)) in self.overflow.read_locked().iter() {
            f.count(&[("model", model), ("reason", reason), ("result", result)], *n);
        }
        if let Some(b) = breaker {
            x.gauge(
                "outpost_overflow_breaker_state",
                "The overflow target's circuit breaker: 0 closed, 1 open, 2 half-open.",
            )
            .level(&[], i64::from(b.state));
            x.counter("outpost_overflow_breaker_opened", "Times the overflow breaker opened.").count(&[], b.opened);
        }
        if let Some(serde_json::Value::Array(hooks)) = self.section("webhooks") {
            let name = |h: &serde_json::Value| h["name"].as_str().unwrap_or_default().to_owned();
            let n = |h: &serde_json::Value, k: &str| h[k].as_u64().unwrap_or(0);
            let f = x.gauge("outpost_webhook_queued", "Events waiting for delivery, by webhook.");
            for h in &hooks {
                f.level(&[("webhook", &name(h))], n(h, "queued") as i64);
            }
            let f = x.counter("outpost_webhook_delivered", "Events a webhook's receiver accepted (2xx).");
            for h in &hooks {
                f.count(&[("webhook", &name(h))], n(h, "delivered"));
            }
            let f = x.counter("outpost_webhook_failed_attempts", "Delivery attempts that failed, by webhook.");
            for h in &hooks {
                f.count(&[("webhook", &name(h))], n(h, "failed_attempts"));
            }
            let f = x.counter("outpost_webhook_dead_lettered", "Events moved to a webhook's dead-letter list.");
            for h in &hooks {
                f.count(&[("webhook", &name(h))], n(h, "dead_lettered"));
            }
        }
        if let Some(a) = self.announcer.get() {
            x.counter("outpost_events_dropped", "Events dropped because the event queue was full.")
                .count(&[], a.dropped());
        }
        x.counter(
            "outpost_residency_refused",
            "Outbound connections refused: the destination is outside privacy.residency_allow.",
        )
        .count(&[], self.residency_refused.load(Ordering::Relaxed));
        x.counter("outpost_http_connections_refused", "Connections closed at accept (http.max_connections).")
            .count(&[], self.connections_refused.load(Ordering::Relaxed));
        x.gauge("outpost_http_connections_open", "HTTP connections being served.")
            .level(&[], self.connections_open.load(Ordering::Relaxed) as i64);
        x.counter("outpost_tls_handshake_failures", "TLS handshakes that failed or timed out.")
            .count(&[], self.tls_failures.load(Ordering::Relaxed));
        x.counter("outpost_audit_refusals", "Answers withheld because their audit record could not be kept.")
            .count(&[], self.audit_refusals.load(Ordering::Relaxed));
        let f = x.gauge("outpost_alarm", "1 while an alarm is raised.");
        let alarms = self.alarms();
        for name in
            ALARMS.iter().copied().chain(alarms.keys().map(String::as_str)).collect::<std::collections::BTreeSet<_>>()
        {
            f.level(&[("name", name)], i64::from(alarms.contains_key(name)));
        }
        for (name, v) in self.gauges.read_locked().iter() {
            x.gauge(&format!("outpost_{name}"), gauge_help(name)).sample(&[], *v);
        }
        x.encode()
    }
}
