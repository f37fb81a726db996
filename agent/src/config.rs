//! Configuration: one TOML file, parsed strictly (unknown keys are errors) and validated into
//! [`Config`], which cannot hold an invalid state. `outpost check-config` runs the same code.
//!
//! Without `--config` the agent runs the *dev profile*: defaults meant for a checkout of the
//! repository (see [`Config::dev_profile`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Largest request body the agent accepts, whatever the configuration says.
pub const MAX_BODY_CEILING: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

// ------------------------------------------------------------------------------------------
// Settings of the parts that config does not depend on (they depend on config)
// ------------------------------------------------------------------------------------------

/// `[registry]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    pub url: String,
    pub trusted_root: PathBuf,
    pub poll_interval: Duration,
    pub channel: String,
    pub allow_http: bool,
    pub ca: Option<PathBuf>,
    /// The whole of one metadata request (root, index, manifest).
    pub timeout: Duration,
    /// A blob download with no byte for this long is cut (and resumed at the next attempt);
    /// its total length is not limited.
    pub stall_timeout: Duration,
    /// Largest compressed blob downloaded.
    pub max_blob_bytes: u64,
    /// Largest model a blob may decompress to.
    pub max_model_bytes: u64,
}

/// `[mqtt]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub client_id: String,
    pub topic_prefix: String,
    /// Shared-subscription group; empty: a plain subscription.
    pub shared_group: String,
    pub qos: u8,
    pub keep_alive: Duration,
    /// Requests in flight (MQTT v5 Receive Maximum).
    pub inflight: u16,
    pub session_expiry: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub max_payload_bytes: usize,
    pub request_timeout: Duration,
}

/// `[upstream]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Collectors, tried in order: a failed send moves to the next (`url`, or `urls`).
    pub urls: Vec<String>,
    pub token_file: Option<PathBuf>,
    /// Bytes of telemetry kept while upstream is unreachable; the oldest goes first.
    pub quota_bytes: u64,
    pub batch_records: usize,
    pub flush_interval: Duration,
    pub telemetry_interval: Duration,
    /// How often the node's inventory goes up (`POST <url>/v1/heartbeat`).
    pub heartbeat_interval: Duration,
    /// Telemetry goes as Prometheus remote-write 1.0 to this URL (instead of `/v1/telemetry`).
    pub remote_write_url: Option<String>,
    /// Bearer token for the remote-write receiver.
    pub remote_write_token_file: Option<PathBuf>,
    pub timeout: Duration,
    pub ca: Option<PathBuf>,
    pub allow_http: bool,
}

/// `[overflow]`.
#[derive(Debug, Clone, PartialEq)]
pub struct OverflowConfig {
    /// Base URL of the target's V2 API (no trailing slash).
    pub url: String,
    /// The URL's host, checked against the residency allow-list before every send.
    pub host: String,
    /// Default latency objective: a request the box is estimated to answer later than this goes
    /// upstream.
    pub slo_p99: Duration,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Per upstream request, capped by the request's own deadline.
    pub timeout: Duration,
    /// Send tensors with the binary tensor extension (else JSON).
    pub binary: bool,
    /// Failures (errors, timeouts) within `failure_window` that open the breaker.
    pub failure_threshold: u32,
    pub failure_window: Duration,
    /// How long the breaker stays open before a half-open probe.
    pub open_for: Duration,
}

/// When a model may use the overflow target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverflowMode {
    /// When the local answer would miss the objective, the queue is full, or confidence is low.
    #[default]
    Auto,
    /// Never (whatever the manifest allows).
    Never,
    /// Always upstream: the model is not served on this box (too large). The operator states
    /// that its inputs may leave the site; sensitive tensors and residency rules still apply.
    RemoteOnly,
}

/// `[models.<name>]` overflow keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOverflow {
    pub mode: OverflowMode,
    /// The model's name on the target (default: the same).
    pub remote_model: Option<String>,
    pub remote_version: Option<String>,
    /// Overrides `overflow.slo_p99`.
    pub slo_p99: Option<Duration>,
    /// Output holding class probabilities; its top value is the answer's confidence.
    pub confidence_output: Option<String>,
    /// Below this confidence the target's answer is asked for.
    pub confidence_min: Option<f64>,
}

// ------------------------------------------------------------------------------------------
// The file as written
// ------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    log: RawLog,
    local_models: Option<RawLocalModels>,
    registry: Option<RawRegistry>,
    #[serde(default)]
    audit: RawAudit,
    privacy: Option<RawPrivacy>,
    upstream: Option<RawUpstream>,
    mqtt: Option<RawMqtt>,
    auth: Option<RawAuth>,
    #[serde(default)]
    store: RawStore,
    overflow: Option<RawOverflow>,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    cli: RawCli,
    grpc: Option<RawGrpc>,
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
    #[serde(default)]
    compliance: RawCompliance,
    ha: Option<RawHa>,
}

/// `[ha]`: the site's other box, for shared verdicts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHa {
    peer_keys: Vec<PathBuf>,
}

/// `[compliance]`: how drift from the registry's signed baseline is handled.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompliance {
    mode: Option<String>,
    interval: Option<String>,
}

/// One `[[webhooks]]` subscription: events POSTed to `url`, signed (Standard Webhooks).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: Option<String>,
    url: String,
    events: Option<Vec<String>>,
    #[serde(deserialize_with = "crate::credentials::file")]
    secret_file: PathBuf,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    ca: Option<PathBuf>,
    timeout: Option<String>,
    allow_http: Option<bool>,
    max_attempts: Option<u32>,
    max_queued: Option<usize>,
    retry_initial: Option<String>,
    retry_max: Option<String>,
}

/// The gRPC listener (V2 over gRPC); TLS, clients and tokens come from `[http]` and `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    listen: String,
    max_message_bytes: Option<u64>,
    max_concurrent_streams: Option<u32>,
}

/// How the command line reaches this agent (`outpost status`, `reload`, `infer`, `model …`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCli {
    url: Option<String>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    ca: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    threads: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    encrypt: Option<bool>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    clients: Vec<RawClient>,
    rate_limit: Option<f64>,
    rate_burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    sha256: String,
    roles: Vec<String>,
    models: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    subject: String,
    roles: Vec<String>,
    models: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: Option<String>,
    client_id: Option<String>,
    topic_prefix: Option<String>,
    shared_group: Option<String>,
    qos: Option<u8>,
    keep_alive: Option<String>,
    inflight: Option<u16>,
    session_expiry: Option<String>,
    username: Option<String>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    password_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    ca: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_key: Option<PathBuf>,
    max_payload_bytes: Option<usize>,
    request_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    enabled: Option<bool>,
    group_commit_max_delay: Option<String>,
    quota_bytes: Option<u64>,
    retention: Option<String>,
    checkpoint_every: Option<u64>,
    checkpoint_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    hmac_key_file: Option<PathBuf>,
    pseudonymize: Option<Vec<String>>,
    sensitive_inputs: Option<Vec<String>>,
    residency_allow: Option<Vec<String>>,
    hosts: Option<BTreeMap<String, Vec<String>>>,
    key_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    urls: Option<Vec<String>>,
    heartbeat_interval: Option<String>,
    remote_write_url: Option<String>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    remote_write_token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    token_file: Option<PathBuf>,
    quota_bytes: Option<u64>,
    batch_records: Option<usize>,
    flush_interval: Option<String>,
    telemetry_interval: Option<String>,
    timeout: Option<String>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    ca: Option<PathBuf>,
    allow_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    url: String,
    #[serde(deserialize_with = "crate::credentials::file")]
    trusted_root: PathBuf,
    poll_interval: Option<String>,
    channel: Option<String>,
    allow_http: Option<bool>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    ca: Option<PathBuf>,
    timeout: Option<String>,
    stall_timeout: Option<String>,
    max_blob_bytes: Option<u64>,
    max_model_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    site: Option<String>,
    name: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    request_timeout: Option<String>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    tls_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    tls_key: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_ca: Option<PathBuf>,
    allow_plaintext: Option<bool>,
    max_connections: Option<u32>,
    max_header_bytes: Option<u32>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalModels {
    dirs: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    enabled: Option<bool>,
    instances: Option<u32>,
    max_queue: Option<u32>,
    queue_timeout: Option<String>,
    max_batch: Option<u32>,
    max_queue_delay: Option<String>,
    preferred_batch: Option<Vec<u32>>,
    batch_sizes: Option<Vec<u32>>,
    plan_cache: Option<u32>,
    allow_non_finite: Option<bool>,
    intra_op_threads: Option<u32>,
    version_policy: Option<String>,
    versions: Option<Vec<String>>,
    canary_share: Option<f64>,
    canary_window: Option<String>,
    canary_min_requests: Option<u64>,
    canary_max_error_rate: Option<f64>,
    canary_max_latency_ratio: Option<f64>,
    overflow: Option<String>,
    overflow_model: Option<String>,
    overflow_version: Option<String>,
    slo_p99: Option<String>,
    confidence_output: Option<String>,
    confidence_min: Option<f64>,
    may_leave_site: Option<bool>,
    cache_bytes: Option<u64>,
    experiment: Option<RawExperiment>,
    shadow: Option<RawShadow>,
}

