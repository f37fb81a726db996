//! Overflow to the data-centre tier (DESIGN §8): a V2 client for one overflow target (any Open
//! Inference Protocol server: Triton, KServe, MLServer, another Outpost), guarded by a circuit
//! breaker. The router that decides local or upstream per request is in
//! [`crate::api::InferenceService`]; this module only says whether the target may be tried and
//! carries the request there.

pub mod breaker;

use crate::tls::TlsError;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use breaker::{Admission, Breaker, BreakerState};

pub use crate::config::{ModelOverflow, OverflowConfig, OverflowMode};
use crate::protocol::json::{encode_request, parse_response};
use crate::protocol::{InferRequest, InferResponse};

/// Why a request went (or tried to go) upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RemoteOnly,
    Slo,
    QueueFull,
    LowConfidence,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RemoteOnly => "remote_only",
            Reason::Slo => "slo",
            Reason::QueueFull => "queue_full",
            Reason::LowConfidence => "low_confidence",
        }
    }
}

/// An upstream attempt that did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Transport failures, timeouts, 5xx and 429: the target is unwell (counts against the
    /// breaker).
    #[error("overflow target failed: {0}")]
    Failed(String),
    /// The target refused this request (4xx): not its health, but no answer either.
    #[error("overflow target refused the request: {0}")]
    Refused(String),
    /// Residency: the target's host is not allowed.
    #[error("overflow target {0} is not on the residency allow-list")]
    Residency(String),
}

/// The overflow target: client, breaker and counters.
pub struct Overflow {
    pub config: OverflowConfig,
    client: reqwest::Client,
    token: Option<String>,
    pub breaker: Breaker,
    privacy: Option<Arc<crate::privacy::Privacy>>,
}

impl Overflow {
    pub fn new(config: OverflowConfig, privacy: Option<Arc<crate::privacy::Privacy>>) -> Result<Overflow, TlsError> {
        crate::tls::install_crypto_provider();
        let mut builder = crate::tls::outbound(
            reqwest::Client::builder(),
            "overflow",
            privacy.as_ref().and_then(|p| p.guard.clone()),
        )
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true);
        if let Some(ca) = &config.ca {
            builder = crate::tls::add_roots(builder, ca, "overflow.ca")?;
        }
        if let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) {
            builder = crate::tls::add_identity(builder, cert, key, ("overflow.client_cert", "overflow.client_key"))?;
        }
        let client = builder.build().map_err(|source| TlsError::Client { setting: "overflow", source })?;
        let token =
            config.token_file.as_deref().map(|p| crate::tls::read_token(p, "overflow.token_file")).transpose()?;
        let breaker = Breaker::new(config.failure_threshold, config.failure_window, config.open_for);
        Ok(Overflow { config, client, token, breaker, privacy })
    }

    /// The latency objective of `model`.
    pub fn slo(&self, policy: &ModelOverflow) -> Duration {
        policy.slo_p99.unwrap_or(self.config.slo_p99)
    }

    /// Sends `request` (inputs as given, `parameters` already pseudonymized by the caller) to
    /// the target before `deadline`. The breaker outcome is recorded through `admission`.
    pub async fn infer(
        &self,
        admission: Admission<'_>,
        model: &str,
        policy: &ModelOverflow,
        request: &InferRequest,
        deadline: Instant,
    ) -> Result<InferResponse, UpstreamError> {
        if self.privacy.as_ref().is_some_and(|p| !p.host_allowed(&self.config.host)) {
            admission.neutral();
            return Err(UpstreamError::Residency(self.config.host.clone()));
        }
        let remote = policy.remote_model.as_deref().unwrap_or(model);
        let url = match &policy.remote_version {
            Some(v) => format!("{}/v2/models/{remote}/versions/{v}/infer", self.config.url),
            None => format!("{}/v2/models/{remote}/infer", self.config.url),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = self.config.timeout.min(left);
        if timeout.is_zero() {
            admission.neutral();
            return Err(UpstreamError::Failed("no time left before the deadline".into()));
        }
        let (body, header_len) = encode_request(request, self.config.binary);
        let mut req = self.client.post(&url).timeout(timeout).body(body);
        if let Some(n) = header_len {
            req = req.header("Inference-Header-Content-Length", n.to_string());
        }
        req = req
            .header("Content-Type", if header_len.is_some() { "application/octet-stream" } else { "application/json" });
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let result = async {
            let resp = req.send().await.map_err(|e| UpstreamError::Failed(describe(&e)))?;
            if let Some(g) = self.privacy.as_ref().and_then(|p| p.guard.as_ref()) {
                g.answered("overflow", &url, &resp);
            }
            if let Some(e) = crate::tls::redirect_refused(self.config.url.as_str(), &resp) {
                return Err(UpstreamError::Refused(e));
            }
            let status = resp.status();
            let header_len = resp
                .headers()
                .get("inference-header-content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            // Answers are bounded like requests: a target cannot make the box buffer without end.
            let bytes = read_capped(resp, 256 << 20).await?;
            if status.is_success() {
                parse_response(&bytes, header_len).map_err(|e| UpstreamError::Failed(format!("bad answer: {e}")))
            } else {
                let msg = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
                if status.is_server_error() || status.as_u16() == 429 {
                    Err(UpstreamError::Failed(format!("{status}: {msg}")))
                } else {
                    Err(UpstreamError::Refused(format!("{status}: {msg}")))
                }
            }
        }
        .await;
        match &result {
            Ok(_) => admission.success(),
            Err(UpstreamError::Failed(e)) => {
                tracing::warn!(target_url = %self.config.url, model, error = %e, "overflow request failed");
                admission.failure();
            }
            Err(_) => admission.neutral(),
        }
        result
    }
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, UpstreamError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| UpstreamError::Failed(describe(&e)))? {
        if out.len() + chunk.len() > cap {
            return Err(UpstreamError::Failed(format!("answer larger than {cap} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {}", crate::tls::describe(e))
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    }
}

/// The confidence of an answer: the smallest, over the rows of `output`, of the row's largest
/// value (top class probability). `None` when the output is missing or not numeric.
pub fn confidence(resp: &InferResponse, output: &str) -> Option<f64> {
    let t = resp.outputs.iter().find(|t| t.name == output)?;
    let values = t.data.to_f64()?;
    let row = (*t.shape.last()?).max(1);
    values.chunks(row).map(|r| r.iter().copied().fold(f64::NEG_INFINITY, f64::max)).reduce(f64::min)
}
