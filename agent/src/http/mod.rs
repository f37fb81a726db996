//! The LAN HTTP adapter: Open Inference Protocol (KServe V2) REST over axum. A thin layer:
//! check access ([`crate::auth`]), decode the request, call [`InferenceService`], encode the
//! answer or `{"error": ...}`. [`server`] owns the sockets: TLS, connection limits, timeouts.

mod h2conn;
mod selfwake;
pub mod server;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::api::{InferError, InferenceService, ModelState, RequestContext, Transport};
use crate::auth::{Denial, Permission, Principal};
use crate::config::Config;
use crate::locks::RwLockExt;
use crate::protocol::json::{binary_outputs_wanted, encode_response, parse_binary_request, parse_request};

/// Shared state of the HTTP adapter, behind one reference count: handlers and the access layer
/// take it per request with one increment, not a dozen shared counters bounced between cores.
#[derive(Clone)]
pub struct HttpState(Arc<HttpShared>);

impl HttpState {
    pub fn new(shared: HttpShared) -> Self {
        HttpState(Arc::new(shared))
    }
}

impl std::ops::Deref for HttpState {
    type Target = HttpShared;
    fn deref(&self) -> &HttpShared {
        &self.0
    }
}

pub struct HttpShared {
    pub service: InferenceService,
    /// The live configuration; replaced atomically on reload.
    pub config: Arc<RwLock<Arc<Config>>>,
    /// True once the initial model load has finished.
    pub started: Arc<std::sync::atomic::AtomicBool>,
    /// Model administration (repository extension, rollback, registry poll).
    pub control: Arc<dyn crate::api::control::ModelControl>,
    pub started_at: std::time::Instant,
    /// Durability trace (test builds): replies are noted after their audit record is durable.
    pub trace: Option<Arc<crate::audit::Trace>>,
    /// Per-principal request budgets (`auth.rate_limit`).
    pub limiter: Arc<crate::auth::RateLimiter>,
    /// The audit log, when on: the agent is not ready while it refuses records.
    pub audit: Option<crate::audit::Audit>,
    /// Failed authentications per source address.
    pub failures: Arc<crate::auth::FailureGuard>,
    /// Batch jobs (`/v2/jobs`).
    pub jobs: Arc<crate::jobs::Jobs>,
}

impl HttpState {
    /// Records an administrative action in the audit log (best effort: the action happened).
    pub(crate) async fn audit_admin(&self, principal: &Principal, action: &str, target: &str, outcome: &str) {
        let _ = self
            .service
            .events
            .record(crate::api::Event::Admin {
                principal: principal.name.clone(),
                action: action.into(),
                target: target.into(),
                outcome: outcome.into(),
            })
            .await;
    }
}

impl HttpState {
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.read_locked().clone()
    }
}

/// An error answer: status, `{"error": message}`, and `Retry-After` when set.
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// The request's body was left unread: the connection cannot carry another request, so
    /// the answer says `Connection: close` (HTTP/1.1; HTTP/2 drops the header).
    pub close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), retry_after: None, close: false }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(d) = self.retry_after {
            let secs = d.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let status = match &e {
            InferError::ModelNotFound(_) | InferError::VersionNotFound { .. } => StatusCode::NOT_FOUND,
            InferError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            InferError::NotReady(_)
            | InferError::Overloaded { .. }
            | InferError::DeadlineExceeded
            | InferError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            InferError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry_after = match &e {
            InferError::Overloaded { retry_after, .. } => Some(*retry_after),
            InferError::NotReady(_) | InferError::DeadlineExceeded => Some(Duration::from_secs(1)),
            InferError::Unavailable(_) => Some(Duration::from_secs(30)),
            _ => None,
        };
        ApiError { status, message: e.to_string(), retry_after, close: false }
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_version_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_version_ready))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_version_config))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(model_version_stats))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route("/v2/repository/models/{model}/unload", post(repository_unload))
        .route("/admin/models/{model}/rollback", post(admin_rollback))
        .route("/admin/registry/poll", post(admin_poll))
        .route("/admin/status", get(admin_status))
        .route("/admin/experiments/{model}", get(admin_experiment))
        .route("/admin/audit/export", get(admin_audit_export))
        .route("/admin/privacy/rotate", post(admin_privacy_rotate))
        .route("/admin/ha/role", post(admin_ha_role))
        .route("/v2/jobs", post(job_submit).get(job_list))
        .route("/v2/jobs/{id}", get(job_get))
        .route("/v2/jobs/{id}/cancel", post(job_cancel))
        .route("/v2/jobs/{id}/output", get(job_output))
        .route("/admin/privacy/forget", post(admin_privacy_forget))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), access))
        .with_state(state)
}