/// `[models.<name>.shadow]`: a candidate version that gets a copy of live requests.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    version: String,
    share: Option<f64>,
    output: Option<String>,
    min_compared: Option<u64>,
    min_agreement: Option<f64>,
    max_p99_ratio: Option<f64>,
}

/// `[models.<name>.experiment]`: an A/B split of the model's unversioned requests.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExperiment {
    versions: Vec<String>,
    weights: Option<Vec<u32>>,
    key_parameter: Option<String>,
    key_header: Option<String>,
    output: Option<String>,
    output_index: Option<usize>,
    candidate: Option<String>,
    min_requests: Option<u64>,
    max_error_rate_increase: Option<f64>,
    max_p99_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverflow {
    url: String,
    slo_p99: Option<String>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    ca: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "crate::credentials::optional_file")]
    client_key: Option<PathBuf>,
    allow_http: Option<bool>,
    timeout: Option<String>,
    binary: Option<bool>,
    failure_threshold: Option<u32>,
    failure_window: Option<String>,
    open_for: Option<String>,
}

// ------------------------------------------------------------------------------------------
// The validated configuration
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    /// Directories of unsigned local models (`<dir>/<name>/model.onnx` + `golden.json`).
    pub local_models: Vec<PathBuf>,
    /// The signed model registry; `None` turns it off.
    pub registry: Option<RegistryConfig>,
    /// The audit log; `None` only when `[audit] enabled = false`.
    pub audit: Option<crate::audit::AuditConfig>,
    pub privacy: PrivacyConfig,
    /// The telemetry/audit collector; `None` keeps everything on the box.
    pub upstream: Option<UpstreamConfig>,
    /// MQTT request/response; `None`: no MQTT.
    pub mqtt: Option<MqttConfig>,
    /// The overflow target (a V2 server in the data centre); `None`: everything is served here.
    pub overflow: Option<OverflowConfig>,
    /// Tokens, client certificates and roles; `None` (loopback only): everything open.
    pub auth: Option<crate::auth::AuthConfig>,
    /// The model store's device key file; `None` when `[store] encrypt = false`.
    pub store_key_file: Option<PathBuf>,
    /// Inference runs executing at once across all models (`[engine] threads`; the core count
    /// by default).
    pub engine_threads: usize,
    /// Per-model settings; models not named here get [`ModelConfig::default`].
    pub models: BTreeMap<String, ModelConfig>,
    /// How the command line reaches this agent.
    pub cli: CliConfig,
    /// The gRPC listener; `None`: off.
    pub grpc: Option<GrpcConfig>,
    /// Event subscriptions (`[[webhooks]]`).
    pub webhooks: Vec<WebhookConfig>,
    /// Drift from the registry's compliance baseline (`[compliance]`).
    pub compliance: ComplianceConfig,
    /// The node public keys of the site's other boxes (`ha.peer_keys`): their verdicts count.
    pub ha_peer_keys: Vec<PathBuf>,
    /// Where this configuration came from; `None` for the dev profile.
    pub path: Option<PathBuf>,
}

/// `[grpc]`: the Open Inference Protocol over gRPC on its own listener, with the TLS files
/// and access rules of `[http]` and `[auth]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    /// Largest message received or sent.
    pub max_message_bytes: usize,
    /// Requests in flight on one connection (HTTP/2 streams).
    pub max_concurrent_streams: u32,
}

/// `[[webhooks]]`: where events are POSTed, which ones, and how hard delivery tries.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// Names the subscription's queue on disk and in status (unique; the URL by default).
    pub name: String,
    pub url: String,
    /// Event type patterns (`io.outpost.model.activated`, `io.outpost.model.*`, `*`).
    pub events: Vec<String>,
    /// The Standard Webhooks secret (`whsec_` and base64), read at start.
    pub secret_file: PathBuf,
    pub ca: Option<PathBuf>,
    /// One delivery attempt's limit (connect, send, answer).
    pub timeout: Duration,
    /// Attempts before an event goes to the dead-letter list.
    pub max_attempts: u32,
    /// Events waiting at most; when full the oldest goes to the dead-letter list.
    pub max_queued: usize,
    /// The first retry's delay, doubled per attempt up to `retry_max`, with jitter.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// `[cli]`: how `outpost` commands that talk to the running agent reach it. Unset values
/// follow `[http]`: its listen address (on loopback when it listens on every address), https
/// when TLS is on, the agent's own certificate file as the trusted root.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CliConfig {
    pub url: Option<String>,
    /// CA certificates (PEM) that verify the agent's certificate.
    pub ca: Option<PathBuf>,
    /// A file holding a token's secret, sent as `Authorization: Bearer`.
    pub token_file: Option<PathBuf>,
    /// A client certificate and key for a listener that asks for one (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub site: String,
    pub name: String,
    pub state_dir: PathBuf,
    /// The node's ed25519 key (signs audit checkpoints); created at first start when missing.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// TLS on the listener: certificate chain and key (PEM); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Largest request head (request line and headers); larger is refused.
    pub max_header_bytes: usize,
    /// A request head must arrive within this time of the connection opening or going idle.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long is closed.
    pub idle_timeout: Duration,
}

/// The listener's TLS files. Read at start and on every reload (SIGHUP).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client CA bundle: when set, every client must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub enabled: bool,
    /// Inference threads for this model (runs across models are capped by `engine.threads`).
    pub instances: usize,
    /// Requests waiting or running before new ones are refused with 503.
    pub max_queue: usize,
    /// Requests queued longer than this are answered 503 instead of run.
    pub queue_timeout: Option<Duration>,
    /// Dynamic batching (`max_batch` > 1), with `batch_sizes` as configured.
    pub batch: Option<crate::engine::BatchPolicy>,
    /// `batch_sizes` was not set: chosen at load from the model's size ([`Self::batch_policy`]).
    pub batch_sizes_auto: bool,
    /// Optimized plans kept, one per concrete input shape.
    pub plan_cache: usize,
    /// Float inputs may hold NaN or infinities (default: refused with 400, in JSON and binary).
    pub allow_non_finite: bool,
    /// Cores one run may use when nothing else waits for the model; `None`: chosen at load from
    /// the model's size ([`Self::threads_per_run`]).
    pub intra_op_threads: Option<usize>,
    pub version_policy: VersionPolicy,
    /// Canary for new registry versions; `None` switches at once.
    pub canary: Option<CanaryConfig>,
    /// When this model's requests may go to the overflow target.
    pub overflow: ModelOverflow,
    /// `false` forbids overflow whatever the signed manifest allows (configuration can only
    /// tighten residency).
    pub may_leave_site: bool,
    /// Response cache per served version, in bytes; 0 turns it off.
    pub cache_bytes: usize,
    /// An A/B experiment over pinned versions; `None`: the default version answers.
    pub experiment: Option<ExperimentConfig>,
    /// A shadow candidate; `None`: no copies.
    pub shadow: Option<ShadowConfig>,
}

/// Shadow traffic: `share` of the requests the default version answers are copied to
/// `version` off the request path, when a core is free; its answers are compared, never sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    pub version: String,
    pub share: f64,
    /// The output whose argmax is the label compared (default: the first output).
    pub output: Option<String>,
    /// Rules: after `min_compared` copies the candidate is promoted when its label agreement
    /// is at least `min_agreement` and its run p99 at most `max_p99_ratio` times the default
    /// version's, else the shadow is stopped.
    pub rules: Option<ShadowRules>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRules {
    pub min_compared: u64,
    pub min_agreement: f64,
    pub max_p99_ratio: f64,
}

/// An A/B experiment: requests that name no version are split between `versions` by
/// `weights`, sticky by the request parameter `key_parameter` (keyed with the node's
/// pseudonymization key), at random without one.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentConfig {
    pub versions: Vec<String>,
    pub weights: Vec<u32>,
    pub key_parameter: Option<String>,
    /// An HTTP header keying the split when the parameter is absent (lower-case).
    pub key_header: Option<String>,
    /// An output summarized per variant: its argmax as the label, and the mean of element
    /// `output_index`.
    pub output: Option<String>,
    pub output_index: usize,
    /// Rules: judge this variant against the first other one, promote or stop it.
    pub rules: Option<ExperimentRules>,
}

/// When an experiment's candidate is promoted or stopped: after both it and the baseline
/// served `min_requests`, it is stopped if its error rate exceeds the baseline's by more than
/// `max_error_rate_increase` or its p99 the baseline's times `max_p99_ratio`, else promoted.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentRules {
    pub candidate: String,
    pub baseline: String,
    pub min_requests: u64,
    pub max_error_rate_increase: f64,
    pub max_p99_ratio: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyConfig {
    /// HMAC key (created with mode 0600 at first start when absent).
    pub hmac_key_file: PathBuf,
    pub pseudonymize: Vec<String>,
    pub sensitive_inputs: Vec<String>,
    /// Hosts and address ranges outbound connections may go to, as written; empty: anywhere.
    pub residency_allow: Vec<String>,
    /// The same, parsed: what every outbound connection is checked against.
    pub residency: crate::residency::AllowList,
    /// Names resolved from here instead of DNS (`[privacy.hosts]`).
    pub hosts: std::collections::HashMap<String, Vec<std::net::IpAddr>>,
    /// How long one pseudonymization key epoch lasts.
    pub key_period: Duration,
}

