//! Outpost: an edge inference agent. See ARCHITECTURE.md for the map.
//!
//! [`start`] brings the whole agent up (HTTP listener, model loading) and returns an [`Agent`]
//! handle; [`run`] serves until a shutdown future resolves. Tests use both.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod http;
pub mod lifecycle;
pub mod mqtt;
pub mod notify;
pub mod outbox;
pub mod overflow;
pub mod privacy;
pub use outpost_proto::protocol;
pub mod registry;
pub mod store;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use api::{InferenceService, LogSink, Repository};
use config::{Config, ConfigError};
use lifecycle::LocalModels;
use telemetry::Metrics;

/// How long in-flight HTTP requests may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors that stop the agent; each maps to a process exit code.
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
}

impl FatalError {
    /// sysexits(3) codes: 64 usage, 78 configuration, 69 service unavailable, 70 software.
    pub fn exit_code(&self) -> i32 {
        match self {
            FatalError::Usage(_) => 64,
            FatalError::Config(_) => 78,
            FatalError::Bind { .. } => 69,
            FatalError::Runtime(_) => 70,
        }
    }
}

/// A running agent.
pub struct Agent {
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    started: watch::Receiver<bool>,
    config: Arc<RwLock<Arc<Config>>>,
    service: InferenceService,
    local: Arc<LocalModels>,
    registry: Option<tokio::sync::mpsc::Sender<registry::sync::Command>>,
    server: tokio::task::JoinHandle<Result<(), FatalError>>,
    /// The listener's TLS configuration, reloaded with the config.
    tls: Option<Arc<http::server::TlsHandle>>,
    audit: Option<audit::Audit>,
    outbox_wake: Arc<tokio::sync::Notify>,
}

impl Agent {
    /// The address the HTTP listener is bound to (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn service(&self) -> &InferenceService {
        &self.service
    }

    /// Resolves once the initial model load has finished (models serving or refused).
    pub async fn started(&self) {
        let mut rx = self.started.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies a new, already validated configuration: model settings and directories take
    /// effect now, tokens and TLS certificates too; a changed listen address or connection
    /// limit needs a restart.
    pub async fn reload(&self, new: Config) {
        let old = self.config();
        if old.http.listen != new.http.listen {
            tracing::warn!(old = %old.http.listen, new = %new.http.listen, "http.listen changes on restart only");
        }
        notify::notify("RELOADING=1");
        match (&self.tls, &new.http.tls) {
            (Some(handle), Some(files)) => match handle.reload(files) {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "TLS reload failed: the current certificate stays"),
            },
            (None, None) => {}
            _ => tracing::warn!("turning TLS on or off takes a restart"),
        }
        engine::cpu::set_threads(new.engine_threads);
        let new = Arc::new(new);
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        let refused = self.local.reconcile(&self.service, &new).await;
        tracing::info!(refused = refused.len(), "configuration reloaded");
        notify::notify("READY=1");
    }

    /// The audit log, when enabled.
    pub fn audit(&self) -> Option<&audit::Audit> {
        self.audit.as_ref()
    }

    /// Asks the outbox to send now rather than at its next interval.
    pub fn wake_outbox(&self) {
        self.outbox_wake.notify_one();
    }

    /// Polls the registry now and waits for the result (instead of the poll timer).
    pub async fn poll_registry(&self) -> Result<registry::sync::PollReport, registry::RegistryError> {
        let tx = self
            .registry
            .as_ref()
            .ok_or_else(|| registry::RegistryError::Invalid("no [registry] configured".into()))?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(registry::sync::Command::PollNow(reply))
            .await
            .map_err(|_| registry::RegistryError::Io("registry task stopped".into()))?;
        rx.await.map_err(|_| registry::RegistryError::Io("registry task stopped".into()))?
    }

    /// Stops accepting, lets in-flight requests finish (bounded by [`SHUTDOWN_GRACE`]), stops
    /// the models' workers.
    pub async fn shutdown(self) -> Result<(), FatalError> {
        notify::notify("STOPPING=1");
        self.cancel.cancel();
        let result = match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), self.server).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(FatalError::Runtime(format!("http server task failed: {e}"))),
            Err(_) => Err(FatalError::Runtime("http server did not stop in time".into())),
        };
        self.tracker.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait()).await;
        for name in self.service.repository.names() {
            self.service.repository.remove(&name);
        }
        if let Some(a) = &self.audit {
            a.close();
        }
        tracing::info!("stopped");
        result
    }
}