/// Why [`HttpState::admit`] refused a caller.
#[derive(Debug)]
pub enum Refusal {
    /// The source keeps failing to authenticate: refused before its credentials are read.
    SourceBlocked { message: String, retry_after: Duration },
    /// No credentials, or credentials that match nothing.
    Unauthenticated(String),
    /// A known principal without the role or model.
    Forbidden(String),
    /// Over `auth.rate_limit`.
    RateLimited { message: String, retry_after: Duration },
}

impl HttpState {
    /// Access control for every transport that takes requests from the LAN (HTTP, gRPC):
    /// authenticates the caller from its `Authorization` value (header or gRPC metadata) and
    /// client certificate, checks the role matrix and the rate limit, counts and records each
    /// refusal. Without `[auth]` (loopback only) everyone is `anonymous` with every role.
    pub async fn admit(
        &self,
        permission: &Permission,
        authorization: Option<&[u8]>,
        peer: Option<&server::Peer>,
        path: &str,
        transport: &str,
    ) -> Result<Principal, Refusal> {
        let config = self.config();
        let Some(auth) = &config.auth else {
            return Ok(Principal::anonymous());
        };
        if *permission == Permission::Public {
            return Ok(Principal { name: "anonymous".into(), roles: Vec::new(), models: None });
        }
        let source = peer.map(|p| p.addr.ip());
        let from = source.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        if let Some(wait) = source.and_then(|ip| self.failures.admit(ip).err()) {
            self.service.metrics.record_access_denied("source_blocked");
            return Err(Refusal::SourceBlocked {
                message: format!("too many failed authentications from {from}: try again later"),
                retry_after: wait,
            });
        }
        let cert_names = peer.map(|p| p.cert_names.clone()).unwrap_or_default();
        let outcome = crate::auth::authenticate(auth, authorization, &cert_names)
            .and_then(|p| crate::auth::authorize(&p, permission).map(|()| p));
        let principal = match outcome {
            Ok(p) => p,
            Err(denial) => {
                let (kind, who) = match &denial {
                    Denial::Unauthenticated(_) => ("unauthenticated", "unauthenticated".to_owned()),
                    Denial::Forbidden { principal, .. } => ("forbidden", principal.clone()),
                };
                self.service.metrics.record_access_denied(kind);
                // Each source's first failed authentication of a window in full, the rest in
                // its summary; a refusal for a role is recorded in full.
                let unauthenticated = matches!(denial, Denial::Unauthenticated(_));
                if !unauthenticated || source.is_none_or(|ip| self.failures.failed(ip)) {
                    tracing::warn!(principal = %who, from = %from, path = %path, transport, reason = %denial, "access denied");
                    let _ = self
                        .service
                        .events
                        .record(crate::api::Event::AuthFailure {
                            principal: who,
                            transport: transport.into(),
                            reason: format!("{denial} (from {from})"),
                            path: path.chars().take(256).collect(),
                            count: 1,
                        })
                        .await;
                }
                return Err(match denial {
                    Denial::Unauthenticated(m) => Refusal::Unauthenticated(m),
                    Denial::Forbidden { message, .. } => Refusal::Forbidden(message),
                });
            }
        };
        if let Some(rate) = auth.rate_limit {
            if let Err(wait) = self.limiter.check(&principal.name, rate, auth.rate_burst) {
                self.service.metrics.record_access_denied("rate_limited");
                return Err(Refusal::RateLimited {
                    message: format!("{} is over its rate limit", principal.name),
                    retry_after: wait,
                });
            }
        }
        Ok(principal)
    }
}

/// Access control in front of every route (and the fallback): [`HttpState::admit`], then the
/// [`Principal`] goes to the handler.
async fn access(State(s): State<HttpState>, mut req: Request, next: Next) -> Response {
    let permission = crate::auth::required(req.method().as_str(), req.uri().path());
    let peer = req.extensions().get::<server::Peer>().cloned();
    let authorization = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let path = req.uri().path().to_owned();
    match s.admit(&permission, authorization.as_deref(), peer.as_ref(), &path, "http").await {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(refusal) => {
            let (mut e, cap) = match refusal {
                Refusal::SourceBlocked { message, retry_after } => {
                    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, message);
                    e.retry_after = Some(retry_after);
                    (e, UNAUTHENTICATED_DRAIN_CAP)
                }
                Refusal::Unauthenticated(m) => (ApiError::new(StatusCode::UNAUTHORIZED, m), UNAUTHENTICATED_DRAIN_CAP),
                Refusal::Forbidden(m) => (ApiError::new(StatusCode::FORBIDDEN, m), UNAUTHENTICATED_DRAIN_CAP),
                Refusal::RateLimited { message, retry_after } => {
                    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, message);
                    e.retry_after = Some(retry_after);
                    (e, DRAIN_CAP)
                }
            };
            let unauthorized = e.status == StatusCode::UNAUTHORIZED;
            e.close = !finish_body_of(req, cap).await;
            let mut resp = e.into_response();
            if unauthorized {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"outpost\""));
            }
            resp
        }
    }
}