/// `compliance.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComplianceMode {
    /// Drifts from the baseline are reported.
    #[default]
    Report,
    /// Drifts are reported, and a start or reload that would drift is refused.
    Enforce,
}

/// `[compliance]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComplianceConfig {
    pub mode: ComplianceMode,
    /// How often the running configuration is checked again.
    pub interval: Duration,
}

impl Default for ComplianceConfig {
    fn default() -> Self {
        ComplianceConfig { mode: ComplianceMode::Report, interval: Duration::from_secs(3600) }
    }
}

/// Which registry versions of a model serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The newest version on the channel (default).
    Latest,
    /// Exactly these versions, side by side under `/versions/{v}`; the highest is the default.
    Pinned(Vec<String>),
}

/// Canary settings: a share of traffic goes to a new version; it is promoted when it holds for
/// the window, rolled back as soon as it regresses.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryConfig {
    pub share: f64,
    pub window: Duration,
    /// Requests the candidate must have answered before any verdict.
    pub min_requests: u64,
    /// Allowed increase of the candidate's error rate over the stable version's.
    pub max_error_rate: f64,
    /// Allowed ratio of the candidate's p99 engine latency to the stable version's.
    pub max_latency_ratio: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            enabled: true,
            instances: crate::engine::cpu::cores().min(64),
            max_queue: 64,
            queue_timeout: None,
            batch: None,
            batch_sizes_auto: true,
            plan_cache: crate::engine::model::DEFAULT_PLAN_CACHE,
            allow_non_finite: false,
            intra_op_threads: None,
            version_policy: VersionPolicy::Latest,
            canary: None,
            overflow: ModelOverflow::default(),
            may_leave_site: true,
            cache_bytes: 0,
            experiment: None,
            shadow: None,
        }
    }
}

impl ModelConfig {
    /// How a served version of this model queues and runs requests.
    /// The batching in effect for a model of `model_bytes` bytes: `batch_sizes` as configured;
    /// unset, powers of two up to `max_batch` for models of at least
    /// [`crate::engine::model::LARGE_MODEL_BYTES`] (each size's plan holds its own packed weights),
    /// every size for smaller ones.
    pub fn batch_policy(&self, model_bytes: usize) -> Option<crate::engine::BatchPolicy> {
        let mut policy = self.batch.clone()?;
        if self.batch_sizes_auto && model_bytes >= crate::engine::model::LARGE_MODEL_BYTES {
            policy.sizes = crate::engine::BatchPolicy::powers_of_two(policy.max_batch);
        }
        Some(policy)
    }

    /// The cores one run of a model of `model_bytes` bytes may use: `intra_op_threads` as
    /// configured; unset, every core for models of at least
    /// [`crate::engine::model::LARGE_MODEL_BYTES`] (their runs are long enough to split), one for
    /// smaller ones. A run only takes cores that are free, only when it has several rows, and
    /// only when no other request waits for the model (then concurrent runs use the cores
    /// better).
    pub fn threads_per_run(&self, model_bytes: usize) -> usize {
        self.intra_op_threads.unwrap_or(if model_bytes >= crate::engine::model::LARGE_MODEL_BYTES {
            crate::engine::cpu::cores()
        } else {
            1
        })
    }

    /// How a model of `model_bytes` bytes is prepared.
    pub fn prepare_options(&self, model_bytes: usize) -> crate::engine::PrepareOptions {
        crate::engine::PrepareOptions {
            plan_cache: self.plan_cache,
            allow_non_finite: self.allow_non_finite,
            batch: self.batch_policy(model_bytes),
        }
    }

    /// How a model of `model_bytes` bytes is served.
    pub fn serve_options(&self, model_bytes: usize) -> crate::engine::ServeOptions {
        crate::engine::ServeOptions {
            threads_per_run: self.threads_per_run(model_bytes),
            instances: self.instances,
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
            cache_bytes: self.cache_bytes,
            batch: self.batch_policy(model_bytes),
            ..crate::engine::ServeOptions::default()
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text; `path` is used in messages and to resolve relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        validate(raw, Some(path.to_owned()), &base, false)
    }

    /// The dev profile: `outpost run` with no `--config`, for a checkout of the repository.
    /// Listens on 127.0.0.1:8080, keeps state in `./.outpost` and serves the demo models in
    /// `models/` (and those built into `.cache/models/`, such as the MiniLM encoder).
    pub fn dev_profile() -> Config {
        let root = checkout_root();
        let state_dir = match std::env::var_os("XDG_STATE_HOME") {
            Some(x) if !root.join("models").is_dir() => PathBuf::from(x).join("outpost"),
            _ => root.join(".outpost"),
        };
        let demo = root.join("models").join("registry");
        let (registry, local) = if demo.join("root.json").is_file() {
            let reg = RawRegistry {
                url: format!("file://{}", demo.display()),
                trusted_root: demo.join("root.json"),
                poll_interval: Some("10s".into()),
                ..Default::default()
            };
            (Some(reg), vec![root.join(".cache").join("models")])
        } else {
            (None, vec![root.join("models"), root.join(".cache").join("models")])
        };
        let raw = RawConfig {
            node: RawNode { state_dir: Some(state_dir), ..Default::default() },
            local_models: Some(RawLocalModels { dirs: local }),
            registry,
            ..Default::default()
        };
        // The dev profile's values are valid by construction; fall back on the bare defaults
        // should validation ever disagree.
        validate(raw, None, &root, true).unwrap_or_else(|e| {
            tracing::error!(error = %e, "dev profile failed validation");
            Config {
                node: NodeConfig {
                    site: "demo-site".into(),
                    name: hostname(),
                    key_file: root.join(".outpost").join("node.key"),
                    state_dir: root.join(".outpost"),
                },
                http: HttpConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                    max_body_bytes: 16 << 20,
                    request_timeout: Duration::from_secs(30),
                    tls: None,
                    max_connections: 1024,
                    max_header_bytes: 64 << 10,
                    header_read_timeout: Duration::from_secs(10),
                    idle_timeout: Duration::from_secs(60),
                },
                log: LogConfig { level: "info".into(), format: LogFormat::Text },
                local_models: vec![root.join("models")],
                registry: None,
                audit: Some(crate::audit::AuditConfig::default()),
                privacy: PrivacyConfig {
                    hmac_key_file: root.join(".outpost").join("hmac.key"),
                    pseudonymize: vec![],
                    sensitive_inputs: vec![],
                    residency_allow: vec![],
                    residency: crate::residency::AllowList::default(),
                    hosts: std::collections::HashMap::new(),
                    key_period: Duration::from_secs(30 * 86400),
                },
                upstream: None,
                mqtt: None,
                overflow: None,
                auth: None,
                store_key_file: Some(root.join(".outpost").join("store.key")),
                engine_threads: crate::engine::cpu::cores(),
                models: BTreeMap::new(),
                cli: CliConfig::default(),
                grpc: None,
                webhooks: Vec::new(),
                compliance: ComplianceConfig::default(),
                ha_peer_keys: Vec::new(),
                path: None,
            }
        })
    }

    pub fn model(&self, name: &str) -> ModelConfig {
        self.models.get(name).cloned().unwrap_or_default()
    }
    pub fn is_dev_profile(&self) -> bool {
        self.path.is_none()
    }
}

/// The repository checkout: the working directory when it holds `models/`, else the source tree
/// this binary was built from.
fn checkout_root() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        if cwd.join("models").is_dir() {
            return cwd;
        }
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if built.join("models").is_dir() {
        return built.canonicalize().unwrap_or(built);
    }
    std::env::current_dir().unwrap_or_default()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty() && valid_name(s))
        .unwrap_or_else(|| "outpost".to_owned())
}

pub use outpost_proto::valid_name;

/// Parses "500us", "2ms", "60s", "5m", "1h", "1d".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. \"500us\", \"2ms\", \"60s\")"))?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "" => return Err(format!("'{s}' needs a unit (ns, us, ms, s, m, h, d)")),
        u => return Err(format!("'{s}': unknown unit '{u}'")),
    };
    let secs = value * scale;
    if !(secs.is_finite() && (0.0..=1e9).contains(&secs)) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A point in time given on the command line or in a query, in ms since the Unix epoch:
/// `now`, an RFC 3339 time (`2026-11-28T00:00:00Z`) or how long ago (`24h`, `30d`).
pub fn parse_time_arg(s: &str) -> Result<i64, String> {
    let now_ms = outpost_proto::registry::now().saturating_mul(1000);
    if s == "now" {
        return Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(now_ms, |d| d.as_millis() as i64));
    }
    if let Ok(secs) = outpost_proto::registry::parse_time(s) {
        return Ok(secs.saturating_mul(1000));
    }
    let ago = parse_duration(s).map_err(|_| format!("'{s}' is not now, an RFC 3339 time or a duration"))?;
    Ok(now_ms - ago.as_millis() as i64)
}

