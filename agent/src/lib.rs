//! Outpost: an edge inference agent. See ARCHITECTURE.md for the map.
//!
//! [`start`] brings the whole agent up (HTTP listener, model loading) and returns an [`Agent`]
//! handle; [`run`] serves until a shutdown future resolves. Tests use both.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod credentials;
pub mod engine;
pub mod events;
pub mod failpoint;
pub mod grpc;
pub mod ha;
pub mod http;
pub mod jobs;
pub mod lifecycle;
pub mod locks;
pub mod logging;
pub mod mqtt;
pub mod notify;
pub mod outbox;
pub mod overflow;
pub mod privacy;
pub use outpost_proto::protocol;
pub mod registry;
pub mod reload;
pub mod residency;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verdicts;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::locks::RwLockExt;
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
    /// The running agent (or another service) cannot be reached.
    #[error("cannot reach {0}")]
    Unreachable(String),
    /// A part of the agent that cannot start, with the cause.
    #[error("{what}: {source}")]
    Start {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    StateLocked(String),
}

impl FatalError {
    /// sysexits(3) codes: 64 usage, 78 configuration, 69 service unavailable (the address or
    /// the state directory is taken), 70 software.
    pub fn exit_code(&self) -> i32 {
        match self {
            FatalError::Usage(_) => 64,
            FatalError::Config(_) => 78,
            FatalError::Bind { .. } | FatalError::StateLocked(_) | FatalError::Unreachable(_) => 69,
            FatalError::Runtime(_) | FatalError::Start { .. } => 70,
        }
    }

    /// A part of the agent that cannot start (`what`), keeping the cause as the error's source.
    pub fn start(what: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> FatalError {
        FatalError::Start { what, source: Box::new(source) }
    }
}

/// A running agent.
pub struct Agent {
    addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    started: watch::Receiver<bool>,
    /// Stops the HTTP listener first at shutdown (then the rest, with `cancel`).
    http_cancel: CancellationToken,
    config: Arc<RwLock<Arc<Config>>>,
    service: InferenceService,
    local: Arc<LocalModels>,
    registry: Option<tokio::sync::mpsc::Sender<registry::sync::Command>>,
    server: tokio::task::JoinHandle<Result<(), FatalError>>,
    /// The listener's TLS configuration, reloaded with the config.
    tls: Option<Arc<http::server::TlsHandle>>,
    audit: Option<audit::Audit>,
    outbox_wake: Arc<tokio::sync::Notify>,
    /// The MQTT task, restarted when a reload changes `[mqtt]`.
    mqtt: tokio::sync::Mutex<Option<MqttTask>>,
    /// What a restarted MQTT task needs.
    lifecycle: tokio::sync::broadcast::Sender<Arc<events::Published>>,
    /// Reloads so far (names each one in its report).
    reloads: std::sync::atomic::AtomicU64,
    /// The state directory's lock, held while the agent runs.
    _lock: std::fs::File,
}

/// A running MQTT task.
struct MqttTask {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// Starts the MQTT task for `mc`.
fn spawn_mqtt(
    tracker: &TaskTracker,
    parent: &CancellationToken,
    cfg: &Config,
    mc: &config::MqttConfig,
    service: &InferenceService,
    lifecycle: &tokio::sync::broadcast::Sender<Arc<events::Published>>,
    started: watch::Receiver<bool>,
) -> MqttTask {
    let topics =
        mqtt::Topics { prefix: mc.topic_prefix.clone(), site: cfg.node.site.clone(), node: cfg.node.name.clone() };
    let cancel = parent.child_token();
    let handle =
        tracker.spawn(mqtt::run(mc.clone(), topics, service.clone(), lifecycle.subscribe(), started, cancel.clone()));
    MqttTask { cancel, handle }
}

impl Agent {
    /// The address the HTTP listener is bound to (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the gRPC listener is bound to, when `[grpc]` is configured.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
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
        self.config.read_locked().clone()
    }