async fn not_found(State(s): State<HttpState>, req: Request) -> ApiError {
    s.service.metrics.record_http_error();
    let mut e = ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {}", req.uri().path()));
    e.close = !finish_body_of(req, DRAIN_CAP).await;
    e
}

async fn method_not_allowed(State(s): State<HttpState>, req: Request) -> ApiError {
    s.service.metrics.record_http_error();
    let mut e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} not allowed on {}", req.method(), req.uri().path()),
    );
    e.close = !finish_body_of(req, DRAIN_CAP).await;
    e
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

/// Why the agent cannot answer inference requests now, if it cannot.
pub(crate) fn not_ready(s: &HttpState) -> Option<String> {
    if !s.started.load(std::sync::atomic::Ordering::SeqCst) {
        return Some("models are still loading".into());
    }
    if s.service.repository.ready_count() == 0 {
        return Some("no model is serving".into());
    }
    let refusing = s.audit.as_ref().and_then(crate::audit::Audit::refusing)?;
    Some(format!("the audit log refuses records, so inference is refused (fail closed): {refusing}"))
}

async fn ready(State(s): State<HttpState>) -> Response {
    match not_ready(&s) {
        None => axum::Json(json!({ "ready": true })).into_response(),
        Some(why) => {
            let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"));
            e.retry_after = Some(Duration::from_secs(1));
            e.into_response()
        }
    }
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "outpost",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": crate::api::triton::EXTENSIONS,
    }))
    .into_response()
}

fn metadata(s: &HttpState, model: &str, version: Option<&str>) -> Result<Response, ApiError> {
    let spec = |(name, datatype, shape): &crate::engine::package::Spec| json!({ "name": name, "datatype": datatype.as_str(), "shape": shape });
    if let Some(p) = s.service.pipelines.get(model) {
        let (inputs, outputs) = p.io(&s.service.repository);
        return Ok(axum::Json(json!({
            "name": p.name,
            "versions": [p.version],
            "platform": "pipeline",
            "inputs": inputs.iter().map(spec).collect::<Vec<_>>(),
            "outputs": outputs.iter().map(spec).collect::<Vec<_>>(),
            "parameters": { "steps": p.describe() },
        }))
        .into_response());
    }
    let served = s.service.repository.serving(model, version)?;
    let (inputs, outputs) = served.io();
    Ok(axum::Json(json!({
        "name": served.name,
        "versions": s.service.repository.versions(model),
        "platform": "onnx",
        "inputs": inputs.iter().map(spec).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(spec).collect::<Vec<_>>(),
        // Outpost's own: how this version runs (the plan chooser's verdict, batching).
        "parameters": serving_parameters(&served),
    }))
    .into_response())
}

/// The plan the loader chose (and every candidate it tried), and the batching in effect.
fn serving_parameters(served: &crate::engine::Served) -> Value {
    let candidates: Vec<Value> = served
        .model
        .candidates
        .iter()
        .map(|c| match &c.outcome {
            Ok(t) => json!({ "plan": c.variant.as_str(), "median_us": t.as_micros() as u64 }),
            Err(e) => json!({ "plan": c.variant.as_str(), "rejected": e }),
        })
        .collect();
    let runs = served.stats.runs.load(std::sync::atomic::Ordering::Relaxed);
    let rows = served.stats.rows.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "plan": served.model.variant.as_str(),
        "plan_shapes": if served.model.symbolic() { "symbolic" } else { "concrete" },
        "plan_candidates": candidates,
        "max_batch": served.batching.as_ref().map_or(1, |b| b.max_batch),
        "batching_off": served.model.rows_depend,
        "max_queue_delay_us": served.batching.as_ref().map_or(0, |b| b.max_delay.as_micros() as u64),
        "preferred_batch": served.batching.as_ref().map(|b| b.preferred.clone()).unwrap_or_default(),
        "batch_sizes": served.batching.as_ref().map(|b| b.sizes.clone()).unwrap_or_default(),
        "plans": served.model.plan_shapes(),
        "intra_op_threads": served.threads_per_run,
        "split_runs": served.stats.split_runs.load(std::sync::atomic::Ordering::Relaxed),
        "led_runs": served.stats.led_runs.load(std::sync::atomic::Ordering::Relaxed),
        "run_us": served.run_us(),
        "slot_wait_us": served.stats.slot_wait_us(),
        "runs": runs,
        "abandoned": served.stats.abandoned.load(std::sync::atomic::Ordering::Relaxed),
        "mean_batch_rows": if runs == 0 { 0.0 } else { rows as f64 / runs as f64 },
    })
}