fn validate(raw: RawConfig, path: Option<PathBuf>, base: &Path, dev: bool) -> Result<Config, ConfigError> {
    let shown = path.clone().unwrap_or_else(|| PathBuf::from("<dev profile>"));
    let err = |message: String| ConfigError::Invalid { path: shown.clone(), message };
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    let site = raw.node.site.unwrap_or_else(|| "demo-site".to_owned());
    if !valid_name(&site) {
        return Err(err(format!("node.site '{site}' must be 1-128 of [A-Za-z0-9._-]")));
    }
    let name = raw.node.name.unwrap_or_else(hostname);
    if !valid_name(&name) {
        return Err(err(format!("node.name '{name}' must be 1-128 of [A-Za-z0-9._-]")));
    }
    let state_dir = resolve(raw.node.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/outpost")));
    let key_file = raw.node.key_file.map(&resolve).unwrap_or_else(|| state_dir.join("node.key"));

    let listen_s = raw.http.listen.clone().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let listen: SocketAddr =
        listen_s.parse().map_err(|_| err(format!("http.listen '{listen_s}' is not an address like 127.0.0.1:8080")))?;
    let max_body = raw.http.max_body_bytes.unwrap_or(16 << 20);
    if max_body == 0 || max_body > MAX_BODY_CEILING as u64 {
        return Err(err(format!("http.max_body_bytes must be between 1 and {MAX_BODY_CEILING}")));
    }
    let request_timeout = parse_duration(raw.http.request_timeout.as_deref().unwrap_or("30s"))
        .map_err(|e| err(format!("http.request_timeout: {e}")))?;
    if request_timeout.is_zero() || request_timeout > Duration::from_secs(3600) {
        return Err(err("http.request_timeout must be between 1us and 1h".into()));
    }

    let http = validate_http(&raw.http, listen, max_body as usize, request_timeout, raw.auth.is_some(), &resolve)
        .map_err(err)?;
    let auth = raw.auth.map(validate_auth).transpose().map_err(err)?;
    let engine_threads = raw.engine.threads.map_or_else(crate::engine::cpu::cores, |t| t as usize);
    if !(1..=256).contains(&engine_threads) {
        return Err(err("engine.threads must be between 1 and 256".into()));
    }
    let store_key_file = if raw.store.encrypt.unwrap_or(true) {
        Some(raw.store.key_file.map(&resolve).unwrap_or_else(|| state_dir.join("store.key")))
    } else {
        if raw.store.key_file.is_some() {
            return Err(err("store.key_file is set but store.encrypt = false".into()));
        }
        None
    };

    let level = raw.log.level.unwrap_or_else(|| "info".to_owned());
    if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
        return Err(err(format!("log.level '{level}' must be one of error, warn, info, debug, trace")));
    }
    let format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(err(format!("log.format '{other}' must be \"text\" or \"json\""))),
    };

    let local_models: Vec<PathBuf> =
        raw.local_models.map(|l| l.dirs).unwrap_or_default().into_iter().map(resolve).collect();
    if !dev {
        for d in &local_models {
            if !d.is_dir() {
                return Err(err(format!("local_models.dirs: {} is not a directory", d.display())));
            }
        }
    }

    let registry = match raw.registry {
        None => None,
        Some(r) => Some(validate_registry(r, dev, &resolve).map_err(err)?),
    };

    let audit = if raw.audit.enabled.unwrap_or(true) {
        let d = crate::audit::AuditConfig::default();
        let group_commit_max_delay = parse_duration(raw.audit.group_commit_max_delay.as_deref().unwrap_or("0s"))
            .map_err(|e| err(format!("audit.group_commit_max_delay: {e}")))?;
        if group_commit_max_delay > Duration::from_secs(1) {
            return Err(err("audit.group_commit_max_delay must be at most 1s".into()));
        }
        let retention = parse_duration(raw.audit.retention.as_deref().unwrap_or("7d"))
            .map_err(|e| err(format!("audit.retention: {e}")))?;
        let checkpoint_interval = match &raw.audit.checkpoint_interval {
            Some(v) => parse_duration(v).map_err(|e| err(format!("audit.checkpoint_interval: {e}")))?,
            None => d.checkpoint_interval,
        };
        let checkpoint_every = raw.audit.checkpoint_every.unwrap_or(d.checkpoint_every);
        if checkpoint_every == 0 || checkpoint_interval.is_zero() {
            return Err(err("audit.checkpoint_every and audit.checkpoint_interval must be above 0".into()));
        }
        Some(crate::audit::AuditConfig {
            group_commit_max_delay,
            quota_bytes: raw.audit.quota_bytes.unwrap_or(d.quota_bytes),
            retention,
            keep_unsent: raw.upstream.is_some(),
            checkpoint_every,
            checkpoint_interval,
        })
    } else {
        None
    };
    let rp = raw.privacy.unwrap_or_default();
    let key_period = parse_duration(rp.key_period.as_deref().unwrap_or("30d"))
        .map_err(|e| err(format!("privacy.key_period: {e}")))?;
    if key_period < Duration::from_secs(3600) || key_period > Duration::from_secs(3660 * 86400) {
        return Err(err("privacy.key_period must be between 1h and 10 years (3660d)".into()));
    }
    let privacy = PrivacyConfig {
        key_period,
        hmac_key_file: rp.hmac_key_file.map(resolve).unwrap_or_else(|| state_dir.join("hmac.key")),
        pseudonymize: rp.pseudonymize.unwrap_or_default(),
        sensitive_inputs: rp.sensitive_inputs.unwrap_or_default(),
        residency_allow: rp.residency_allow.clone().unwrap_or_default(),
        residency: crate::residency::AllowList::parse(&rp.residency_allow.unwrap_or_default()).map_err(&err)?,
        hosts: {
            let mut hosts = std::collections::HashMap::new();
            for (name, addrs) in rp.hosts.unwrap_or_default() {
                let parsed: Result<Vec<std::net::IpAddr>, _> = addrs.iter().map(|a| a.parse()).collect();
                match parsed {
                    Ok(v) if !v.is_empty() && v.len() <= 16 => {
                        hosts.insert(name.trim_end_matches('.').to_ascii_lowercase(), v);
                    }
                    _ => {
                        return Err(err(format!("privacy.hosts.\"{name}\": 1 to 16 IP addresses, e.g. [\"10.0.0.5\"]")))
                    }
                }
            }
            hosts
        },
    };
    for p in &privacy.pseudonymize {
        if p.trim_start_matches("parameters.").is_empty() {
            return Err(err(format!("privacy.pseudonymize: '{p}' names no parameter")));
        }
    }
    let upstream = match raw.upstream {
        None => None,
        Some(u) => {
            let allow_http = u.allow_http.unwrap_or(false);
            let urls = match (u.url, u.urls) {
                (Some(url), None) => vec![url],
                (None, Some(urls)) if !urls.is_empty() && urls.len() <= 16 => urls,
                (None, Some(_)) => return Err(err("upstream.urls must list 1 to 16 collectors".into())),
                (Some(_), Some(_)) => return Err(err("upstream.url and upstream.urls: set one of them".into())),
                (None, None) => return Err(err("[upstream] needs url (or urls)".into())),
            };
            for url in urls.iter().chain(&u.remote_write_url) {
                if !(url.starts_with("https://") || (allow_http && url.starts_with("http://"))) {
                    return Err(err(format!(
                        "upstream.url '{url}' must be https:// (http:// needs upstream.allow_http = true)"
                    )));
                }
                let host =
                    crate::privacy::url_host(url).ok_or_else(|| err(format!("upstream.url '{url}' has no host")))?;
                if !privacy.residency.host_allowed(&host) {
                    return Err(err(format!("upstream.url host '{host}' is not in privacy.residency_allow")));
                }
            }
            let dur = |v: Option<String>, d: &str, k: &str| {
                parse_duration(v.as_deref().unwrap_or(d)).map_err(|e| err(format!("upstream.{k}: {e}")))
            };
            Some(UpstreamConfig {
                urls,
                token_file: u.token_file.map(resolve),
                quota_bytes: u.quota_bytes.unwrap_or(1 << 30),
                batch_records: u.batch_records.unwrap_or(500).clamp(1, 100_000),
                flush_interval: dur(u.flush_interval, "1s", "flush_interval")?.max(Duration::from_millis(10)),
                telemetry_interval: dur(u.telemetry_interval, "60s", "telemetry_interval")?
                    .max(Duration::from_millis(10)),
                heartbeat_interval: dur(u.heartbeat_interval, "30s", "heartbeat_interval")?
                    .max(Duration::from_millis(10)),
                remote_write_url: u.remote_write_url,
                remote_write_token_file: u.remote_write_token_file.map(resolve),
                timeout: dur(u.timeout, "10s", "timeout")?,
                ca: u.ca.map(resolve),
                allow_http,
            })
        }
    };
    if let Some(reg) = &registry {
        if let Some(host) = crate::privacy::url_host(&reg.url) {
            if !privacy.residency.host_allowed(&host) {
                return Err(err(format!("registry.url host '{host}' is not in privacy.residency_allow")));
            }
        }
    }

    let overflow = match raw.overflow {
        None => None,
        Some(o) => Some(validate_overflow(o, &privacy.residency, &resolve).map_err(err)?),
    };

    let mqtt = match raw.mqtt {
        None => None,
        Some(m) => Some(validate_mqtt(m, &name, request_timeout, &resolve).map_err(err)?),
    };
    if let Some(m) = &mqtt {
        if !privacy.residency.host_allowed(&m.host) {
            return Err(err(format!("mqtt.host '{}' is not in privacy.residency_allow", m.host)));
        }
    }

    let mut models = BTreeMap::new();
    for (mname, mut m) in raw.models {
        let model_overflow = validate_model_overflow(&mname, &m).map_err(&err)?;
        let shadow = match m.shadow.take() {
            None => None,
            Some(sh) => {
                let share = sh.share.unwrap_or(1.0);
                if !(0.0..=1.0).contains(&share) || sh.version.is_empty() {
                    return Err(err(format!("models.{mname}.shadow: a version, and a share from 0 to 1")));
                }
                let rules = match sh.min_compared {
                    None => None,
                    Some(n) => {
                        let agreement = sh.min_agreement.unwrap_or(0.99);
                        let ratio = sh.max_p99_ratio.unwrap_or(1.5);
                        if !(0.0..=1.0).contains(&agreement) || !(1.0..=100.0).contains(&ratio) {
                            return Err(err(format!(
                                "models.{mname}.shadow: min_agreement 0 to 1, max_p99_ratio 1 to 100"
                            )));
                        }
                        Some(ShadowRules {
                            min_compared: n.clamp(1, 10_000_000),
                            min_agreement: agreement,
                            max_p99_ratio: ratio,
                        })
                    }
                };
                Some(ShadowConfig { version: sh.version, share, output: sh.output, rules })
            }
        };
        let experiment = match m.experiment.take() {
            None => None,
            Some(e) => {
                let n = e.versions.len();
                if !(2..=16).contains(&n) {
                    return Err(err(format!("models.{mname}.experiment.versions: 2 to 16 versions")));
                }
                let weights = e.weights.unwrap_or_else(|| vec![1; n]);
                if weights.len() != n || weights.iter().all(|w| *w == 0) || weights.iter().any(|w| *w > 1_000_000) {
                    return Err(err(format!(
                        "models.{mname}.experiment.weights: one weight (0 to 1000000) per version, not all 0"
                    )));
                }
                let rules = match e.candidate {
                    None => None,
                    Some(candidate) => {
                        let Some(baseline) = e.versions.iter().find(|v| **v != candidate).cloned() else {
                            return Err(err(format!("models.{mname}.experiment: no baseline besides the candidate")));
                        };
                        if !e.versions.contains(&candidate) {
                            return Err(err(format!(
                                "models.{mname}.experiment.candidate '{candidate}' is not one of its versions"
                            )));
                        }
                        let rate = e.max_error_rate_increase.unwrap_or(0.01);
                        let ratio = e.max_p99_ratio.unwrap_or(1.5);
                        if !(0.0..=1.0).contains(&rate) || !(1.0..=100.0).contains(&ratio) {
                            return Err(err(format!(
                                "models.{mname}.experiment: max_error_rate_increase 0 to 1, max_p99_ratio 1 to 100"
                            )));
                        }
                        Some(ExperimentRules {
                            candidate,
                            baseline,
                            min_requests: e.min_requests.unwrap_or(200).clamp(1, 10_000_000),
                            max_error_rate_increase: rate,
                            max_p99_ratio: ratio,
                        })
                    }
                };
                Some(ExperimentConfig {
                    versions: e.versions,
                    weights,
                    key_parameter: e.key_parameter,
                    key_header: e.key_header.map(|h| h.to_ascii_lowercase()),
                    output: e.output,
                    output_index: e.output_index.unwrap_or(0),
                    rules,
                })
            }
        };
        if m.cache_bytes.is_some_and(|b| b > 1 << 30) {
            return Err(err(format!("models.{mname}.cache_bytes must be at most 1073741824")));
        }
        if m.may_leave_site == Some(true) {
            return Err(err(format!(
                "models.{mname}.may_leave_site = true: only a signed manifest can let a model leave the site; the configuration can only set false"
            )));
        }
        if !valid_name(&mname) {
            return Err(err(format!("[models.{mname}]: model names must be 1-128 of [A-Za-z0-9._-]")));
        }
        let d = ModelConfig::default();
        let instances = m.instances.map_or(d.instances, |v| v as usize);
        if !(1..=64).contains(&instances) {
            return Err(err(format!("models.{mname}.instances must be between 1 and 64")));
        }
        let max_queue = m.max_queue.map_or(d.max_queue, |v| v as usize);
        if !(1..=65536).contains(&max_queue) {
            return Err(err(format!("models.{mname}.max_queue must be between 1 and 65536")));
        }
        let queue_timeout = match &m.queue_timeout {
            None => None,
            Some(t) => {
                let t = parse_duration(t).map_err(|e| err(format!("models.{mname}.queue_timeout: {e}")))?;
                if t.is_zero() {
                    return Err(err(format!("models.{mname}.queue_timeout must be more than 0")));
                }
                Some(t)
            }
        };
        let batch = validate_batch(&mname, &m).map_err(&err)?;
        let plan_cache = m.plan_cache.map_or(d.plan_cache, |v| v as usize);
        if !(1..=256).contains(&plan_cache) {
            return Err(err(format!("models.{mname}.plan_cache must be between 1 and 256")));
        }
        let intra_op_threads = m.intra_op_threads.map(|v| v as usize);
        if intra_op_threads.is_some_and(|t| !(1..=256).contains(&t)) {
            return Err(err(format!("models.{mname}.intra_op_threads must be between 1 and 256")));
        }
        let version_policy = match (m.version_policy.as_deref().unwrap_or("latest"), m.versions) {
            ("latest", None) => VersionPolicy::Latest,
            ("latest", Some(_)) => {
                return Err(err(format!("models.{mname}.versions needs version_policy = \"pinned\"")))
            }
            ("pinned", Some(v)) if !v.is_empty() => {
                for ver in &v {
                    if outpost_proto::registry::SemVer::parse(ver).is_none() {
                        return Err(err(format!("models.{mname}.versions: '{ver}' is not a semantic version")));
                    }
                }
                VersionPolicy::Pinned(v)
            }
            ("pinned", _) => {
                return Err(err(format!("models.{mname}: version_policy = \"pinned\" needs versions = [...]")))
            }
            (other, _) => {
                return Err(err(format!("models.{mname}.version_policy '{other}' must be \"latest\" or \"pinned\"")))
            }
        };
        let share = m.canary_share.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&share) {
            return Err(err(format!("models.{mname}.canary_share must be between 0 and 1")));
        }
        let canary = if share > 0.0 {
            let window = parse_duration(m.canary_window.as_deref().unwrap_or("60s"))
                .map_err(|e| err(format!("models.{mname}.canary_window: {e}")))?;
            let max_error_rate = m.canary_max_error_rate.unwrap_or(0.01);
            let max_latency_ratio = m.canary_max_latency_ratio.unwrap_or(3.0);
            if !(0.0..=1.0).contains(&max_error_rate) || max_latency_ratio.is_nan() || max_latency_ratio < 1.0 {
                return Err(err(format!(
                    "models.{mname}: canary_max_error_rate must be in [0, 1] and canary_max_latency_ratio >= 1"
                )));
            }
            if version_policy != VersionPolicy::Latest {
                return Err(err(format!("models.{mname}: a canary needs version_policy = \"latest\"")));
            }
            Some(CanaryConfig {
                share,
                window,
                min_requests: m.canary_min_requests.unwrap_or(100).max(1),
                max_error_rate,
                max_latency_ratio,
            })
        } else {
            None
        };
        models.insert(
            mname,
            ModelConfig {
                enabled: m.enabled.unwrap_or(true),
                instances,
                max_queue,
                queue_timeout,
                batch,
                batch_sizes_auto: m.batch_sizes.is_none(),
                plan_cache,
                allow_non_finite: m.allow_non_finite.unwrap_or(false),
                intra_op_threads,
                version_policy,
                canary,
                overflow: model_overflow,
                may_leave_site: m.may_leave_site.unwrap_or(true),
                cache_bytes: m.cache_bytes.unwrap_or(0) as usize,
                experiment,
                shadow,
            },
        );
    }

    let grpc = match raw.grpc {
        None => None,
        Some(g) => {
            let listen: SocketAddr = g.listen.parse().map_err(|e| err(format!("grpc.listen '{}': {e}", g.listen)))?;
            if !listen.ip().is_loopback() {
                if auth.is_none() {
                    return Err(err(format!(
                        "grpc.listen {listen} is not a loopback address: serving the LAN needs an [auth] section"
                    )));
                }
                if http.tls.is_none() && !raw.http.allow_plaintext.unwrap_or(false) {
                    return Err(err(format!(
                        "grpc.listen {listen} is not a loopback address: set http.tls_cert and http.tls_key \
                         (or http.allow_plaintext = true)"
                    )));
                }
            }
            let max_message_bytes = g.max_message_bytes.unwrap_or(http.max_body_bytes as u64);
            if !(1024..=(1 << 30)).contains(&max_message_bytes) {
                return Err(err("grpc.max_message_bytes must be between 1024 and 1073741824".into()));
            }
            let max_concurrent_streams = g.max_concurrent_streams.unwrap_or(128);
            if !(1..=10_000).contains(&max_concurrent_streams) {
                return Err(err("grpc.max_concurrent_streams must be between 1 and 10000".into()));
            }
            Some(GrpcConfig { listen, max_message_bytes: max_message_bytes as usize, max_concurrent_streams })
        }
    };

    let mut webhooks: Vec<WebhookConfig> = Vec::new();
    for w in raw.webhooks {
        let hook = validate_webhook(w, &privacy.residency, &resolve).map_err(err)?;
        if webhooks.iter().any(|o| o.name == hook.name) {
            return Err(err(format!("two [[webhooks]] are named '{}': give each its own name", hook.name)));
        }
        webhooks.push(hook);
    }
    if webhooks.len() > 32 {
        return Err(err("at most 32 [[webhooks]]".into()));
    }
    let cli = {
        let c = raw.cli;
        if let Some(u) = &c.url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(err(format!("cli.url '{u}' must be http:// or https://")));
            }
        }
        if c.client_cert.is_some() != c.client_key.is_some() {
            return Err(err("cli.client_cert and cli.client_key go together".into()));
        }
        CliConfig {
            url: c.url.map(|u| u.trim_end_matches('/').to_owned()),
            ca: c.ca.map(resolve),
            token_file: c.token_file.map(resolve),
            client_cert: c.client_cert.map(resolve),
            client_key: c.client_key.map(resolve),
        }
    };
    let compliance = ComplianceConfig {
        mode: match raw.compliance.mode.as_deref().unwrap_or("report") {
            "report" => ComplianceMode::Report,
            "enforce" => ComplianceMode::Enforce,
            other => return Err(err(format!("compliance.mode '{other}' must be \"report\" or \"enforce\""))),
        },
        interval: parse_duration(raw.compliance.interval.as_deref().unwrap_or("1h"))
            .map_err(|e| err(format!("compliance.interval: {e}")))?,
    };
    if !(Duration::from_secs(1)..=Duration::from_secs(86400)).contains(&compliance.interval) {
        return Err(err("compliance.interval must be between 1s and 1d".into()));
    }
    let ha_peer_keys: Vec<PathBuf> = raw.ha.map(|h| h.peer_keys).unwrap_or_default().into_iter().map(resolve).collect();
    if !ha_peer_keys.is_empty() && mqtt.is_none() {
        return Err(err("ha.peer_keys: verdicts travel over the site's MQTT broker: configure [mqtt]".into()));
    }
    if ha_peer_keys.len() > 16 {
        return Err(err("ha.peer_keys: at most 16 keys".into()));
    }
    Ok(Config {
        node: NodeConfig { site, name, key_file, state_dir },
        http,
        log: LogConfig { level, format },
        local_models,
        registry,
        audit,
        privacy,
        upstream,
        mqtt,
        overflow,
        auth,
        store_key_file,
        engine_threads,
        models,
        cli,
        grpc,
        webhooks,
        compliance,
        ha_peer_keys,
        path,
    })
}