/// Starts the agent: binds the listener, then loads models in the background.
pub async fn start(config: Config) -> Result<Agent, FatalError> {
    tls::install_crypto_provider();
    engine::cpu::set_threads(config.engine_threads);
    std::fs::create_dir_all(&config.node.state_dir).map_err(|e| {
        FatalError::Runtime(format!("cannot create state directory {}: {e}", config.node.state_dir.display()))
    })?;
    let tls_handle = match &config.http.tls {
        Some(files) => Some(Arc::new(
            http::server::TlsHandle::new(files).map_err(|e| FatalError::Runtime(format!("http TLS: {e}")))?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| FatalError::Bind { addr: config.http.listen, source })?;
    let addr = listener.local_addr().map_err(|source| FatalError::Bind { addr: config.http.listen, source })?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let repository = Arc::new(Repository::new());
    let metrics = Arc::new(Metrics::new());
    let privacy = Arc::new(
        privacy::Privacy::load(
            &config.privacy.hmac_key_file,
            config.privacy.pseudonymize.clone(),
            config.privacy.sensitive_inputs.clone(),
            config.privacy.residency_allow.clone(),
        )
        .map_err(FatalError::Runtime)?,
    );
    let audit = match &config.audit {
        Some(ac) => {
            let trace = cfg!(feature = "failpoints").then(|| Arc::new(audit::Trace::default()));
            Some(
                audit::Audit::open(&config.node.state_dir.join("audit"), ac, trace)
                    .map_err(|e| FatalError::Runtime(format!("audit log: {e}")))?,
            )
        }
        None => {
            tracing::warn!("[audit] enabled = false: inference is not audited");
            None
        }
    };
    let primary: Arc<dyn api::EventSink> = match &audit {
        Some(a) => Arc::new(audit::sink::AuditSink::new(a.clone(), metrics.clone())),
        None => Arc::new(LogSink),
    };
    let (lifecycle_tx, _) = tokio::sync::broadcast::channel(256);
    let events: Arc<dyn api::EventSink> = Arc::new(api::events::Tee { primary, lifecycle: lifecycle_tx.clone() });
    let mut service = InferenceService::new(repository, metrics, events);
    service.privacy = Some(privacy.clone());
    if let Some(oc) = &config.overflow {
        let ov = Arc::new(
            overflow::Overflow::new(oc.clone(), Some(privacy.clone()))
                .map_err(|e| FatalError::Runtime(format!("overflow: {e}")))?,
        );
        *service.metrics.overflow_breaker.write().unwrap_or_else(|p| p.into_inner()) = Some(ov.clone());
        tracing::info!(target_url = %oc.url, slo_p99 = ?oc.slo_p99, "overflow target configured");
        service.overflow = Some(ov);
    }
    let config = Arc::new(RwLock::new(Arc::new(config)));
    service.config = Some(config.clone());
    let started_flag = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = watch::channel(false);
    let local = Arc::new(LocalModels::default());
    let cfg = config.read().unwrap_or_else(|p| p.into_inner()).clone();

    // The registry task first: the service must carry its verdict channel before anything
    // clones the service.
    let mut registry_task = None;
    if let Some(rc) = &cfg.registry {
        let (verdict_tx, verdict_rx) = tokio::sync::mpsc::unbounded_channel();
        service.verdicts = Some(verdict_tx);
        let sync = registry::sync::RegistrySync::open(rc.clone(), &cfg.node.state_dir, service.clone(), config.clone())
            .map_err(|e| FatalError::Runtime(format!("registry: {e}")))?;
        registry_task = Some((sync, verdict_rx));
    }
    let (registry_tx, registry_first) = match registry_task {
        Some((sync, verdict_rx)) => {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            tracker.spawn(sync.run(rx, verdict_rx, cancel.child_token(), first_tx));
            (Some(tx), Some(first_rx))
        }
        None => (None, None),
    };

    let control = Arc::new(AgentControl {
        registry: registry_tx.clone(),
        local: local.clone(),
        service: service.clone(),
        config: config.clone(),
    });
    if let Some(mc) = &cfg.mqtt {
        let topics =
            mqtt::Topics { prefix: mc.topic_prefix.clone(), site: cfg.node.site.clone(), node: cfg.node.name.clone() };
        tracker.spawn(mqtt::run(
            mc.clone(),
            topics,
            service.clone(),
            lifecycle_tx.subscribe(),
            started_rx.clone(),
            cancel.child_token(),
        ));
    }
    let outbox_wake = Arc::new(tokio::sync::Notify::new());
    if let (Some(up), Some(a)) = (&cfg.upstream, &audit) {
        let ob = outbox::Outbox::new(
            up.clone(),
            &cfg.node.name,
            &cfg.node.site,
            a.clone(),
            service.metrics.clone(),
            service.repository.clone(),
            Some(privacy.clone()),
            cfg.audit.as_ref().map_or(Duration::from_secs(7 * 86400), |c| c.retention),
            &cfg.node.state_dir.join("telemetry"),
        )
        .map_err(FatalError::Runtime)?;
        tracker.spawn(ob.run(cancel.child_token(), outbox_wake.clone()));
    }
    let state = http::HttpState::new(http::HttpShared {
        service: service.clone(),
        config: config.clone(),
        started: started_flag.clone(),
        control,
        started_at: std::time::Instant::now(),
        trace: audit.as_ref().and_then(audit::Audit::trace),
        limiter: Arc::new(auth::RateLimiter::default()),
    });
    let app = http::router(state);
    let server_cancel = cancel.clone();
    let limits = http::server::Limits::from(&cfg.http);
    let server_tls = tls_handle.clone();
    let server_metrics = service.metrics.clone();
    let server = tokio::spawn(async move {
        http::server::serve(listener, app, server_tls, limits, server_metrics, server_cancel, SHUTDOWN_GRACE).await;
        Ok(())
    });
    let scheme = if tls_handle.is_some() { "https" } else { "http" };
    let mtls = cfg.http.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    tracing::info!(%addr, scheme, mtls, auth = cfg.auth.is_some(), "listening");

    {
        let service = service.clone();
        let local = local.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            tokio::select! {
                refused = local.reconcile(&service, &cfg) => {
                    if let Some(first) = registry_first {
                        let _ = first.await;
                    }
                    let serving = service.repository.ready_count();
                    tracing::info!(serving, refused = refused.len(), "initial model load finished");
                    notify::notify(&format!("READY=1\nSTATUS=serving {serving} models"));
                }
                _ = cancel.cancelled() => {}
            }
            started_flag.store(true, Ordering::SeqCst);
            let _ = started_tx.send(true);
        });
    }

    Ok(Agent {
        addr,
        cancel,
        tracker,
        started: started_rx,
        config,
        service,
        local,
        registry: registry_tx,
        server,
        audit,
        outbox_wake,
        tls: tls_handle,
    })
}