/// Triton's model configuration extension.
fn config_of(s: &HttpState, model: &str, version: Option<&str>) -> Result<Response, ApiError> {
    let config = crate::api::triton::config_for(&s.service, model, version)?;
    Ok(axum::Json(crate::api::triton::model_config_json(&config)).into_response())
}

async fn model_config(State(s): State<HttpState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    config_of(&s, &model, None)
}

async fn model_version_config(
    State(s): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    config_of(&s, &model, Some(&version))
}

/// Triton's statistics extension.
fn stats_of(s: &HttpState, model: &str, version: Option<&str>) -> Result<Response, ApiError> {
    let stats = crate::api::triton::statistics(&s.service, model, version)?;
    Ok(axum::Json(crate::api::triton::statistics_json(&stats)).into_response())
}

async fn all_stats(State(s): State<HttpState>) -> Result<Response, ApiError> {
    stats_of(&s, "", None)
}

async fn model_stats(State(s): State<HttpState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    stats_of(&s, &model, None)
}

async fn model_version_stats(
    State(s): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    stats_of(&s, &model, Some(&version))
}

async fn model_metadata(State(s): State<HttpState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    metadata(&s, &model, None)
}

async fn model_version_metadata(
    State(s): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    metadata(&s, &model, Some(&version))
}

fn readiness(s: &HttpState, model: &str, version: Option<&str>) -> Result<Response, ApiError> {
    // A pipeline is ready when every model it may call serves.
    if let Some(p) = s.service.pipelines.get(model) {
        p.ready(&s.service.repository).map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
        return Ok(axum::Json(json!({ "name": p.name, "version": p.version, "ready": true })).into_response());
    }
    match s.service.repository.serving(model, version) {
        Ok(served) => {
            Ok(axum::Json(json!({ "name": served.name, "version": served.version, "ready": true })).into_response())
        }
        Err(InferError::NotReady(_)) => {
            let reason =
                s.service.repository.status(model).and_then(|st| st.reason).unwrap_or_else(|| "loading".into());
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("model '{model}' is not ready: {reason}")))
        }
        Err(e) => Err(e.into()),
    }
}

async fn model_ready(State(s): State<HttpState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    readiness(&s, &model, None)
}

async fn model_version_ready(
    State(s): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    readiness(&s, &model, Some(&version))
}

/// How much of an oversized body is read and dropped before answering 413, so that clients that
/// write the whole body before reading (most do) see the answer instead of a reset connection.
const DRAIN_CAP: u64 = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// As [`DRAIN_CAP`], for a caller refused before authenticating: a larger body is not read,
/// the connection closes instead.
const UNAUTHENTICATED_DRAIN_CAP: u64 = 64 << 10;

/// Reads a body up to `limit` bytes; over the limit is 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large =
        || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {limit} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        let mut e = too_large();
        // A client waiting for `100 Continue` is answered at once and sends nothing more; one
        // already writing its body has it read and dropped (bounded), so that it sees the
        // answer instead of a reset connection.
        e.close = !finish_body(headers, body, DRAIN_CAP).await;
        return Err(e);
    }
    let mut body = body;
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                let mut e = too_large();
                // Already sending (past any `100 Continue`): drained so that it sees the answer.
                e.close = !finish_body(&HeaderMap::new(), body, DRAIN_CAP).await;
                return Err(e);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

/// [`finish_body`] for a whole request.
async fn finish_body_of(req: Request, cap: u64) -> bool {
    let (parts, body) = req.into_parts();
    finish_body(&parts.headers, body, cap).await
}

/// Whether the client waits for `100 Continue` before sending its body.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// Reads and drops what is left of a body a handler will not use, bounded in bytes and time,
/// so that the connection can carry the next request (HTTP/1.1) and the client sees its
/// stream end normally (HTTP/2). False when the body was not read to its end: the connection
/// is then closed after the answer.
async fn finish_body(headers: &HeaderMap, mut body: Body, cap: u64) -> bool {
    // A client waiting for `100 Continue` has sent nothing yet: reading would invite the body.
    if expects_continue(headers) {
        return false;
    }
    tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0u64;
        loop {
            match body.frame().await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        seen += data.len() as u64;
                        if seen > cap {
                            return false;
                        }
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false)
}

