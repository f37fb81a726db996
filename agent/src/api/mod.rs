//! The one inference API every adapter calls (HTTP, MQTT). It owns the request path: look up
//! the model, decide local or overflow (the router), validate against its signature, queue,
//! wait within the deadline, select outputs, count, and report to the event sink.

pub mod audit_sink;
pub mod control;
pub mod events;
pub mod experiment;
pub mod pipeline;
pub mod repository;
pub mod router;
pub mod shadow;
pub mod triton;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use events::{Event, EventSink, LogSink, RequestOutcome};
pub use repository::{ModelState, ModelStatus, Repository, Verdict};

use crate::engine::{CallError, JobError, RunError, SubmitError};
use crate::locks::RwLockExt;
use crate::protocol::{InferRequest, InferResponse};
use crate::telemetry::Metrics;

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Grpc,
    Mqtt,
    /// A row of a batch job.
    Batch,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
            Transport::Mqtt => "mqtt",
            Transport::Batch => "batch",
        }
    }
}

/// Where a request was (or will be) answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    /// Answered by the overflow target.
    Overflow,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Overflow => "overflow",
        }
    }
}

/// How a request was routed: where it was answered, why it went upstream, and why an upstream
/// attempt fell back to the box.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub overflow: Option<crate::overflow::Reason>,
    pub answered_upstream: bool,
    pub fallback: Option<String>,
    /// The only request being answered when it arrived, while requests have been arriving one
    /// at a time (`InFlight::enter`): a short run may then stay on the runtime's thread
    /// (`engine::place`).
    pub alone: bool,
}

/// Everything about a request that is not its tensors.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request id: the client's V2 `id` when given, else generated.
    pub id: String,
    /// Who asked: a token name or certificate subject; "anonymous" without auth.
    pub principal: String,
    pub transport: Transport,
    pub deadline: Instant,
    pub route: Route,
    pub received: Instant,
    /// The value of the header an A/B experiment is keyed by (`experiment.key_header`), when
    /// the transport has headers and the request carries it.
    pub experiment_key: Option<String>,
}

impl RequestContext {
    pub fn new(transport: Transport, timeout: Duration) -> Self {
        let now = Instant::now();
        RequestContext {
            id: next_request_id(),
            principal: "anonymous".to_owned(),
            experiment_key: None,
            transport,
            deadline: now + timeout,
            route: Route::Local,
            received: now,
        }
    }
}

/// Retry-After for an overloaded model: the time its queue needs to drain, at least 1 s.
fn retry_after(served: &crate::engine::Served) -> Duration {
    Duration::from_secs(served.estimated_latency().as_secs().saturating_add(1).min(60))
}

/// A uniform draw in [0, 1).
fn sample() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Process-unique request ids: time-based prefix plus a counter.
pub fn next_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("{:x}{:04x}", t.as_secs(), std::process::id() & 0xffff)
    });
    format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Why a request failed; each adapter maps these to its own status codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("unknown model '{0}'")]
    ModelNotFound(String),
    #[error("unknown version '{version}' of model '{model}'")]
    VersionNotFound { model: String, version: String },
    #[error("model '{0}' is not ready")]
    NotReady(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("model '{model}' is overloaded: {reason}")]
    Overloaded { model: String, reason: String, retry_after: Duration },
    #[error("request deadline exceeded")]
    DeadlineExceeded,
    #[error("{0}")]
    Internal(String),
    /// The box cannot serve right now (e.g. the audit log is full): 503.
    #[error("{0}")]
    Unavailable(String),
}

impl InferError {
    /// The label used in metrics and audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            InferError::ModelNotFound(_) | InferError::VersionNotFound { .. } => "not_found",
            InferError::NotReady(_) => "not_ready",
            InferError::InvalidInput(_) => "invalid_input",
            InferError::Overloaded { .. } => "overloaded",
            InferError::DeadlineExceeded => "deadline",
            InferError::Internal(_) => "internal",
            InferError::Unavailable(_) => "unavailable",
        }
    }
}