    /// Applies a new, already validated configuration. Live: models and their settings, local
    /// model directories, tokens and roles, TLS certificate files, `[registry]`, `[mqtt]`,
    /// `log.level`, engine threads, body size and request timeout. The rest needs a restart:
    /// it keeps its running value, and the report (log, `/admin/status`,
    /// `<state_dir>/reload.json`) names it.
    pub async fn reload(&self, mut new: Config) -> reload::ReloadReport {
        if let Some(refusal) = self.service.compliance.as_ref().and_then(|c| enforced_drift(c, &new)) {
            tracing::warn!(error = %refusal, "reload refused: the running configuration stays");
            return self.refuse_reload(refusal);
        }
        notify::notify("RELOADING=1");
        let old = self.config();
        let mut report = reload::ReloadReport::new(self.next_reload());
        report.needs_restart = reload::keep_restart_only(&old, &mut new);
        report.applied = reload::changed_live(&old, &new);
        let failed = |report: &mut reload::ReloadReport, key: &str, why: String| {
            report.applied.retain(|k| k != key);
            report.failed.push(format!("{key}: {why}"));
        };
        // The files are read again even when their paths did not change (renewed in place).
        if let (Some(handle), Some(files)) = (&self.tls, &new.http.tls) {
            match handle.reload(files) {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    failed(&mut report, "http.tls_cert", format!("{e} (the current certificate stays)"));
                    new.http.tls = old.http.tls.clone();
                }
            }
        }
        if old.log.level != new.log.level {
            match logging::set_level(&new.log.level) {
                Ok(true) => {}
                Ok(false) => {
                    report.applied.retain(|k| k != "log.level");
                    report.applied.push("log.level (RUST_LOG governs the log)".into());
                }
                Err(e) => {
                    failed(&mut report, "log.level", e);
                    new.log.level = old.log.level.clone();
                }
            }
        }
        if let (Some(tx), Some(rc)) = (&self.registry, &new.registry) {
            if old.registry.as_ref() != Some(rc) {
                let (reply, rx) = tokio::sync::oneshot::channel();
                let sent = tx.send(registry::sync::Command::Reconfigure { cfg: rc.clone(), reply }).await.is_ok();
                let result = match (sent, rx.await) {
                    (true, Ok(r)) => r.map_err(|e| e.to_string()),
                    _ => Err("the registry task stopped".to_owned()),
                };
                if let Err(e) = result {
                    failed(&mut report, "[registry]", e);
                    new.registry = old.registry.clone();
                }
            }
        }
        if old.mqtt != new.mqtt {
            if let Err(e) = self.restart_mqtt(&new).await {
                failed(&mut report, "[mqtt]", e);
                new.mqtt = old.mqtt.clone();
            }
        }
        engine::cpu::set_threads(new.engine_threads);
        let new = Arc::new(new);
        *self.config.write_locked() = new.clone();
        report.models_refused = self.local.reconcile(&self.service, &new).await.len();
        if let Some(c) = &self.service.compliance {
            // Checked by the compliance task, which then waits the new interval.
            c.recheck("reload");
        }
        self.publish_reload(&report);
        notify::notify("READY=1");
        report
    }

    /// Records a reload refused as a whole (the file does not load): nothing changes.
    pub fn refuse_reload(&self, error: String) -> reload::ReloadReport {
        let mut report = reload::ReloadReport::new(self.next_reload());
        report.error = Some(error);
        self.publish_reload(&report);
        report
    }