async fn infer(State(s): State<HttpState>, Path(model): Path<String>, req: Request) -> Result<Response, ApiError> {
    run_infer(s, model, None, req).await
}

async fn infer_version(
    State(s): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    run_infer(s, model, Some(version), req).await
}

async fn run_infer(s: HttpState, model: String, version: Option<String>, req: Request) -> Result<Response, ApiError> {
    let config = s.config();
    let (parts, body) = req.into_parts();
    let count_rejection = |e: ApiError| {
        s.service.metrics.record_http_error();
        e
    };
    // Slow senders are cut off: the whole body must arrive within the request timeout.
    let bytes =
        tokio::time::timeout(config.http.request_timeout, read_body(&parts.headers, body, config.http.max_body_bytes))
            .await
            .map_err(|_| {
                count_rejection(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"))
            })?
            .map_err(count_rejection)?;
    // Treated as JSON unless the Content-Type names a raw input (tritonclient sends none), with a binary
    // section when the binary tensor extension's header says where the JSON ends.
    let header_len = match parts.headers.get("inference-header-content-length") {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| {
            count_rejection(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Inference-Header-Content-Length must be a byte count",
            ))
        })?),
    };
    // An image, a text or a CSV line sent as it is (its own content type, no binary tensor
    // header) is the raw input of a model package.
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let raw = header_len.is_none() && s.service.is_raw(&model, version.as_deref(), content_type);
    let request = if raw {
        s.service.raw_request(&model, version.as_deref(), bytes.to_vec()).map_err(|e| count_rejection(e.into()))?
    } else {
        match header_len {
            Some(n) => parse_binary_request(&bytes, n),
            None => parse_request(&bytes),
        }
        .map_err(|e| count_rejection(ApiError::new(StatusCode::BAD_REQUEST, e.to_string())))?
    };
    let binary = binary_outputs_wanted(&request);
    let mut ctx = RequestContext::new(Transport::Http, config.http.request_timeout);
    if let Some(p) = parts.extensions.get::<Principal>() {
        ctx.principal.clone_from(&p.name);
    }
    if let Some(id) = &request.id {
        ctx.id = id.clone();
    }
    if version.is_none() {
        if let Some(h) =
            config.models.get(&model).and_then(|m| m.experiment.as_ref()).and_then(|e| e.key_header.as_ref())
        {
            ctx.experiment_key =
                parts.headers.get(h.as_str()).and_then(|v| v.to_str().ok()).map(|v| v.chars().take(256).collect());
        }
    }
    let response = s.service.infer(&ctx, &model, version.as_deref(), request).await?;
    if let Some(t) = &s.trace {
        t.note(format!("reply {}", ctx.id));
    }
    let (body, header_len) = encode_response(&response, binary);
    Ok(match header_len {
        None => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response(),
        Some(n) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
                (HeaderName::from_static("inference-header-content-length"), HeaderValue::from(n)),
            ],
            body,
        )
            .into_response(),
    })
}

async fn repository_index(State(s): State<HttpState>) -> Response {
    let models: Vec<_> = s
        .service
        .repository
        .list()
        .into_iter()
        .map(|(name, status, _)| {
            let mut m = json!({ "name": name, "state": status.state.as_str() });
            if let Some(v) = status.version {
                m["version"] = json!(v);
            }
            if let Some(r) = status.reason {
                m["reason"] = json!(r);
            }
            m
        })
        .collect();
    axum::Json(models).into_response()
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), the text format 0.0.4
/// otherwise.
async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let text = s.service.render_metrics();
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        let kind = HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
        ([(header::CONTENT_TYPE, kind)], text).into_response()
    } else {
        let kind = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
        ([(header::CONTENT_TYPE, kind)], crate::telemetry::to_text_format(&text)).into_response()
    }
}

fn control_error(e: crate::api::control::ControlError) -> ApiError {
    use crate::api::control::ControlError;
    match e {
        ControlError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, format!("unknown model '{m}'")),
        ControlError::Failed(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
        ControlError::Unavailable(m) => {
            let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m);
            e.retry_after = Some(Duration::from_secs(1));
            e
        }
    }
}

/// A model administration action: run it, audit it with its outcome, answer `{"result"}`.
async fn model_action(
    s: &HttpState,
    principal: &Principal,
    action: &str,
    model: &str,
    result: Result<String, crate::api::control::ControlError>,
) -> Result<Response, ApiError> {
    s.audit_admin(principal, action, model, &result.as_ref().map_or_else(|e| e.to_string(), Clone::clone)).await;
    let msg = result.map_err(control_error)?;
    Ok(axum::Json(json!({ "result": msg })).into_response())
}

async fn repository_load(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let result = s.control.load(model.clone()).await;
    model_action(&s, &principal, "load", &model, result).await
}