/// The inference API shared by all adapters.
#[derive(Clone)]
pub struct InferenceService {
    pub repository: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<dyn EventSink>,
    /// Where canary verdicts go to be persisted (the registry task), if anywhere.
    pub verdicts: Option<tokio::sync::mpsc::UnboundedSender<Verdict>>,
    /// Digests and pseudonymization for what is recorded.
    pub privacy: Option<Arc<crate::privacy::Privacy>>,
    /// The overflow target, when `[overflow]` is configured.
    pub overflow: Option<Arc<crate::overflow::Overflow>>,
    /// The live configuration (per-model overflow policy).
    pub config: Option<Arc<std::sync::RwLock<Arc<crate::config::Config>>>>,
    /// Requests being answered, over every model and transport.
    in_flight: Arc<crate::engine::InFlightCount>,
    /// What the A/B experiments' requests did, per variant.
    pub experiments: Arc<experiment::Experiments>,
    /// What the shadow candidates' copies did.
    pub shadows: Arc<shadow::Shadows>,
    /// The compliance baseline in force and the drifts last found.
    pub compliance: Option<Arc<crate::compliance::Compliance>>,
    /// Rejections shared with the site's other box (`ha.peer_keys`).
    pub site_verdicts: Option<Arc<crate::verdicts::SiteVerdicts>>,
    /// The pipelines served under their own names.
    pub pipelines: Arc<pipeline::PipelineTable>,
}

/// What a content type says of a body: `Some(true)` certainly a raw input (an image),
/// `Some(false)` a raw input when the model takes one (a text, a CSV line, bytes: some clients
/// label V2 JSON so), `None` a V2 request.
fn raw_content_type(content_type: &str) -> Option<bool> {
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if media.starts_with("image/") {
        Some(true)
    } else if media.starts_with("text/") || media == "application/octet-stream" {
        Some(false)
    } else {
        None
    }
}

impl InferenceService {
    pub fn new(repository: Arc<Repository>, metrics: Arc<Metrics>, events: Arc<dyn EventSink>) -> Self {
        InferenceService {
            repository,
            metrics,
            events,
            verdicts: None,
            privacy: None,
            overflow: None,
            config: None,
            in_flight: Arc::default(),
            experiments: Arc::default(),
            shadows: Arc::default(),
            compliance: None,
            site_verdicts: None,
            pipelines: Arc::default(),
        }
    }

    /// Whether a body of this content type for `model` is a raw input rather than a V2
    /// request: images always; texts and bytes when the model is a package or a pipeline (a
    /// bare model keeps reading them as V2 JSON, as it always did).
    pub fn is_raw(&self, model: &str, version: Option<&str>, content_type: Option<&str>) -> bool {
        match content_type.and_then(raw_content_type) {
            Some(true) => true,
            Some(false) => {
                self.pipelines.get(model).is_some()
                    || self.repository.serving(model, version).is_ok_and(|s| s.package.is_some())
            }
            None => false,
        }
    }

    /// A raw input (an encoded image, a text, a row of fields), as sent over HTTP or MQTT
    /// with its own content type, as a request: one BYTES item for the package's one raw
    /// input.
    pub fn raw_request(&self, model: &str, version: Option<&str>, raw: Vec<u8>) -> Result<InferRequest, InferError> {
        let names: Vec<String> = match self.pipelines.get(model) {
            // A pipeline's inputs are raw when its first steps take them so.
            Some(p) => p.inputs.clone(),
            None => {
                let served = self.repository.serving(model, version)?;
                let Some(package) = &served.package else {
                    return Err(InferError::InvalidInput(format!(
                        "model '{model}' takes V2 requests (application/json); raw inputs need a model package with processing steps"
                    )));
                };
                package.raw_inputs.iter().map(|(n, _)| n.clone()).collect()
            }
        };
        let [name] = names.as_slice() else {
            return Err(InferError::InvalidInput(format!(
                "model '{model}' has {} raw inputs; send a V2 request naming them",
                names.len()
            )));
        };
        Ok(InferRequest {
            inputs: vec![crate::protocol::Tensor {
                name: name.clone(),
                shape: vec![1],
                data: crate::protocol::TensorData::Bytes(vec![raw]),
            }],
            input_parameters: vec![serde_json::Map::new()],
            ..Default::default()
        })
    }

    /// Requests being answered now (a batch job's next row waits for none).
    pub fn live_in_flight(&self) -> usize {
        self.in_flight.now()
    }

    /// The model's A/B experiment, when one is configured.
    pub fn experiment(&self, model: &str) -> Option<crate::config::ExperimentConfig> {
        let config = self.config.as_ref()?.read_locked().clone();
        config.models.get(model)?.experiment.clone()
    }