    fn next_reload(&self) -> u64 {
        self.reloads.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Notes in the state directory that the next reload has begun, before its file is read
    /// (see [`reload::started_path`]). Reloads run one at a time, so the next report carries
    /// this generation.
    pub fn reload_started(&self) {
        let generation = self.reloads.load(Ordering::SeqCst) + 1;
        let config = self.config();
        if let Err(e) = reload::write_started(&config.node.state_dir, std::process::id(), generation) {
            tracing::warn!(error = %e, "cannot note the reload's start in the state directory");
        }
    }

    /// The report to the log, the status and the state directory; `restart_needed` raised
    /// while a setting waits for a restart.
    fn publish_reload(&self, report: &reload::ReloadReport) {
        if report.ok() {
            tracing::info!(applied = ?report.applied, models_refused = report.models_refused, "configuration reloaded");
        } else {
            for key in &report.needs_restart {
                tracing::warn!(key = %key, "changed in the configuration file: needs a restart (the running value stays)");
            }
            tracing::warn!(summary = %report.summary(), "configuration reload: not everything was applied");
        }
        if report.error.is_none() {
            self.service.metrics.set_alarm(
                "restart_needed",
                (!report.needs_restart.is_empty())
                    .then(|| format!("changed, needs a restart: {}", report.needs_restart.join(", "))),
            );
        }
        self.service.metrics.set_section("reload", serde_json::to_value(report).unwrap_or_default());
        let dir = self.config().node.state_dir.clone();
        if let Err(e) = report.write(&dir) {
            tracing::warn!(error = %e, dir = %dir.display(), "could not write the reload report");
        }
    }

    /// Stops the MQTT task and starts one with the new settings (none when `[mqtt]` is gone).
    /// Settings the client cannot use are refused before the running task stops.
    async fn restart_mqtt(&self, new: &Config) -> Result<(), String> {
        if let Some(mc) = &new.mqtt {
            let topics = mqtt::Topics {
                prefix: mc.topic_prefix.clone(),
                site: new.node.site.clone(),
                node: new.node.name.clone(),
            };
            mqtt::options(mc, &topics).map_err(|e| e.to_string())?;
        }
        let mut slot = self.mqtt.lock().await;
        if let Some(task) = slot.take() {
            task.cancel.cancel();
            // Bounded: a task that does not stop must not hold the reload.
            if tokio::time::timeout(Duration::from_secs(5), task.handle).await.is_err() {
                tracing::warn!("mqtt: the previous connection did not close in time");
            }
        }
        if let Some(mc) = &new.mqtt {
            *slot = Some(spawn_mqtt(
                &self.tracker,
                &self.cancel,
                new,
                mc,
                &self.service,
                &self.lifecycle,
                self.started.clone(),
            ));
            tracing::info!(broker = %format!("{}:{}", mc.host, mc.port), "mqtt: reconnecting with the new settings");
        } else {
            tracing::info!("mqtt: turned off");
        }
        Ok(())
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
        // In order: no new requests and in-flight ones answered; the head signed; then the
        // other tasks stop (the outbox's last upload carries the checkpoint).
        self.http_cancel.cancel();
        let result = match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), self.server).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(FatalError::Runtime(format!("http server task failed: {e}"))),
            Err(_) => Err(FatalError::Runtime("http server did not stop in time".into())),
        };
        if let Some(a) = &self.audit {
            // Bounded: a disk that hangs must not hold the shutdown (the head is then signed
            // at the next start's first checkpoint).
            if tokio::time::timeout(SHUTDOWN_GRACE, a.checkpoint()).await.is_err() {
                tracing::warn!("audit: the closing checkpoint did not complete in time");
            }
        }
        self.cancel.cancel();
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
    let lock = lock_state_dir(&config.node.state_dir)?;
    check_environment(&config)?;
    // The compliance baseline last accepted from the registry; enforce refuses to start drifting.
    let baseline = registry::trust::persisted_baseline(&config.node.state_dir).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the stored compliance baseline does not verify; none is in force until the next poll");
        None
    });
    let compliance = Arc::new(compliance::Compliance::new(baseline));
    if let Some(refusal) = enforced_drift(&compliance, &config) {
        let path = config.path.clone().unwrap_or_else(|| "dev profile".into());
        return Err(FatalError::Config(ConfigError::Invalid { path, message: refusal }));
    }
    let tls_handle = match &config.http.tls {
        Some(files) => {
            Some(Arc::new(http::server::TlsHandle::new(files).map_err(|e| FatalError::start("http TLS", e))?))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| FatalError::Bind { addr: config.http.listen, source })?;
    let addr = listener.local_addr().map_err(|source| FatalError::Bind { addr: config.http.listen, source })?;
    let grpc_listener = match &config.grpc {
        Some(g) => Some(
            tokio::net::TcpListener::bind(g.listen)
                .await
                .map_err(|source| FatalError::Bind { addr: g.listen, source })?,
        ),
        None => None,
    };
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let repository = Arc::new(Repository::new());
    let metrics = Arc::new(Metrics::new());
    let mut privacy = privacy::Privacy::load(
        &config.privacy.hmac_key_file,
        config.privacy.pseudonymize.clone(),
        config.privacy.sensitive_inputs.clone(),
        config.privacy.residency.clone(),
    )
    .map_err(|e| FatalError::start("privacy", e))?
    .with_epochs(&config.node.state_dir, config.privacy.key_period)
    .map_err(|e| FatalError::Start { what: "privacy", source: e.into() })?;
    // Every outbound connection passes the residency guard; its records reach the audit log
    // once that sink exists (below).
    let guard = Arc::new(residency::Guard::new(config.privacy.residency.clone(), config.privacy.hosts.clone()));
    privacy.guard = Some(guard.clone());
    let privacy = Arc::new(privacy);
    // The checkpoint key's public half, reported in heartbeats (the collector pins it).
    let mut node_public_key = None;
    let audit = match &config.audit {
        Some(ac) => {
            let trace = cfg!(feature = "failpoints").then(|| Arc::new(audit::Trace::default()));
            let key = audit::checkpoint::load_or_create_key(&config.node.key_file)
                .map_err(|e| FatalError::start("audit", e))?;
            node_public_key = serde_json::to_value(key.public()).ok();
            let signer = audit::checkpoint::Signer { key, node: config.node.name.clone() };
            Some(
                audit::Audit::open_signed(&config.node.state_dir.join("audit"), ac, Some(signer), trace)
                    .map_err(|e| FatalError::Runtime(format!("audit log: {e}")))?,
            )
        }
        None => {
            tracing::warn!("[audit] enabled = false: inference is not audited");
            None
        }
    };
    let primary: Arc<dyn api::EventSink> = match &audit {
        Some(a) => Arc::new(api::audit_sink::AuditSink::new(a.clone(), metrics.clone())),
        None => Arc::new(LogSink),
    };
    // The event stream (webhooks, MQTT), when something takes it.
    let (lifecycle_tx, announcer) = if config.webhooks.is_empty() && config.mqtt.is_none() {
        (tokio::sync::broadcast::channel(1).0, events::Announcer::default())
    } else {
        let hub = events::Hub::open(&config.node.state_dir, &config.node.site, &config.node.name, &config.webhooks)
            .map_err(FatalError::Runtime)?;
        for q in hub.queues() {
            let client = events::webhooks::client(&q.config, Some(guard.clone())).map_err(FatalError::Runtime)?;
            let signer = events::webhooks::signer(&q.config).map_err(FatalError::Runtime)?;
            tracker.spawn(events::webhooks::deliver(q.clone(), client, signer, Some(guard.clone()), cancel.clone()));
            tracing::info!(webhook = %q.config.name, url = %q.config.url, "webhook subscription");
        }
        let queues: Vec<_> = hub.queues().to_vec();
        if !queues.is_empty() {
            metrics.set_provider(
                "webhooks",
                Arc::new(move || serde_json::Value::Array(queues.iter().map(|q| q.status()).collect())),
            );
        }
        let tx = hub.subscribe();
        let announcer = hub.spawn(&tracker, cancel.clone());
        (tx, announcer)
    };
    metrics.set_announcer(announcer.clone());
    let events: Arc<dyn api::EventSink> = Arc::new(api::events::Tee { primary, announcer: announcer.clone() });
    guard.set_recorder(residency_recorder(metrics.clone(), events.clone()));
    let mut service = InferenceService::new(repository, metrics, events);
    service.privacy = Some(privacy.clone());
    service.compliance = Some(compliance.clone());
    // Rejections shared with the site's other box over MQTT, signed with the node key.
    let mut peer_verdicts = None;
    if !config.ha_peer_keys.is_empty() {
        let mut peers = Vec::new();
        for p in &config.ha_peer_keys {
            let key = outpost_proto::registry::keys::load_public(p).map_err(|e| {
                let path = config.path.clone().unwrap_or_else(|| "dev profile".into());
                FatalError::Config(ConfigError::Invalid { path, message: format!("ha.peer_keys: {e}") })
            })?;
            peers.push(key);
        }
        let key =
            audit::checkpoint::load_or_create_key(&config.node.key_file).map_err(|e| FatalError::start("ha", e))?;
        let (sv, rx) =
            verdicts::SiteVerdicts::new(&config.node.site, &config.node.name, key, &peers, &config.node.state_dir)
                .map_err(|e| FatalError::Start { what: "ha", source: e.into() })?;
        let sv = Arc::new(sv);
        let shown = sv.clone();
        service.metrics.set_provider(
            "verdicts",
            Arc::new(move || serde_json::to_value(shown.status()).unwrap_or(serde_json::Value::Null)),
        );
        service.site_verdicts = Some(sv);
        peer_verdicts = Some(rx);
    }
    if let Some(oc) = &config.overflow {
        let ov = Arc::new(
            overflow::Overflow::new(oc.clone(), Some(privacy.clone())).map_err(|e| FatalError::start("overflow", e))?,
        );
        tracing::info!(target_url = %oc.url, slo_p99 = ?oc.slo_p99, "overflow target configured");
        ov.breaker.set_announcer(announcer.clone());
        service.overflow = Some(ov);
    }
    let config = Arc::new(RwLock::new(Arc::new(config)));
    service.config = Some(config.clone());
    let started_flag = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = watch::channel(false);
    let local = Arc::new(LocalModels::default());
    let cfg = config.read_locked().clone();

    // The registry task first: the service must carry its verdict channel before anything
    // clones the service.
    let mut registry_task = None;
    if let (Some(_), Some(key)) = (&cfg.registry, &cfg.store_key_file) {
        // A missing or unreadable device key is the operator's to fix (restore it), not a fault.
        let store = store::Store::open_read_only(&cfg.node.state_dir);
        if let Err(e) = store::crypt::StoreKey::load_or_create(key, !store.has_models()) {
            let message = if key.exists() {
                format!("store.key_file: {e}")
            } else {
                format!(
                    "store.key_file {} is missing but the model store holds encrypted models: restore the key \
                     file from its backup, or delete {} so that the models are downloaded again",
                    key.display(),
                    cfg.node.state_dir.join("store").join("models").display()
                )
            };
            let path = cfg.path.clone().unwrap_or_else(|| "dev profile".into());
            return Err(FatalError::Config(ConfigError::Invalid { path, message }));
        }
    }
    if let Some(rc) = &cfg.registry {
        let (verdict_tx, verdict_rx) = tokio::sync::mpsc::unbounded_channel();
        service.verdicts = Some(verdict_tx);
        let mut sync =
            registry::sync::RegistrySync::open(rc.clone(), &cfg.node.state_dir, service.clone(), config.clone())
                .map_err(|e| FatalError::Runtime(format!("registry: {e}")))?;
        if let Some(rx) = peer_verdicts.take() {
            sync = sync.with_peer_verdicts(rx);
        }
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
    let mqtt_task = cfg
        .mqtt
        .as_ref()
        .map(|mc| spawn_mqtt(&tracker, &cancel, &cfg, mc, &service, &lifecycle_tx, started_rx.clone()));
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
            &cfg.node.state_dir.join("telemetry"),
        )
        .map_err(|e| FatalError::start("upstream", e))?;
        let node_key = node_public_key.clone();
        let inventory_service = service.clone();
        let exposition_service = service.clone();
        let ob = ob.with_exposition(Arc::new(move || exposition_service.render_metrics()));
        let ob = ob.with_inventory(Arc::new(move || {
            let mut inv = inventory_service.inventory();
            if let (Some(o), Some(k)) = (inv.as_object_mut(), &node_key) {
                o.insert("node_key".into(), k.clone());
            }
            inv
        }));
        tracker.spawn(ob.run(cancel.child_token(), outbox_wake.clone()));
    }
    tracker.spawn(watch_compliance(service.clone(), compliance, config.clone(), cancel.child_token()));
    // The VRRP role last reported; one reported while the agent was down is recorded now.
    if let Some(role) = ha::load(&cfg.node.state_dir) {
        if role.recorded {
            service.metrics.set_section("ha", role.status());
            service.metrics.set_gauge("ha_master", if role.state == "MASTER" { 1.0 } else { 0.0 });
        } else if let Err(e) = ha::report(&service, &cfg.node.state_dir, role, "keepalived").await {
            tracing::warn!(error = %e, "could not record the HA role reported while the agent was down");
        }
    }
    // Batch jobs, once the models are loaded (a job interrupted by a restart goes on).
    let jobs = Arc::new(jobs::Jobs::open(&cfg.node.state_dir).map_err(FatalError::Runtime)?);
    {
        let (jobs, service, mut started, cancel) =
            (jobs.clone(), service.clone(), started_rx.clone(), cancel.child_token());
        tracker.spawn(async move {
            let ready = tokio::select! {
                r = started.wait_for(|s| *s) => r.is_ok(),
                () = cancel.cancelled() => false,
            };
            if ready {
                jobs.run(service, cancel).await;
            }
        });
    }
    let failures = Arc::new(auth::FailureGuard::default());
    tracker.spawn(summarize_auth_failures(failures.clone(), service.events.clone(), cancel.child_token()));
    if let Some(timeout) = notify::watchdog_timeout() {
        tracker.spawn(watchdog(timeout, cancel.child_token()));
    }
    let state = http::HttpState::new(http::HttpShared {
        service: service.clone(),
        config: config.clone(),
        started: started_flag.clone(),
        control,
        started_at: std::time::Instant::now(),
        trace: audit.as_ref().and_then(audit::Audit::trace),
        limiter: Arc::new(auth::RateLimiter::default()),
        audit: audit.clone(),
        failures: failures.clone(),
        jobs: jobs.clone(),
    });
    let app = http::router(state.clone());
    let http_cancel = cancel.child_token();
    let server_cancel = http_cancel.clone();
    let limits = http::server::Limits::from(&cfg.http);
    let server_tls = tls_handle.clone();
    let server_metrics = service.metrics.clone();
    let server = tokio::spawn(async move {
        http::server::serve(listener, app, server_tls, limits, server_metrics, server_cancel, SHUTDOWN_GRACE).await;
        Ok(())
    });
    // gRPC on its own listener, through the same server code: TLS (the same handle, so a
    // reload renews both), connection limits, access control.
    let grpc_addr = match (&cfg.grpc, grpc_listener) {
        (Some(g), Some(listener)) => {
            let addr = listener.local_addr().map_err(|source| FatalError::Bind { addr: g.listen, source })?;
            let app = grpc::services(state.clone(), g.max_message_bytes, started_rx.clone());
            let limits =
                http::server::Limits { max_concurrent_streams: g.max_concurrent_streams, direct_h2: true, ..limits };
            let (tls, metrics, cancel) = (tls_handle.clone(), service.metrics.clone(), http_cancel.clone());
            tracker.spawn(async move {
                http::server::serve(listener, app, tls, limits, metrics, cancel, SHUTDOWN_GRACE).await;
            });
            tracing::info!(%addr, tls = tls_handle.is_some(), "grpc listener bound");
            Some(addr)
        }
        _ => None,
    };
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
        grpc_addr,
        cancel,
        tracker,
        started: started_rx,
        http_cancel,
        config,
        service,
        local,
        registry: registry_tx,
        server,
        audit,
        outbox_wake,
        tls: tls_handle,
        mqtt: tokio::sync::Mutex::new(mqtt_task),
        lifecycle: lifecycle_tx,
        reloads: std::sync::atomic::AtomicU64::new(0),
        _lock: lock,
    })
}