async fn repository_unload(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let result = s.control.unload(model.clone()).await;
    model_action(&s, &principal, "unload", &model, result).await
}

async fn admin_rollback(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let result = s.control.rollback(model.clone()).await;
    model_action(&s, &principal, "rollback", &model, result).await
}

async fn admin_poll(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    let result = s.control.poll().await;
    let outcome = result.as_ref().map_or_else(|e| e.to_string(), |_| "polled".to_owned());
    s.audit_admin(&principal, "registry_poll", "registry", &outcome).await;
    let report = result.map_err(control_error)?;
    Ok(axum::Json(report).into_response())
}

/// An A/B experiment's variants and what their requests did.
async fn admin_experiment(State(s): State<HttpState>, Path(model): Path<String>) -> Response {
    let (experiment, shadow) = (s.service.experiment(&model), s.service.shadow(&model));
    if experiment.is_none() && shadow.is_none() {
        return ApiError::new(StatusCode::NOT_FOUND, format!("model '{model}' runs no experiment and no shadow"))
            .into_response();
    }
    let mut report = match &experiment {
        Some(e) => s.service.experiments.report(&model, e),
        None => json!({ "model": model }),
    };
    if let Some(sh) = shadow {
        report["shadow"] = s.service.shadows.report(&model, &sh.version);
        report["shadow"]["share"] = json!(sh.share);
    }
    axum::Json(report).into_response()
}

/// The agent at a glance: identity, uptime, every model with its versions, canary and queue.
async fn admin_status(State(s): State<HttpState>) -> Response {
    let cfg = s.config();
    let repo = &s.service.repository;
    let traffic = s.service.metrics.summaries();
    let models: Vec<_> = repo
        .list()
        .into_iter()
        .map(|(name, status, served)| {
            let t = traffic.get(&name);
            json!({
                "name": name,
                "state": status.state.as_str(),
                "version": status.version,
                "plan": served.as_ref().map(|x| x.model.variant.as_str()),
                "requests": t.map_or(0, |t| t.requests),
                "rate_per_s": t.map_or(0.0, |t| t.rate_per_s),
                "p99_ms": t.and_then(|t| t.p99_ms),
                "versions": repo.versions(&name),
                "canary": repo.canary_version(&name),
                "queue_depth": served.as_ref().map_or(0, |x| x.queue_depth()),
                "serving": served.as_ref().map(|x| serving_parameters(x)),
                "reason": status.reason,
            })
        })
        .collect();
    let all_ready = models.iter().all(|m| m["state"] == ModelState::Ready.as_str());
    let not_ready = not_ready(&s);
    axum::Json(json!({
        "node": cfg.node.name,
        "site": cfg.node.site,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started_at.elapsed().as_secs(),
        "ready": not_ready.is_none(),
        "not_ready_reason": not_ready,
        "all_models_ready": all_ready,
        "models": models,
        "overflow": s.service.overflow.as_ref().map(|ov| json!({
            "url": ov.config.url,
            "breaker": ov.breaker.state().as_str(),
            "opened": ov.breaker.opened.load(std::sync::atomic::Ordering::Relaxed),
        })),
        "alarms": s.service.metrics.alarms(),
        "upstream": cfg.upstream.as_ref().map(|u| json!({
            "urls": u.urls,
            "audit_backlog_records": s.service.metrics.gauge("audit_backlog_records"),
            "telemetry_backlog_bytes": s.service.metrics.gauge("telemetry_backlog_bytes"),
            "last_success_at": s.service.metrics.gauge("upstream_last_success_timestamp_seconds"),
        })),
        "mqtt": cfg.mqtt.as_ref().map(|m| json!({
            "broker": format!("{}:{}", m.host, m.port),
            "connected": s.service.metrics.gauge("mqtt_connected").map(|v| v > 0.0),
        })),
        "registry": cfg.registry.as_ref().map(|r| {
            let mut v = s.service.metrics.section("registry").unwrap_or_else(|| json!({ "url": r.url }));
            v["last_success_at"] = json!(s.service.metrics.gauge("registry_last_success_timestamp_seconds"));
            v["download"] = s.service.metrics.section("download").unwrap_or(Value::Null);
            v
        }),
        "reload": s.service.metrics.section("reload"),
        "webhooks": s.service.metrics.section("webhooks"),
        "compliance": s.service.metrics.section("compliance"),
        "ha": s.service.metrics.section("ha"),
        "verdicts": s.service.metrics.section("verdicts"),
        "jobs": s.jobs.active(),
        "pipelines": s.service.pipelines.list().iter().map(|p| json!({
            "name": p.name, "version": p.version, "models": p.models(), "steps": p.describe(),
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// The LAN status page: one self-contained HTML page (no external asset) that shows what
/// `outpost status` shows, from `/admin/status` under the box's auth (mTLS, or a token typed
/// once and kept by the browser). It carries no data itself, so it is served to anyone.
const STATUS_PAGE: &str = include_str!("status.html");

/// The Content-Security-Policy of the page: its one inline script by hash, its inline style,
/// fetches to this origin only.
fn status_page_csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let script = STATUS_PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'self' data:; form-action 'none'; frame-ancestors 'none'"
        )
    })
}

async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        [(header::CONTENT_SECURITY_POLICY, status_page_csp())],
        STATUS_PAGE,
    )
        .into_response()
}

/// Largest audit export one request returns; narrow `since` for more.
const EXPORT_CAP: usize = 64 << 20;

#[derive(serde::Deserialize)]
struct ExportQuery {
    /// RFC 3339 UTC time, or a duration back from now ("1h"); default: everything kept.
    since: Option<String>,
}

/// The audit log as NDJSON (`outpost audit export` over HTTP), admin only; audited itself.
async fn admin_audit_export(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    axum::extract::Query(q): axum::extract::Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let config = s.config();
    if config.audit.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "the audit log is off ([audit] enabled = false)"));
    }
    let since_ms = match q.since.as_deref() {
        None => 0,
        Some(t) => crate::config::parse_time_arg(t)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("since: {e}")))?,
    };
    let dir = config.node.state_dir.join("audit");
    let result = tokio::task::spawn_blocking(move || {
        let mut out = CappedBuf(Vec::new());
        crate::audit::export(&dir, since_ms, &mut out).map(|n| (n, out.0))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let outcome = result.as_ref().map_or_else(|e| e.clone(), |(n, _)| format!("{n} records"));
    s.audit_admin(&principal, "audit_export", "audit", &outcome).await;
    let (_, body) = result.map_err(|e| {
        if e.contains("export cap") {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("more than {EXPORT_CAP} bytes: narrow 'since'"))
        } else {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)
        }
    })?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))], body).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JobQuery {
    model: String,
    version: Option<String>,
    format: Option<String>,
}