    /// The model's shadow candidate, when one is configured.
    pub fn shadow(&self, model: &str) -> Option<crate::config::ShadowConfig> {
        let config = self.config.as_ref()?.read_locked().clone();
        config.models.get(model)?.shadow.clone()
    }

    /// Runs a shadow copy of an answered request on the candidate, off the request path,
    /// if live work leaves room; its outputs are compared with the answer's, never sent.
    fn shadow_copy(
        &self,
        model: &str,
        cfg: crate::config::ShadowConfig,
        inputs: Vec<crate::protocol::Tensor>,
        live: &InferResponse,
        live_run: Option<Duration>,
    ) {
        let Some(slot) = self.shadows.try_start(model, &cfg.version, self.in_flight.now()) else { return };
        let (svc, model, answer) = (self.clone(), model.to_owned(), live.outputs.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let shadows = &svc.shadows;
            let Ok(served) = svc.repository.serving(&model, Some(&cfg.version)) else {
                shadows.dropped(&model, &cfg.version, true);
                return;
            };
            // A package's copy goes through its steps, as the answer did.
            let inputs = match served.package.clone() {
                None => Ok(inputs),
                Some(p) => {
                    tokio::task::spawn_blocking(move || p.pre(inputs)).await.unwrap_or_else(|e| Err(e.to_string()))
                }
            };
            let Ok(inputs) = inputs.map_err(RunError::InvalidInput).and_then(|i| served.model.validate(i)) else {
                shadows.dropped(&model, &cfg.version, true);
                return;
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let called = served.call(inputs, deadline, false, false).await;
            let called = match (called, &served.package) {
                (Ok((Ok(outputs), run)), Some(p)) => {
                    Ok((p.post(outputs).map_err(|e| JobError::Run(RunError::Engine(e))), run))
                }
                (other, _) => other,
            };
            match called {
                Ok((Ok(outputs), run)) => {
                    let c = shadow::compare(&answer, &outputs, cfg.output.as_deref());
                    shadows.record(&model, &cfg.version, &c, run, live_run);
                    if let Some(verdict) = shadows.judge(&model, &cfg) {
                        svc.conclude(&model, verdict).await;
                    }
                }
                Err(CallError::Refused(_)) => shadows.dropped(&model, &cfg.version, false),
                Ok((Err(_), _)) | Err(_) => shadows.dropped(&model, &cfg.version, true),
            }
        });
    }

    /// The variant (a pinned version) an unversioned request goes to, when the model runs an
    /// experiment and that version serves; `None` leaves the choice to the serving table.
    fn assign_variant(
        &self,
        ctx: &RequestContext,
        model: &str,
        request: &InferRequest,
        e: crate::config::ExperimentConfig,
    ) -> Option<(String, crate::config::ExperimentConfig)> {
        if self.experiments.conclusion(model, &e).is_some() {
            return None;
        }
        let key = e
            .key_parameter
            .as_ref()
            .and_then(|k| experiment::key_of(&request.parameters, k))
            .or_else(|| e.key_header.as_ref().and(ctx.experiment_key.clone()));
        let hash = |b: &[u8]| self.privacy.as_ref().map_or_else(String::new, |p| p.hmac_hex(b));
        let keyed: Option<experiment::KeyedHash<'_>> = if self.privacy.is_some() { Some(&hash) } else { None };
        let i = experiment::assign(keyed, model, key.as_deref(), &e.weights);
        let version = e.versions.get(i)?.clone();
        // A variant that is not installed leaves the request to the default version.
        self.repository.serving(model, Some(&version)).ok()?;
        Some((version, e))
    }

    /// Every model as the metrics show it.
    pub fn model_gauges(&self) -> Vec<crate::telemetry::ModelGauge> {
        self.repository.gauges()
    }

    /// The `/metrics` exposition (OpenMetrics): counters, what serves, and the overflow breaker.
    pub fn render_metrics(&self) -> String {
        let breaker = self.overflow.as_ref().map(|ov| crate::telemetry::BreakerGauge {
            state: ov.breaker.state().as_gauge(),
            opened: ov.breaker.opened.load(std::sync::atomic::Ordering::Relaxed),
        });
        self.metrics.render(&self.model_gauges(), breaker)
    }