/// Model administration for the adapters: registry models through the registry task, local
/// models through `LocalModels`.
struct AgentControl {
    registry: Option<tokio::sync::mpsc::Sender<registry::sync::Command>>,
    local: Arc<LocalModels>,
    service: InferenceService,
    config: Arc<RwLock<Arc<Config>>>,
}

impl AgentControl {
    async fn ask<T: Send + 'static>(
        registry: Option<tokio::sync::mpsc::Sender<registry::sync::Command>>,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, registry::RegistryError>>) -> registry::sync::Command,
    ) -> Option<Result<T, api::control::ControlError>> {
        let tx = registry?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        if tx.send(make(reply)).await.is_err() {
            return Some(Err(api::control::ControlError::Unavailable("registry task stopped".into())));
        }
        Some(match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(registry::RegistryError::NotFound(m))) => Err(api::control::ControlError::NotFound(m)),
            Ok(Err(e)) => Err(api::control::ControlError::Failed(e.to_string())),
            Err(_) => Err(api::control::ControlError::Unavailable("registry task stopped".into())),
        })
    }

    fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A registry model goes through the registry task (which owns the store); otherwise a
    /// local model is loaded from or unloaded to its directory.
    fn load_or_unload(&self, model: String, load: bool) -> api::control::ControlFuture<String> {
        let registry = self.registry.clone();
        let local = self.local.clone();
        let service = self.service.clone();
        let config = self.config();
        let done = if load { "loaded" } else { "unloaded" };
        Box::pin(async move {
            let m = model.clone();
            let asked = Self::ask(registry, |reply| {
                if load {
                    registry::sync::Command::Load { model: m, reply }
                } else {
                    registry::sync::Command::Unload { model: m, reply }
                }
            })
            .await;
            if let Some(handled) = asked {
                if handled? {
                    return Ok(format!("{model} {done}"));
                }
            }
            if !local.knows(&config, &model) {
                return Err(api::control::ControlError::NotFound(model));
            }
            if load {
                local.load(&service, &config, &model).await.map_err(api::control::ControlError::Failed)?;
            } else {
                local.unload(&service, &model).await;
            }
            Ok(format!("{model} {done}"))
        })
    }
}

impl api::control::ModelControl for AgentControl {
    fn load(&self, model: String) -> api::control::ControlFuture<String> {
        self.load_or_unload(model, true)
    }

    fn unload(&self, model: String) -> api::control::ControlFuture<String> {
        self.load_or_unload(model, false)
    }

    fn rollback(&self, model: String) -> api::control::ControlFuture<String> {
        let registry = self.registry.clone();
        Box::pin(async move {
            match Self::ask(registry, |reply| registry::sync::Command::Rollback { model, reply }).await {
                Some(r) => r,
                None => Err(api::control::ControlError::Failed("rollback needs a [registry]".into())),
            }
        })
    }

    fn poll(&self) -> api::control::ControlFuture<serde_json::Value> {
        let registry = self.registry.clone();
        Box::pin(async move {
            match Self::ask(registry, registry::sync::Command::PollNow).await {
                Some(r) => r.map(|rep| {
                    serde_json::json!({
                        "index_version": rep.index_version,
                        "installed": rep.installed,
                        "canaries": rep.canaries,
                        "failed": rep.failed,
                    })
                }),
                None => Err(api::control::ControlError::Failed("no [registry] configured".into())),
            }
        })
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), FatalError> {
    let agent = start(config).await?;
    shutdown.await;
    agent.shutdown().await
}