/// The largest batch input taken (bytes).
pub const MAX_JOB_INPUT_BYTES: u64 = 1 << 30;

/// A batch job: the body (NDJSON or CSV rows) is streamed to disk, then queued (admin).
async fn job_submit(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    axum::extract::Query(q): axum::extract::Query<JobQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let format = match q.format.as_deref().unwrap_or("ndjson") {
        "ndjson" => crate::jobs::Format::Ndjson,
        "csv" => crate::jobs::Format::Csv,
        other => return Err(bad(format!("format '{other}': ndjson or csv"))),
    };
    if !crate::config::valid_name(&q.model) {
        return Err(bad(format!("model '{}': 1-128 of [A-Za-z0-9._-]", q.model.chars().take(128).collect::<String>())));
    }
    // A model or a pipeline.
    if s.service.pipelines.get(&q.model).is_none() {
        s.service.repository.serving(&q.model, q.version.as_deref()).map_err(ApiError::from)?;
    }
    let unavailable = |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e);
    let mut upload = crate::jobs::Uploading::start(&s.jobs, MAX_JOB_INPUT_BYTES).map_err(unavailable)?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad(format!("the upload ended early: {e}")))?;
        if let Ok(data) = frame.into_data() {
            upload.push(&data).map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e))?;
        }
    }
    let upload = upload.finish().map_err(unavailable)?;
    let job = s.jobs.submit(upload, &q.model, q.version, format, &principal.name).map_err(unavailable)?;
    s.audit_admin(
        &principal,
        "batch_submit",
        &format!("{} on {}", job.id, job.model),
        &format!("{} rows queued", job.rows),
    )
    .await;
    Ok((StatusCode::CREATED, axum::Json(s.jobs.status(&job))).into_response())
}

async fn job_list(State(s): State<HttpState>) -> Response {
    let jobs: Vec<Value> = s.jobs.list().iter().map(|j| s.jobs.status(j)).collect();
    axum::Json(json!({ "jobs": jobs })).into_response()
}

fn job_of(s: &HttpState, id: &str) -> Result<crate::jobs::Job, ApiError> {
    s.jobs.get(id).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("no job '{}'", id.chars().take(32).collect::<String>()))
    })
}

async fn job_get(State(s): State<HttpState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let job = job_of(&s, &id)?;
    Ok(axum::Json(s.jobs.status(&job)).into_response())
}