/// systemd's watchdog: pings `WATCHDOG=1` at half the timeout while the runtime turns (this
/// task runs) and no inference run has been running for longer than the timeout. A stuck run
/// withholds the ping, and systemd restarts the service.
async fn watchdog(timeout: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(timeout / 2);
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        match engine::progress::oldest() {
            Some(running) if running > timeout => {
                if !withheld {
                    tracing::error!(
                        running_s = running.as_secs(),
                        "an inference run has not finished within the watchdog timeout: withholding the watchdog ping"
                    );
                }
                withheld = true;
            }
            _ => {
                withheld = false;
                notify::notify("WATCHDOG=1");
            }
        }
    }
}

/// What a configuration needs beyond its own text, checked by `check-config`, at start and at
/// reload: the listener's TLS files load, and no setting loosens an installed signed manifest
/// (the configuration may only tighten one). A configuration error names the key.
pub fn check_environment(config: &Config) -> Result<(), FatalError> {
    let invalid = |message: String| {
        let path = config.path.clone().unwrap_or_else(|| "dev profile".into());
        FatalError::Config(ConfigError::Invalid { path, message })
    };
    if let (Some(files), Some(_)) = (&config.http.tls, &config.path) {
        tls::server_config(files).map_err(|e| invalid(format!("http TLS: {e}")))?;
    }
    match registry::sync::residency_conflicts(config).into_iter().next() {
        None => Ok(()),
        Some(message) => Err(invalid(message)),
    }
}