    /// The node's inventory for the fleet's heartbeat: every model with its version, state,
    /// plan and canary; alarms; the overflow breaker.
    pub fn inventory(&self) -> serde_json::Value {
        let models: Vec<serde_json::Value> = self
            .repository
            .list()
            .into_iter()
            .map(|(name, status, served)| {
                serde_json::json!({
                    "name": name,
                    "version": status.version,
                    "state": status.state.as_str(),
                    "plan": served.map(|s| s.model.variant.as_str()),
                    "canary": self.repository.canary_version(&name),
                })
            })
            .collect();
        let alarms: Vec<String> = self.metrics.alarms().into_keys().collect();
        serde_json::json!({
            "models": models,
            "alarms": alarms,
            "compliance": self.metrics.section("compliance"),
            "breaker": self.overflow.as_ref().map(|ov| ov.breaker.state().as_str()),
        })
    }

    /// The overflow target and `model`'s policy, unless overflow is off for it.
    fn overflow_for(&self, model: &str) -> Option<(&crate::overflow::Overflow, crate::overflow::ModelOverflow)> {
        let ov = self.overflow.as_deref()?;
        let cfg = self.config.as_ref()?.read_locked().clone();
        let model_cfg = cfg.model(model);
        // `may_leave_site = false` in the configuration (applied live) forbids overflow.
        let allowed = model_cfg.may_leave_site && model_cfg.overflow.mode != crate::overflow::OverflowMode::Never;
        allowed.then_some((ov, model_cfg.overflow))
    }

    /// Whether any input is marked sensitive: by name in `privacy.sensitive_inputs`, or by the
    /// request (`"parameters": {"sensitive": true}` on the input).
    fn carries_sensitive(&self, request: &InferRequest) -> bool {
        let by_name =
            self.privacy.as_ref().is_some_and(|p| request.inputs.iter().any(|t| p.sensitive_inputs.contains(&t.name)));
        by_name || request.input_parameters.iter().any(|p| p.get("sensitive").and_then(Value::as_bool) == Some(true))
    }

    /// The request as it may leave the box: pseudonymized parameters, same tensors.
    fn outbound(&self, request: &InferRequest) -> InferRequest {
        let mut out = request.clone();
        if let Some(p) = &self.privacy {
            out.parameters = p.pseudonymize(&request.parameters);
        }
        for params in &mut out.input_parameters {
            params.remove("sensitive");
        }
        out
    }

    /// Tries the overflow target; `Ok(None)` when the breaker does not admit the attempt, and
    /// the reason in `routing.fallback` when the target fails.
    async fn try_upstream(
        &self,
        (ov, policy): (&crate::overflow::Overflow, &crate::overflow::ModelOverflow),
        ctx: &RequestContext,
        model: &str,
        request: &InferRequest,
        reason: crate::overflow::Reason,
        routing: &mut Routing,
    ) -> Option<InferResponse> {
        // Every route to the target passes here: a model whose signed manifest keeps it on the
        // box never leaves, whatever the configuration or the route.
        if self.repository.must_stay(model) {
            routing.fallback = Some(format!("the signed manifest of '{model}' says may_leave_site = false"));
            return None;
        }
        let admission = ov.breaker.admit()?;
        routing.overflow = Some(reason);
        let started = Instant::now();
        match ov.infer(admission, model, policy, &self.outbound(request), ctx.deadline).await {
            Ok(mut resp) => {
                self.metrics.record_overflow(model, reason.as_str(), "ok", started.elapsed());
                routing.answered_upstream = true;
                routing.fallback = None;
                resp.model_name = model.to_owned();
                resp.id.clone_from(&request.id);
                resp.parameters.insert("route".into(), Value::String(Route::Overflow.as_str().into()));
                resp.parameters.insert("overflow_reason".into(), Value::String(reason.as_str().into()));
                Some(resp)
            }
            Err(e) => {
                self.metrics.record_overflow(model, reason.as_str(), "failed", started.elapsed());
                routing.fallback = Some(e.to_string());
                None
            }
        }
    }