async fn job_cancel(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    job_of(&s, &id)?;
    let cancelled = s.jobs.cancel(&id).map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let outcome = if cancelled { "cancelled" } else { "had already ended" };
    s.audit_admin(&principal, "batch_cancel", &id, outcome).await;
    Ok(axum::Json(json!({ "id": id, "cancelled": cancelled })).into_response())
}

/// The rows answered so far, one NDJSON line each, in row order (streamed from the file).
async fn job_output(State(s): State<HttpState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    use tokio::io::AsyncReadExt as _;
    job_of(&s, &id)?;
    let len = s.jobs.output_len(&id);
    let body = match tokio::fs::File::open(s.jobs.output_path(&id)).await {
        Ok(file) => Body::from_stream(tokio_util::io::ReaderStream::new(file.take(len))),
        Err(_) => Body::empty(),
    };
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HaReport {
    instance: String,
    state: String,
    priority: Option<u32>,
}

/// The VRRP role keepalived gave this box (from its notify hook, `outpost ha-notify`).
async fn admin_ha_role(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let bad = |e: String| ApiError::new(StatusCode::BAD_REQUEST, e);
    let r: HaReport = serde_json::from_slice(&body).map_err(|e| bad(format!("a role report: {e}")))?;
    let role = crate::ha::Role::new(&r.instance, &r.state, r.priority).map_err(bad)?;
    let state_dir = s.config().node.state_dir.clone();
    crate::ha::report(&s.service, &state_dir, role.clone(), &principal.name).await.map_err(|e| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("role shown, but not recorded in the audit log: {e}"))
    })?;
    Ok(axum::Json(role.status()).into_response())
}

#[derive(serde::Deserialize)]
struct ForgetQuery {
    /// Key epochs that ended before this are destroyed (`now`, RFC 3339, or how long ago).
    before: String,
}

/// The pseudonymization key epochs, or 404 when the agent keeps none.
fn key_epochs(s: &HttpState) -> Result<&crate::privacy::epochs::Epochs, ApiError> {
    s.service
        .privacy
        .as_deref()
        .and_then(|p| p.epochs())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "this agent keeps no pseudonymization key epochs"))
}

/// Records a privacy act in the audit log; the answer says when it could not be recorded.
async fn audit_privacy(s: &HttpState, principal: &Principal, action: &str, outcome: &str) -> Result<(), ApiError> {
    let event = crate::api::Event::Admin {
        principal: principal.name.clone(),
        action: action.into(),
        target: "pseudonymization keys".into(),
        outcome: outcome.into(),
    };
    s.service.events.record(event).await.map_err(|e| {
        let mut err = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{outcome}, but the audit record of it could not be kept: {e}"),
        );
        err.retry_after = Some(Duration::from_secs(5));
        err
    })
}

/// Ends the current pseudonymization key epoch now and starts the next (admin).
async fn admin_privacy_rotate(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    let epochs = key_epochs(&s)?;
    let (ended, started) = epochs.rotate().map_err(|e| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the next key epoch could not be kept: {e}"))
    })?;
    let outcome = format!("key epoch {ended} ended, {started} started");
    audit_privacy(&s, &principal, "key_rotate", &outcome).await?;
    Ok(axum::Json(json!({ "ended": ended, "started": started })).into_response())
}

/// Destroys the pseudonymization keys of the epochs that ended before `before` (admin):
/// crypto-shredding, recorded in the audit log.
async fn admin_privacy_forget(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    axum::extract::Query(q): axum::extract::Query<ForgetQuery>,
) -> Result<Response, ApiError> {
    let epochs = key_epochs(&s)?;
    let before_ms = crate::config::parse_time_arg(&q.before)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("before: {e}")))?;
    let destroyed = epochs.forget(before_ms).map_err(|e| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the key epochs could not be destroyed: {e}"))
    })?;
    let ids: Vec<u64> = destroyed.iter().map(|d| d.id).collect();
    let outcome = match ids.as_slice() {
        [] => format!("no key epoch ended before {}", outpost_proto::registry::format_time(before_ms / 1000)),
        _ => format!(
            "destroyed the keys of epochs {ids:?} (ended before {})",
            outpost_proto::registry::format_time(before_ms / 1000)
        ),
    };
    audit_privacy(&s, &principal, "forget", &outcome).await?;
    let list: Vec<Value> = destroyed
        .iter()
        .map(|d| {
            json!({
                "epoch": d.id,
                "start": outpost_proto::registry::format_time(d.start_ms / 1000),
                "end": outpost_proto::registry::format_time(d.end_ms / 1000),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "destroyed": list })).into_response())
}

struct CappedBuf(Vec<u8>);

impl std::io::Write for CappedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + data.len() > EXPORT_CAP {
            return Err(std::io::Error::other("export cap reached"));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