/// Takes the state directory's lock (`<state_dir>/lock`, with the holder's pid in it): one
/// agent per state directory, since two would both append to one audit chain and one store.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, FatalError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| FatalError::Runtime(format!("cannot open {}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            return Err(FatalError::StateLocked(format!(
                "another outpost agent{who} is running on the state directory {}: stop it first, or give \
                 this one its own node.state_dir",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(FatalError::Runtime(format!("cannot lock {}: {e}", path.display())));
        }
    }
    let written = f.set_len(0).and_then(|()| f.rewind()).and_then(|()| write!(f, "{}", std::process::id()));
    if let Err(e) = written {
        tracing::warn!(error = %e, path = %path.display(), "could not note the pid in the lock file");
    }
    Ok(f)
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
        self.config.read_locked().clone()
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
                        "deferred": rep.deferred,
                    })
                }),
                None => Err(api::control::ControlError::Failed("no [registry] configured".into())),
            }
        })
    }
}

/// Records each source's repeated authentication failures as one summary per window (and
/// what is pending at shutdown).
async fn summarize_auth_failures(
    failures: Arc<auth::FailureGuard>,
    events: Arc<dyn api::EventSink>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval((failures.window / 6).max(Duration::from_secs(1)));
    loop {
        let shutdown = tokio::select! {
            _ = tick.tick() => false,
            _ = cancel.cancelled() => true,
        };
        if let Some(f) = failures.due(shutdown) {
            let top: Vec<String> = f.top.iter().map(|(ip, n)| format!("{ip} x{n}")).collect();
            let _ = events
                .record(api::Event::AuthFailure {
                    principal: "unauthenticated".into(),
                    transport: "http".into(),
                    reason: format!(
                        "{} more failed or refused requests from {} sources over {} s (summary; most: {})",
                        f.count,
                        f.sources,
                        f.seconds,
                        top.join(", ")
                    ),
                    path: "*".into(),
                    count: f.count,
                })
                .await;
        }
        if shutdown {
            return;
        }
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), FatalError> {
    let agent = start(config).await?;
    shutdown.await;
    agent.shutdown().await
}

/// Residency findings to the metrics (every refusal counts and raises the alarm) and to the
/// audit log (a destination when first used or at a new address, a refusal when it changes).
/// Why `config` may not be used: `compliance.mode = "enforce"` and it drifts from the
/// baseline in force.
fn enforced_drift(compliance: &compliance::Compliance, config: &Config) -> Option<String> {
    if config.compliance.mode != config::ComplianceMode::Enforce {
        return None;
    }
    let drifts = compliance.evaluate(config);
    let baseline = compliance.baseline()?;
    (!drifts.is_empty()).then(|| {
        let list: Vec<String> = drifts.iter().map(ToString::to_string).collect();
        format!(
            "compliance.mode = \"enforce\": the configuration drifts from baseline '{}' v{}: {}",
            baseline.name,
            baseline.version,
            list.join("; ")
        )
    })
}

/// Checks `config` against the baseline in force and reports the finding: status and
/// metrics always, and when it changed the `compliance_drift` alarm, an event and an audit
/// record.
async fn check_compliance(
    service: &InferenceService,
    compliance: &compliance::Compliance,
    config: &Config,
    trigger: &str,
) {
    let Some(baseline) = compliance.baseline() else {
        return;
    };
    let drifts = compliance.evaluate(config);
    let name = format!("{} v{}", baseline.name, baseline.version);
    let list: Vec<String> = drifts.iter().map(ToString::to_string).collect();
    service.metrics.set_gauge("compliance_drifts", drifts.len() as f64);
    service.metrics.set_section(
        "compliance",
        serde_json::json!({
            "baseline": name,
            "mode": if config.compliance.mode == config::ComplianceMode::Enforce { "enforce" } else { "report" },
            "holds": drifts.is_empty(),
            "drifts": drifts,
            "checked_at": outpost_proto::registry::format_time(outpost_proto::registry::now()),
            "trigger": trigger,
        }),
    );
    if !compliance.settle(drifts) {
        return;
    }
    let alarm = (!list.is_empty()).then(|| format!("{name}: {}", list.join("; ")));
    service.metrics.set_alarm("compliance_drift", alarm);
    let event = api::Event::Compliance { baseline: name, trigger: trigger.to_owned(), drifts: list };
    if let Err(e) = service.events.record(event).await {
        tracing::warn!(error = %e, "could not record a compliance finding");
    }
}

/// Checks compliance at start, whenever the baseline, the configuration or the installed
/// models change, and every `compliance.interval`.
async fn watch_compliance(
    service: InferenceService,
    compliance: Arc<compliance::Compliance>,
    config: Arc<RwLock<Arc<Config>>>,
    cancel: CancellationToken,
) {
    let mut trigger = "start";
    loop {
        let cfg = config.read_locked().clone();
        check_compliance(&service, &compliance, &cfg, trigger).await;
        tokio::select! {
            () = cancel.cancelled() => return,
            why = compliance.rechecked() => trigger = why,
            () = tokio::time::sleep(cfg.compliance.interval) => trigger = "interval",
        }
    }
}

fn residency_recorder(metrics: Arc<Metrics>, sink: Arc<dyn api::EventSink>) -> residency::Recorder {
    Arc::new(move |finding: &residency::Outbound, new: bool| {
        if !finding.allowed {
            metrics.record_residency_refused();
            let why = format!(
                "the {} destination {} ({}) is outside privacy.residency_allow",
                finding.purpose, finding.host, finding.address
            );
            metrics.set_alarm("residency_refused", Some(why));
        }
        if !new {
            return;
        }
        let recording = sink.record(api::Event::Outbound {
            purpose: finding.purpose.clone(),
            host: finding.host.clone(),
            address: finding.address.clone(),
            allowed: finding.allowed,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = recording.await {
                    tracing::warn!(error = %e, "could not record an outbound destination");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moved from `config` (which no longer reads files outside its text): TLS files are read
    /// when a configuration is checked, and a missing certificate is a configuration error.
    #[test]
    fn a_missing_tls_certificate_is_a_configuration_error() {
        let digest = "0".repeat(64);
        let text = format!(
            "[http]\nlisten = \"0.0.0.0:8080\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n\
             [auth]\ntokens = [{{ name = \"pos\", sha256 = \"{digest}\", roles = [\"infer\"] }}]\n"
        );
        let config = Config::parse(&text, std::path::Path::new("/etc/outpost/outpost.toml")).expect("valid text");
        let e = check_environment(&config).expect_err("the certificate is missing");
        assert_eq!(e.exit_code(), 78);
        assert!(e.to_string().contains("/nonexistent/c.pem"), "{e}");
    }
}