fn validate_batch(mname: &str, m: &RawModel) -> Result<Option<crate::engine::BatchPolicy>, String> {
    let max_batch = m.max_batch.unwrap_or(1) as usize;
    if !(1..=1024).contains(&max_batch) {
        return Err(format!("models.{mname}.max_batch must be between 1 and 1024"));
    }
    if max_batch == 1 {
        if m.max_queue_delay.is_some() || m.preferred_batch.is_some() || m.batch_sizes.is_some() {
            return Err(format!("models.{mname}: max_queue_delay, preferred_batch and batch_sizes need max_batch > 1"));
        }
        return Ok(None);
    }
    let max_delay = parse_duration(m.max_queue_delay.as_deref().unwrap_or("0s"))
        .map_err(|e| format!("models.{mname}.max_queue_delay: {e}"))?;
    if max_delay > Duration::from_secs(1) {
        return Err(format!("models.{mname}.max_queue_delay must be at most 1s"));
    }
    let mut preferred: Vec<usize> = m.preferred_batch.iter().flatten().map(|&v| v as usize).collect();
    preferred.sort_unstable();
    preferred.dedup();
    if preferred.iter().any(|&p| p == 0 || p > max_batch) {
        return Err(format!("models.{mname}.preferred_batch sizes must be between 1 and max_batch ({max_batch})"));
    }
    let mut sizes: Vec<usize> = m.batch_sizes.iter().flatten().map(|&v| v as usize).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.iter().any(|&p| p == 0 || p > max_batch) {
        return Err(format!("models.{mname}.batch_sizes must be between 1 and max_batch ({max_batch})"));
    }
    Ok(Some(crate::engine::BatchPolicy { max_batch, max_delay, preferred, sizes }))
}

