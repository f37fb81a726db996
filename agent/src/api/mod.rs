//! The one inference API every adapter calls (HTTP now; MQTT and overflow routing plug in
//! here). It owns the request path: look up the model, validate against its signature, queue,
//! wait within the deadline, select outputs, count, and report to the event sink.

pub mod control;
pub mod events;
pub mod repository;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use events::{Event, EventSink, LogSink, RequestOutcome};
pub use repository::{ModelState, ModelStatus, Repository, Verdict};

use crate::engine::{JobError, RunError, SubmitError};
use crate::protocol::{InferRequest, InferResponse};
use crate::telemetry::Metrics;

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Mqtt,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// Where a request was (or will be) answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
        }
    }
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
}

impl RequestContext {
    pub fn new(transport: Transport, timeout: Duration) -> Self {
        let now = Instant::now();
        RequestContext {
            id: next_request_id(),
            principal: "anonymous".to_owned(),
            transport,
            deadline: now + timeout,
            route: Route::Local,
            received: now,
        }
    }
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
}

impl InferenceService {
    pub fn new(repository: Arc<Repository>, metrics: Arc<Metrics>, events: Arc<dyn EventSink>) -> Self {
        InferenceService { repository, metrics, events, verdicts: None, privacy: None }
    }

    /// Runs one request end to end.
    pub async fn infer(
        &self,
        ctx: &RequestContext,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
    ) -> Result<InferResponse, InferError> {
        let (input_digest, parameters) = match &self.privacy {
            Some(p) => (p.digest_inputs(&request.inputs), p.pseudonymize(&request.parameters)),
            None => (String::new(), serde_json::Map::new()),
        };
        let mut served_as: Option<(String, Option<Duration>)> = None;
        let result = self.infer_inner(ctx, model, version, request, &mut served_as).await;
        let latency = ctx.received.elapsed();
        if let Some((v, run)) = &served_as {
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
        self.metrics.record_request(label, outcome.label(), latency);
        let recorded = self
            .events
            .record(Event::Request {
                ctx: ctx.clone(),
                model: model.to_owned(),
                version: served_version,
                outcome,
                latency,
                input_digest,
                parameters,
            })
            .await;
        // An answer whose record could not be kept is not given (fail closed).
        match recorded {
            Ok(()) => result,
            Err(e) => {
                self.metrics.record_audit_refusal();
                Err(InferError::Unavailable(format!("not answered: the audit record could not be kept ({e})")))
            }
        }
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

    async fn infer_inner(
        &self,
        ctx: &RequestContext,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
        served_as: &mut Option<(String, Option<Duration>)>,
    ) -> Result<InferResponse, InferError> {
        let served = self.repository.serving(model, version)?;
        *served_as = Some((served.version.clone(), None));
        let inputs = served.model.validate(request.inputs).map_err(|e| match e {
            RunError::InvalidInput(m) => InferError::InvalidInput(m),
            RunError::Engine(m) => InferError::Internal(m),
        })?;
        // Requested outputs must exist before any work is queued.
        for o in &request.outputs {
            if !served.model.signature.outputs.iter().any(|s| s.name == o.name) {
                return Err(InferError::InvalidInput(format!("unknown output '{}'", o.name)));
            }
        }
        // HTTP clients get 503 + Retry-After at once when the queue is full; MQTT requests wait
        // for a place until their deadline (their in-flight count is bounded by the broker).
        let wait = ctx.transport == Transport::Mqtt;
        let rx = served.submit(inputs, ctx.deadline, wait).await.map_err(|e| match e {
            SubmitError::QueueFull(_) => InferError::Overloaded {
                model: model.to_owned(),
                reason: e.to_string(),
                retry_after: Duration::from_secs(1),
            },
            SubmitError::Closed => InferError::NotReady(model.to_owned()),
        })?;
        let (result, run_time) = tokio::time::timeout_at(ctx.deadline.into(), rx)
            .await
            .map_err(|_| InferError::DeadlineExceeded)?
            .map_err(|_| InferError::Internal("inference worker stopped".into()))?;
        *served_as = Some((served.version.clone(), Some(run_time)));
        let mut outputs = result.map_err(|e| match e {
            JobError::Expired => InferError::DeadlineExceeded,
            JobError::Run(RunError::InvalidInput(m)) => InferError::InvalidInput(m),
            JobError::Run(RunError::Engine(m)) => InferError::Internal(m),
        })?;
        if !request.outputs.is_empty() {
            outputs = request
                .outputs
                .iter()
                .filter_map(|o| outputs.iter().position(|t| t.name == o.name).map(|i| outputs[i].clone()))
                .collect();
        }
        let mut parameters = serde_json::Map::new();
        parameters.insert("route".into(), Value::String(ctx.route.as_str().into()));
        Ok(InferResponse {
            model_name: served.name.clone(),
            model_version: served.version.clone(),
            id: request.id,
            parameters,
            outputs,
        })
    }
}