    /// Runs one request end to end. The request's state machine is large (routing, overflow,
    /// shadow, experiment and pipeline paths): it is allocated once here, so the transports'
    /// futures that await it stay small instead of each moving a copy of it.
    pub fn infer<'a>(
        &'a self,
        ctx: &'a RequestContext,
        model: &'a str,
        version: Option<&'a str>,
        request: InferRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<InferResponse, InferError>> + Send + 'a>> {
        Box::pin(self.infer_here(ctx, model, version, request))
    }

    async fn infer_here(
        &self,
        ctx: &RequestContext,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
    ) -> Result<InferResponse, InferError> {
        // Made only for a sink that keeps them (the audit log): a keyed digest of every input.
        let (key_epoch, input_digest, parameters) = match &self.privacy {
            Some(p) if self.events.keeps_request_details() => p.seal(&request.inputs, &request.parameters),
            _ => (None, String::new(), serde_json::Map::new()),
        };
        if let Some(p) = self.pipelines.get(model) {
            return self.infer_pipeline(ctx, &p, request, (key_epoch, input_digest, parameters)).await;
        }
        let (_in_flight, alone) = crate::engine::InFlight::enter(&self.in_flight);
        // A batch row never runs on the caller's thread nor commits its record there: the
        // runtime's thread stays free for live requests.
        let alone = alone && ctx.transport != Transport::Batch;
        let mut routing = Routing { alone, ..Routing::default() };
        // The model's experiment and shadow, read together (one configuration lookup), and
        // only for requests that name no version.
        let (experiment, shadow) = match (version, &self.config) {
            (None, Some(config)) => {
                let config = config.read_locked();
                config.models.get(model).map_or((None, None), |m| (m.experiment.clone(), m.shadow.clone()))
            }
            _ => (None, None),
        };
        let variant = experiment.and_then(|e| self.assign_variant(ctx, model, &request, e));
        // A sampled share of the default version's requests is copied to the shadow candidate.
        let shadow = shadow
            .filter(|_| variant.is_none())
            .filter(|s| self.shadows.conclusion(model, s).is_none())
            .filter(|s| s.share >= 1.0 || sample() < s.share);
        let shadow_inputs = shadow.as_ref().map(|_| request.inputs.clone());
        let version = variant.as_ref().map(|(v, _)| v.as_str()).or(version);
        let Routed { mut result, served_as } = self.route(ctx, model, version, request, &mut routing).await;
        if let (Some(cfg), Some(inputs), Ok(answer)) = (shadow, shadow_inputs, &result) {
            if !routing.answered_upstream && answer.model_version != cfg.version {
                let live_run = served_as.as_ref().and_then(|(_, run)| *run);
                self.shadow_copy(model, cfg, inputs, answer, live_run);
            }
        }
        if let Some((v, e)) = &variant {
            if let Ok(r) = &mut result {
                r.parameters.insert("experiment_variant".into(), Value::String(v.clone()));
            }
            let answered = result.as_ref().ok().filter(|r| &r.model_version == v);
            // Upstream answers and bad requests say nothing about the variant.
            if !routing.answered_upstream
                && !matches!(&result, Err(InferError::InvalidInput(_)))
                && self.experiments.record(model, v, e, ctx.received.elapsed(), answered)
            {
                // The check sorts recent latencies: off the request path.
                let (svc, model, e) = (self.clone(), model.to_owned(), e.clone());
                tokio::spawn(async move {
                    if let Some(c) = svc.experiments.judge(&model, &e) {
                        svc.conclude(&model, c.clone()).await;
                        svc.experiments.settle(&model, &e, c);
                    }
                });
            }
        }
        let mut ctx = ctx.clone();
        if routing.answered_upstream {
            ctx.route = Route::Overflow;
        }
        let latency = ctx.received.elapsed();
        if let Some((v, run)) = served_as.as_ref().filter(|_| !routing.answered_upstream) {
            // The model answers for engine failures and deadlines, not for bad requests.
            let error = matches!(&result, Err(InferError::Internal(_) | InferError::DeadlineExceeded));
            if let Some(verdict) = self.repository.observe(model, v, error, *run) {
                self.announce(verdict).await;
            }
        }
        let (served_version, outcome) = match &result {
            Ok(r) => (Some(r.model_version.clone()), RequestOutcome::Ok),
            Err(e) => (None, RequestOutcome::Failed(e.kind())),
        };
        let label = match &result {
            Err(InferError::ModelNotFound(_)) => crate::telemetry::UNKNOWN_MODEL,
            _ => model,
        };
        // The version looked up here (a canary is compared with its default by this label);
        // empty when none was, or when the overflow target answered.
        let here = served_as.as_ref().filter(|_| !routing.answered_upstream);
        let (served_here, run) = here.map_or(("", None), |(v, run)| (v.as_str(), *run));
        self.metrics.record_request(label, served_here, outcome.label(), latency, run);
        let event = Event::Request {
            ctx,
            model: model.to_owned(),
            version: served_version,
            outcome,
            latency,
            key_epoch,
            input_digest,
            parameters,
        };
        // Still the only request being answered: its record may be made durable right here.
        let alone = routing.alone && self.in_flight.now() == 1;
        let recorded = if alone { self.events.record_alone(event) } else { self.events.record(event) }.await;
        self.if_recorded(recorded, result)
    }

    /// An answer whose record could not be kept is not given (fail closed).
    fn if_recorded<E: std::fmt::Display>(
        &self,
        recorded: Result<(), E>,
        result: Result<InferResponse, InferError>,
    ) -> Result<InferResponse, InferError> {
        match recorded {
            Ok(()) => result,
            Err(e) => {
                self.metrics.record_audit_refusal();
                Err(InferError::Unavailable(format!("not answered: the audit record could not be kept ({e})")))
            }
        }
    }

    /// A pipeline end to end: its steps, then one audit record for the whole (listing the
    /// steps), made before the answer is given.
    async fn infer_pipeline(
        &self,
        ctx: &RequestContext,
        p: &pipeline::Pipeline,
        request: InferRequest,
        (key_epoch, input_digest, mut parameters): (Option<u64>, String, serde_json::Map<String, Value>),
    ) -> Result<InferResponse, InferError> {
        let (_in_flight, _) = crate::engine::InFlight::enter(&self.in_flight);
        let (result, steps) = self.run_pipeline(ctx, p, request).await;
        parameters.insert("pipeline_steps".into(), Value::Array(steps));
        let latency = ctx.received.elapsed();
        let (version, outcome) = match &result {
            Ok(r) => (Some(r.model_version.clone()), RequestOutcome::Ok),
            Err(e) => (None, RequestOutcome::Failed(e.kind())),
        };
        self.metrics.record_request(&p.name, &p.version, outcome.label(), latency, None);
        let event = Event::Request {
            ctx: ctx.clone(),
            model: p.name.clone(),
            version,
            outcome,
            latency,
            key_epoch,
            input_digest,
            parameters,
        };
        let recorded = self.events.record(event).await;
        self.if_recorded(recorded, result)
    }

    /// Carries out an experiment's conclusion (the candidate becomes the default, or the
    /// split ends) and records it: a lifecycle event, so the audit log and the event stream
    /// have it.
    async fn conclude(&self, model: &str, c: experiment::Conclusion) {
        let (version, kind, detail) = match c {
            experiment::Conclusion::Promote { candidate, detail } => {
                if !self.repository.set_default(model, &candidate) {
                    tracing::warn!(model, version = %candidate, "experiment: the candidate no longer serves");
                }
                (candidate, events::LifecycleKind::ExperimentPromoted, detail)
            }
            experiment::Conclusion::Stop { candidate, detail } => {
                (candidate, events::LifecycleKind::ExperimentStopped, detail)
            }
        };
        tracing::info!(model, %version, verdict = kind.as_str(), %detail, "experiment concluded");
        let _ = self.events.record(Event::Lifecycle { model: model.to_owned(), version, kind, detail }).await;
    }

    /// A canary verdict was applied to the serving table: tell the log, the event sink and
    /// whoever persists it.
    async fn announce(&self, verdict: Verdict) {
        let (model, version, kind, detail) = match &verdict {
            Verdict::Promote { model, version, detail } => (model, version, events::LifecycleKind::Promoted, detail),
            Verdict::Rollback { model, version, reason } => (model, version, events::LifecycleKind::RolledBack, reason),
        };
        let _ = self
            .events
            .record(Event::Lifecycle { model: model.clone(), version: version.clone(), kind, detail: detail.clone() })
            .await;
        if let Some(tx) = &self.verdicts {
            let _ = tx.send(verdict);
        }
    }

    /// Routes one request (the router's decisions: [`router`]) and carries it out: upstream,
    /// from the version's cache, or run here. `routing` records where and why.
    async fn route(
        &self,
        ctx: &RequestContext,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
        routing: &mut Routing,
    ) -> Routed {
        use crate::overflow::Reason;
        let overflow = self.overflow_for(model);
        let facts = router::Facts {
            mode: overflow.as_ref().map(|(_, p)| p.mode),
            must_stay: self.repository.must_stay(model),
            sensitive: self.carries_sensitive(&request),
        };
        let unserved = |result| Routed { result, served_as: None };
        match (router::at_arrival(&facts), &overflow) {
            (router::Arrival::RefuseSensitive, _) => {
                return unserved(Err(InferError::InvalidInput(format!(
                    "model '{model}' is served only by the overflow target, and this request carries inputs marked sensitive, which never leave the site"
                ))))
            }
            (router::Arrival::RemoteOnly, Some((ov, policy))) => {
                let answer = self.try_upstream((ov, policy), ctx, model, &request, Reason::RemoteOnly, routing).await;
                return unserved(answer.ok_or_else(|| InferError::Overloaded {
                    model: model.to_owned(),
                    reason: routing
                        .fallback
                        .clone()
                        .unwrap_or_else(|| "served only by the overflow target, whose circuit breaker is open".into()),
                    retry_after: ov.config.open_for,
                }));
            }
            _ => {}
        }
        let served = match self.repository.serving(model, version) {
            Ok(s) => s,
            Err(e) => return unserved(Err(e)),
        };
        // A package's steps run here only: its raw inputs never go to the overflow target.
        let upstream =
            overflow.filter(|_| served.package.is_none() && router::may_overflow(&facts, served.may_leave_site));
        let (result, run_time) = self.run_here(ctx, model, request, &served, upstream, routing).await;
        Routed { result, served_as: Some((served.version.clone(), run_time)) }
    }

    /// Serves a request with `served` (or upstream, as the router decides before and after the
    /// run); the run's time when it ran here.
    async fn run_here(
        &self,
        ctx: &RequestContext,
        model: &str,
        request: InferRequest,
        served: &Arc<crate::engine::Served>,
        upstream: Option<(&crate::overflow::Overflow, crate::overflow::ModelOverflow)>,
        routing: &mut Routing,
    ) -> (Result<InferResponse, InferError>, Option<Duration>) {
        use crate::overflow::Reason;
        // The version's response cache: a hit is this version's own earlier answer.
        let cache_key = served.cache.as_ref().map(|_| {
            let names: Vec<String> = request.outputs.iter().map(|o| o.name.clone()).collect();
            crate::engine::cache::key(&request.inputs, &names)
        });
        if let (Some(cache), Some(key)) = (&served.cache, &cache_key) {
            let hit = cache.get(key);
            self.metrics.record_cache(model, hit.is_some());
            if let Some(outputs) = hit {
                let mut parameters = serde_json::Map::new();
                parameters.insert("route".into(), Value::String(Route::Local.as_str().into()));
                let cached = InferResponse {
                    model_name: served.name.clone(),
                    model_version: served.version.clone(),
                    id: request.id,
                    parameters,
                    outputs,
                };
                return (Ok(cached), None);
            }
        }
        let original = upstream.as_ref().map(|_| request.clone());
        if let (Some((ov, policy)), Some(orig)) = (&upstream, &original) {
            let expected = ctx.received.elapsed() + served.estimated_latency();
            if let Some(reason) = router::before_run(served.queue_full(), expected, ov.slo(policy)) {
                if let Some(resp) = self.try_upstream((ov, policy), ctx, model, orig, reason, routing).await {
                    return (Ok(resp), None);
                }
            }
        }
        // A package's steps turn raw inputs into the model's (image decoding off the
        // runtime's threads).
        let model_inputs = match &served.package {
            None => Ok(request.inputs),
            Some(p) if p.heavy(&request.inputs) => {
                let (p, inputs) = (p.clone(), request.inputs);
                tokio::task::spawn_blocking(move || p.pre(inputs))
                    .await
                    .unwrap_or_else(|e| Err(format!("pre-processing failed: {e}")))
            }
            Some(p) => p.pre(request.inputs),
        };
        let model_inputs = match model_inputs {
            Ok(i) => i,
            Err(m) => return (Err(InferError::InvalidInput(m)), None),
        };
        let inputs = match served.model.validate(model_inputs) {
            Ok(i) => i,
            Err(RunError::InvalidInput(m)) => return (Err(InferError::InvalidInput(m)), None),
            Err(RunError::Engine(m)) => return (Err(InferError::Internal(m)), None),
        };
        // Requested outputs must exist before any work is queued.
        if !request.outputs.is_empty() {
            let known = served.output_names();
            if let Some(o) = request.outputs.iter().find(|o| !known.contains(&o.name)) {
                return (Err(InferError::InvalidInput(format!("unknown output '{}'", o.name))), None);
            }
        }
        // HTTP clients get 503 + Retry-After at once when the queue is full; MQTT requests wait
        // for a place until their deadline (their in-flight count is bounded by the broker), and
        // so do batch rows (one at a time).
        let wait = matches!(ctx.transport, Transport::Mqtt | Transport::Batch);
        let (result, run_time) = match served.call(inputs, ctx.deadline, wait, routing.alone).await {
            Ok(done) => done,
            Err(CallError::Refused(e)) => {
                if let (Some((ov, policy)), Some(orig), SubmitError::QueueFull(_)) = (&upstream, &original, &e) {
                    if routing.overflow.is_none() {
                        if let Some(resp) =
                            self.try_upstream((ov, policy), ctx, model, orig, Reason::QueueFull, routing).await
                        {
                            return (Ok(resp), None);
                        }
                    }
                }
                let refused = match e {
                    SubmitError::QueueFull(_) => InferError::Overloaded {
                        model: model.to_owned(),
                        reason: e.to_string(),
                        retry_after: retry_after(served),
                    },
                    SubmitError::Closed => InferError::NotReady(model.to_owned()),
                };
                return (Err(refused), None);
            }
            Err(CallError::DeadlineExceeded) => return (Err(InferError::DeadlineExceeded), None),
            Err(CallError::Stopped) => return (Err(InferError::Internal("inference worker stopped".into())), None),
        };
        let mut outputs = match result {
            Ok(o) => o,
            Err(e) => {
                let e = match e {
                    JobError::Expired => InferError::DeadlineExceeded,
                    JobError::QueueTimeout(_) => InferError::Overloaded {
                        model: model.to_owned(),
                        reason: e.to_string(),
                        retry_after: retry_after(served),
                    },
                    JobError::Run(RunError::InvalidInput(m)) => InferError::InvalidInput(m),
                    JobError::Run(RunError::Engine(m)) => InferError::Internal(m),
                };
                return (Err(e), Some(run_time));
            }
        };
        if let Some(p) = &served.package {
            outputs = match p.post(outputs) {
                Ok(o) => o,
                Err(m) => return (Err(InferError::Internal(format!("post-processing failed: {m}"))), Some(run_time)),
            };
        }
        if !request.outputs.is_empty() {
            outputs = request
                .outputs
                .iter()
                .filter_map(|o| outputs.iter().position(|t| t.name == o.name).map(|i| outputs[i].clone()))
                .collect();
        }
        if let (Some(cache), Some(key)) = (&served.cache, cache_key) {
            cache.put(key, &outputs);
        }
        let mut parameters = serde_json::Map::new();
        parameters.insert("route".into(), Value::String(Route::Local.as_str().into()));
        if let Some(f) = &routing.fallback {
            parameters.insert("overflow_fallback".into(), Value::String(f.clone()));
        }
        let local = InferResponse {
            model_name: served.name.clone(),
            model_version: served.version.clone(),
            id: request.id,
            parameters,
            outputs,
        };
        // Confidence escalation: a low-confidence local answer asks the target; its answer wins,
        // and the local one stands if the target fails.
        if let (Some((ov, policy)), Some(orig)) = (&upstream, &original) {
            let confidence = policy.confidence_output.as_ref().and_then(|o| crate::overflow::confidence(&local, o));
            if router::escalate(confidence, policy.confidence_min) {
                if let Some(resp) =
                    self.try_upstream((ov, policy), ctx, model, orig, Reason::LowConfidence, routing).await
                {
                    return (Ok(resp), Some(run_time));
                }
                let mut local = local;
                if let Some(f) = &routing.fallback {
                    local.parameters.insert("overflow_fallback".into(), Value::String(f.clone()));
                }
                return (Ok(local), Some(run_time));
            }
        }
        (Ok(local), Some(run_time))
    }
}

/// What routing a request gave: the answer, and the version that served it with its run time.
struct Routed {
    result: Result<InferResponse, InferError>,
    /// The version looked up to serve it (`None`: not served here), and its run's time.
    served_as: Option<(String, Option<Duration>)>,
}