fn validate_http(
    h: &RawHttp,
    listen: SocketAddr,
    max_body_bytes: usize,
    request_timeout: Duration,
    has_auth: bool,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<HttpConfig, String> {
    let tls = match (&h.tls_cert, &h.tls_key) {
        (Some(c), Some(k)) => Some(TlsFiles {
            cert: resolve(c.clone()),
            key: resolve(k.clone()),
            client_ca: h.client_ca.clone().map(resolve),
        }),
        (None, None) => {
            if h.client_ca.is_some() {
                return Err("http.client_ca needs http.tls_cert and http.tls_key".into());
            }
            None
        }
        _ => return Err("http.tls_cert and http.tls_key go together".into()),
    };
    if !listen.ip().is_loopback() {
        if !has_auth {
            return Err(format!(
                "http.listen {listen} is not a loopback address: serving the LAN needs an [auth] section"
            ));
        }
        if tls.is_none() && !h.allow_plaintext.unwrap_or(false) {
            return Err(format!(
                "http.listen {listen} is not a loopback address: set http.tls_cert and http.tls_key \
                 (or http.allow_plaintext = true to serve the LAN without TLS)"
            ));
        }
    }
    let dur = |v: &Option<String>, d: &str, k: &str| -> Result<Duration, String> {
        let d = parse_duration(v.as_deref().unwrap_or(d)).map_err(|e| format!("http.{k}: {e}"))?;
        if d.is_zero() || d > Duration::from_secs(86400) {
            return Err(format!("http.{k} must be between 1us and 1d"));
        }
        Ok(d)
    };
    let max_connections = h.max_connections.unwrap_or(1024) as usize;
    if !(1..=1_000_000).contains(&max_connections) {
        return Err("http.max_connections must be between 1 and 1000000".into());
    }
    let max_header_bytes = h.max_header_bytes.unwrap_or(64 << 10) as usize;
    if !(8192..=(16 << 20)).contains(&max_header_bytes) {
        return Err("http.max_header_bytes must be between 8192 and 16777216".into());
    }
    Ok(HttpConfig {
        listen,
        max_body_bytes,
        request_timeout,
        tls,
        max_connections,
        max_header_bytes,
        header_read_timeout: dur(&h.header_read_timeout, "10s", "header_read_timeout")?,
        idle_timeout: dur(&h.idle_timeout, "60s", "idle_timeout")?,
    })
}

fn validate_auth(a: RawAuth) -> Result<crate::auth::AuthConfig, String> {
    use crate::auth::{ClientEntry, Role, TokenEntry};
    let roles = |list: &[String], who: &str| -> Result<Vec<Role>, String> {
        if list.is_empty() {
            return Err(format!("auth: {who} has no roles"));
        }
        list.iter().map(|r| Role::parse(r).map_err(|e| format!("auth: {who}: {e}"))).collect()
    };
    let models = |m: Option<Vec<String>>, who: &str| -> Result<Option<Vec<String>>, String> {
        if let Some(list) = &m {
            if let Some(bad) = list.iter().find(|x| !valid_name(x)) {
                return Err(format!("auth: {who}: '{bad}' is not a model name"));
            }
        }
        Ok(m)
    };
    let mut tokens = Vec::new();
    for t in a.tokens {
        if !valid_name(&t.name) {
            return Err(format!("auth.tokens: name '{}' must be 1-128 of [A-Za-z0-9._-]", t.name));
        }
        if tokens.iter().any(|x: &TokenEntry| x.name == t.name) {
            return Err(format!("auth.tokens: '{}' appears twice", t.name));
        }
        let who = format!("token '{}'", t.name);
        let token_roles = roles(&t.roles, &who)?;
        let bytes = outpost_proto::registry::hex::decode(&t.sha256)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("auth: {who}: sha256 must be 64 hex digits (see `outpost token create`)"))?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes);
        tokens.push(TokenEntry { roles: token_roles, models: models(t.models, &who)?, name: t.name, sha256 });
    }
    let mut clients = Vec::new();
    for c in a.clients {
        if c.subject.is_empty() || c.subject.len() > 256 {
            return Err("auth.clients: subject must be 1-256 characters".into());
        }
        let who = format!("client '{}'", c.subject);
        clients.push(ClientEntry {
            roles: roles(&c.roles, &who)?,
            models: models(c.models, &who)?,
            subject: c.subject,
        });
    }
    let rate_limit = match a.rate_limit {
        None => None,
        Some(r) if r.is_finite() && r > 0.0 && r <= 1e9 => Some(r),
        Some(_) => return Err("auth.rate_limit must be a positive number of requests per second".into()),
    };
    let rate_burst = a.rate_burst.unwrap_or_else(|| rate_limit.map_or(1, |r| r.ceil().clamp(1.0, 1e6) as u32));
    if rate_burst == 0 {
        return Err("auth.rate_burst must be at least 1".into());
    }
    Ok(crate::auth::AuthConfig { tokens, clients, rate_limit, rate_burst })
}

fn validate_mqtt(
    m: RawMqtt,
    node: &str,
    http_timeout: Duration,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<MqttConfig, String> {
    let url = m.url.unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("mqtt.url '{url}' must be mqtt://host:port or mqtts://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']).to_owned(),
            p.parse::<u16>().map_err(|_| format!("mqtt.url '{url}': bad port"))?,
        ),
        None => (rest.to_owned(), if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("mqtt.url '{url}' has no host"));
    }
    let topic_ok = |s: &str| !s.is_empty() && !s.contains(['+', '#', '\0']) && !s.starts_with('$');
    let topic_prefix = m.topic_prefix.unwrap_or_else(|| "outpost".into());
    if !topic_ok(&topic_prefix) || topic_prefix.ends_with('/') {
        return Err(format!("mqtt.topic_prefix '{topic_prefix}' must be a plain topic (no wildcards, no leading $)"));
    }
    let shared_group = m.shared_group.unwrap_or_else(|| "outpost".into());
    if !shared_group.is_empty() && !valid_name(&shared_group) {
        return Err(format!("mqtt.shared_group '{shared_group}' must be 1-128 of [A-Za-z0-9._-] (or empty)"));
    }
    let qos = m.qos.unwrap_or(1);
    if qos > 1 {
        return Err("mqtt.qos must be 0 or 1".into());
    }
    let dur = |v: Option<String>, d: &str, k: &str| {
        parse_duration(v.as_deref().unwrap_or(d)).map_err(|e| format!("mqtt.{k}: {e}"))
    };
    let keep_alive = dur(m.keep_alive, "30s", "keep_alive")?;
    if keep_alive < Duration::from_secs(5) {
        return Err("mqtt.keep_alive must be at least 5s".into());
    }
    let client_id = m.client_id.unwrap_or_else(|| format!("outpost-{node}"));
    if client_id.is_empty() || client_id.len() > 128 {
        return Err("mqtt.client_id must be 1-128 characters".into());
    }
    Ok(MqttConfig {
        host,
        port,
        tls,
        client_id,
        topic_prefix,
        shared_group,
        qos,
        keep_alive,
        inflight: m.inflight.unwrap_or(32).clamp(1, 1024),
        session_expiry: dur(m.session_expiry, "5m", "session_expiry")?,
        username: m.username,
        password_file: m.password_file.map(resolve),
        ca: m.ca.map(resolve),
        client_cert: m.client_cert.map(resolve),
        client_key: m.client_key.map(resolve),
        max_payload_bytes: m.max_payload_bytes.unwrap_or(16 << 20).clamp(1024, 256 << 20),
        request_timeout: match m.request_timeout {
            Some(t) => parse_duration(&t).map_err(|e| format!("mqtt.request_timeout: {e}"))?,
            None => http_timeout,
        },
    })
}

fn validate_registry(
    r: RawRegistry,
    dev: bool,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<RegistryConfig, String> {
    let allow_http = r.allow_http.unwrap_or(false);
    if let Some(path) = r.url.strip_prefix("file://") {
        if !Path::new(path).is_absolute() {
            return Err(format!("registry.url '{}' must be an absolute file:// path", r.url));
        }
    } else if r.url.starts_with("http://") {
        if !allow_http {
            return Err(format!("registry.url '{}' is plain http: set registry.allow_http = true to accept it", r.url));
        }
    } else if !r.url.starts_with("https://") {
        return Err(format!("registry.url '{}' must start with https://, http:// or file://", r.url));
    }
    let trusted_root = resolve(r.trusted_root);
    let root_bytes =
        std::fs::read(&trusted_root).map_err(|e| format!("registry.trusted_root {}: {e}", trusted_root.display()))?;
    match outpost_proto::registry::root_is_demo(&root_bytes) {
        None => return Err(format!("registry.trusted_root {} is not a registry root", trusted_root.display())),
        Some(true) if !dev => {
            return Err(format!(
                "registry.trusted_root {} is the demo root (demo-only key): only the dev profile may trust it",
                trusted_root.display()
            ))
        }
        Some(_) => {}
    }
    let poll_interval = parse_duration(r.poll_interval.as_deref().unwrap_or("60s"))
        .map_err(|e| format!("registry.poll_interval: {e}"))?;
    if poll_interval < Duration::from_millis(100) {
        return Err("registry.poll_interval must be at least 100ms".into());
    }
    let timeout =
        parse_duration(r.timeout.as_deref().unwrap_or("30s")).map_err(|e| format!("registry.timeout: {e}"))?;
    if timeout.is_zero() {
        return Err("registry.timeout must be positive".into());
    }
    let stall_timeout = parse_duration(r.stall_timeout.as_deref().unwrap_or("30s"))
        .map_err(|e| format!("registry.stall_timeout: {e}"))?;
    if stall_timeout.is_zero() {
        return Err("registry.stall_timeout must be positive".into());
    }
    let channel = r.channel.unwrap_or_else(|| "stable".into());
    if !valid_name(&channel) {
        return Err(format!("registry.channel '{channel}' must be 1-128 of [A-Za-z0-9._-]"));
    }
    Ok(RegistryConfig {
        url: r.url,
        trusted_root,
        poll_interval,
        channel,
        allow_http,
        ca: r.ca.map(resolve),
        timeout,
        stall_timeout,
        max_blob_bytes: r.max_blob_bytes.unwrap_or(2 << 30),
        max_model_bytes: r.max_model_bytes.unwrap_or(4 << 30),
    })
}

fn validate_webhook(
    w: RawWebhook,
    residency: &crate::residency::AllowList,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<WebhookConfig, String> {
    let allow_http = w.allow_http.unwrap_or(false);
    if !(w.url.starts_with("https://") || (allow_http && w.url.starts_with("http://"))) {
        return Err(format!("webhooks.url '{}' must be https:// (http:// needs allow_http = true)", w.url));
    }
    let host = crate::privacy::url_host(&w.url).ok_or_else(|| format!("webhooks.url '{}' has no host", w.url))?;
    if !residency.host_allowed(&host) {
        return Err(format!("webhooks.url host '{host}' is not in privacy.residency_allow"));
    }
    let name = w.name.unwrap_or_else(|| w.url.clone());
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(format!("webhooks.name '{name}' must be 1 to 200 printable characters"));
    }
    let events = w.events.unwrap_or_else(|| vec!["*".into()]);
    for e in &events {
        let ok = e == "*"
            || (e.len() <= 200 && e.chars().all(|c| c.is_ascii_alphanumeric() || "._-*".contains(c)))
                && e.find('*').is_none_or(|i| i == e.len() - 1);
        if !ok {
            return Err(format!(
                "webhooks.events '{e}': an event type (io.outpost.model.activated) or a prefix ending in * \
                 (io.outpost.model.*)"
            ));
        }
    }
    let dur = |v: Option<String>, d: &str, k: &str| {
        parse_duration(v.as_deref().unwrap_or(d)).map_err(|e| format!("webhooks.{k}: {e}"))
    };
    let timeout = dur(w.timeout, "10s", "timeout")?.max(Duration::from_millis(10));
    let retry_initial = dur(w.retry_initial, "1s", "retry_initial")?.max(Duration::from_millis(10));
    let retry_max = dur(w.retry_max, "10m", "retry_max")?.max(retry_initial);
    let max_attempts = w.max_attempts.unwrap_or(15);
    if !(1..=1000).contains(&max_attempts) {
        return Err("webhooks.max_attempts must be between 1 and 1000".into());
    }
    let max_queued = w.max_queued.unwrap_or(10_000);
    if !(1..=1_000_000).contains(&max_queued) {
        return Err("webhooks.max_queued must be between 1 and 1000000".into());
    }
    Ok(WebhookConfig {
        name,
        url: w.url,
        events,
        secret_file: resolve(w.secret_file),
        ca: w.ca.map(resolve),
        timeout,
        max_attempts,
        max_queued,
        retry_initial,
        retry_max,
    })
}

fn validate_overflow(
    o: RawOverflow,
    residency: &crate::residency::AllowList,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<OverflowConfig, String> {
    let allow_http = o.allow_http.unwrap_or(false);
    if !(o.url.starts_with("https://") || (allow_http && o.url.starts_with("http://"))) {
        return Err(format!("overflow.url '{}' must be https:// (http:// needs overflow.allow_http = true)", o.url));
    }
    let host = crate::privacy::url_host(&o.url).ok_or_else(|| format!("overflow.url '{}' has no host", o.url))?;
    if !residency.host_allowed(&host) {
        return Err(format!("overflow.url host '{host}' is not in privacy.residency_allow"));
    }
    if o.client_cert.is_some() != o.client_key.is_some() {
        return Err("overflow.client_cert and overflow.client_key go together".into());
    }
    let dur = |v: Option<String>, d: &str, k: &str| -> Result<Duration, String> {
        let d = parse_duration(v.as_deref().unwrap_or(d)).map_err(|e| format!("overflow.{k}: {e}"))?;
        if d.is_zero() || d > Duration::from_secs(3600) {
            return Err(format!("overflow.{k} must be between 1us and 1h"));
        }
        Ok(d)
    };
    Ok(OverflowConfig {
        url: o.url.trim_end_matches('/').to_owned(),
        host,
        slo_p99: dur(o.slo_p99, "50ms", "slo_p99")?,
        token_file: o.token_file.map(resolve),
        ca: o.ca.map(resolve),
        client_cert: o.client_cert.map(resolve),
        client_key: o.client_key.map(resolve),
        timeout: dur(o.timeout, "5s", "timeout")?,
        binary: o.binary.unwrap_or(true),
        failure_threshold: o.failure_threshold.unwrap_or(5).clamp(1, 10_000),
        failure_window: dur(o.failure_window, "10s", "failure_window")?,
        open_for: dur(o.open_for, "5s", "open_for")?,
    })
}

fn validate_model_overflow(name: &str, m: &RawModel) -> Result<ModelOverflow, String> {
    let mode = match m.overflow.as_deref().unwrap_or("auto") {
        "auto" => OverflowMode::Auto,
        "never" => OverflowMode::Never,
        "remote_only" => OverflowMode::RemoteOnly,
        other => {
            return Err(format!("models.{name}.overflow '{other}' must be \"auto\", \"never\" or \"remote_only\""))
        }
    };
    for (k, v) in [("overflow_model", &m.overflow_model), ("overflow_version", &m.overflow_version)] {
        if v.as_deref().is_some_and(|v| !valid_name(v)) {
            return Err(format!("models.{name}.{k} must be 1-128 of [A-Za-z0-9._-]"));
        }
    }
    let slo_p99 = match &m.slo_p99 {
        None => None,
        Some(s) => Some(parse_duration(s).map_err(|e| format!("models.{name}.slo_p99: {e}"))?),
    };
    let confidence_min = match m.confidence_min {
        None => None,
        Some(c) if (0.0..=1.0).contains(&c) => Some(c),
        Some(_) => return Err(format!("models.{name}.confidence_min must be between 0 and 1")),
    };
    if confidence_min.is_some() != m.confidence_output.is_some() {
        return Err(format!("models.{name}: confidence_min and confidence_output go together"));
    }
    Ok(ModelOverflow {
        mode,
        remote_model: m.overflow_model.clone(),
        remote_version: m.overflow_version.clone(),
        slo_p99,
        confidence_output: m.confidence_output.clone(),
        confidence_min,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/outpost/outpost.toml"))
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.http.max_body_bytes, 16_777_216);
        assert_eq!(c.node.site, "demo-site");
        assert_eq!(c.node.state_dir, PathBuf::from("/var/lib/outpost"));
        assert!(c.local_models.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = parse("[http]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `lisen`"), "{e}");
        assert!(parse("[bogus]\n").is_err());
        assert!(parse("[models.mlp]\nmax_batch_size = 3\n").is_err());
    }

    #[test]
    fn intra_op_threads_default_by_model_size_and_follow_the_config() {
        let large = crate::engine::model::LARGE_MODEL_BYTES;
        let d = ModelConfig::default();
        assert_eq!(d.threads_per_run(large), crate::engine::cpu::cores(), "large models: every core");
        assert_eq!(d.threads_per_run(large - 1), 1, "small models: one");
        let c = parse("[models.mlp]\nintra_op_threads = 3\n").expect("valid");
        assert_eq!(c.model("mlp").threads_per_run(1), 3);
        assert_eq!(c.model("mlp").serve_options(1).threads_per_run, 3);
    }

    #[test]
    fn invalid_values_are_rejected_with_the_key_named() {
        for (text, key) in [
            ("[http]\nlisten = \"nowhere\"", "http.listen"),
            ("[http]\nlisten = \"0.0.0.0:8080\"", "[auth]"),
            ("[http]\nmax_body_bytes = 0", "http.max_body_bytes"),
            ("[http]\nrequest_timeout = \"10 parsecs\"", "http.request_timeout"),
            ("[node]\nsite = \"a/b\"", "node.site"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("[models.\"../x\"]\n", "model names"),
            ("[models.mlp]\ninstances = 0", "instances"),
            ("[models.mlp]\nintra_op_threads = 0", "intra_op_threads"),
            ("[models.mlp]\nmax_batch = 0", "max_batch"),
            ("[models.mlp]\nmax_batch = 4\npreferred_batch = [8]", "preferred_batch"),
            ("[models.mlp]\nmax_batch = 4\nbatch_sizes = [0, 4]", "batch_sizes"),
            ("[models.mlp]\nbatch_sizes = [2]", "batch_sizes"),
            ("[models.mlp]\nmax_queue_delay = \"1ms\"", "need max_batch"),
            ("[models.mlp]\nmax_batch = 4\nmax_queue_delay = \"5s\"", "max_queue_delay"),
            ("[models.mlp]\nqueue_timeout = \"0s\"", "queue_timeout"),
            ("[engine]\nthreads = 0", "engine.threads"),
            ("[http]\nlisten = \"0.0.0.0:8080\"\n[auth]\n", "tls_cert"),
            ("[http]\ntls_cert = \"a.pem\"", "go together"),
            ("[http]\nclient_ca = \"ca.pem\"", "client_ca"),
            ("[http]\nmax_header_bytes = 10", "http.max_header_bytes"),
            ("[http]\nidle_timeout = \"0s\"", "http.idle_timeout"),
            ("[auth]\ntokens = [{ name = \"a\", sha256 = \"00\", roles = [\"infer\"] }]", "64 hex"),
            ("[auth]\ntokens = [{ name = \"a\", sha256 = \"\", roles = [] }]", "no roles"),
            ("[auth]\nclients = [{ subject = \"x\", roles = [\"root\"] }]", "unknown role"),
            ("[auth]\nrate_limit = -1.0", "auth.rate_limit"),
            ("[store]\nencrypt = false\nkey_file = \"k\"", "store.key_file"),
            ("[overflow]\nurl = \"http://gpu.example\"", "overflow.url"),
            (
                "[overflow]\nurl = \"https://gpu.example\"\n[privacy]\nresidency_allow = [\"eu.example\"]",
                "residency_allow",
            ),
            ("[overflow]\nurl = \"https://gpu.example\"\nopen_for = \"0s\"", "overflow.open_for"),
            ("[privacy]\nresidency_allow = [\"10.0.0.0/33\"]", "not an address range"),
            ("[privacy.hosts]\n\"r.example\" = [\"not-an-address\"]", "privacy.hosts"),
            ("[models.mlp]\nmay_leave_site = true", "only a signed manifest"),
            ("[models.mlp]\noverflow = \"sometimes\"", "models.mlp.overflow"),
            ("[models.mlp]\nconfidence_min = 0.5", "go together"),
            ("[models.mlp]\nconfidence_output = \"p\"\nconfidence_min = 2.0", "between 0 and 1"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn a_lan_listener_needs_auth_and_tls_or_an_explicit_plaintext_opt_in() {
        let digest = "0".repeat(64);
        let auth = format!(
            "[auth]\ntokens = [{{ name = \"pos\", sha256 = \"{digest}\", roles = [\"infer\"], models = [\"mlp\"] }}]\n"
        );
        let plain = format!("[http]\nlisten = \"0.0.0.0:8080\"\nallow_plaintext = true\n{auth}");
        let c = parse(&plain).unwrap();
        let a = c.auth.expect("auth");
        assert_eq!(a.tokens[0].roles, vec![crate::auth::Role::Infer]);
        assert_eq!(a.tokens[0].models.as_deref(), Some(&["mlp".to_owned()][..]));
        assert_eq!(c.store_key_file, Some(PathBuf::from("/var/lib/outpost/store.key")));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("2ms").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("60").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e400s").is_err());
    }

    #[test]
    fn dev_profile_is_valid_and_loopback() {
        let c = Config::dev_profile();
        assert!(c.is_dev_profile());
        assert!(c.http.listen.ip().is_loopback());
        assert!(c.local_models.iter().any(|d| d.ends_with("models")));
    }
}
