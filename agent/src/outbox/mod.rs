//! Store-and-forward to the upstream collectors: the audit stream (records of the audit log) and
//! the telemetry stream (periodic snapshots) go out in batches as
//! `POST <upstream>/v1/{audit|telemetry}`, zstd-compressed NDJSON, with an `Idempotency-Key`
//! of `<node>:<stream>:<first-seq>-<last-seq>`. A batch's boundaries are persisted before it is
//! sent, so a batch rebuilt after a crash carries the same key and the receiver drops the
//! duplicate. Records are marked sent only after a 2xx; order is kept per stream. With several
//! collectors (`upstream.urls`), a failed send goes to the next one at once, the same batch with
//! the same key; the one that answered stays the first tried. The node's inventory goes up as
//! `POST <upstream>/v1/heartbeat` every `heartbeat_interval`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::Repository;
use crate::audit::{Audit, AuditError};
pub use crate::config::UpstreamConfig;
use crate::privacy::{url_host, Privacy};
use crate::telemetry::Metrics;

pub mod remote_write;

const META_SENT: &[u8] = b"\xffsent";
const META_INFLIGHT: &[u8] = b"\xffinflight";

/// A telemetry spool: snapshots under big-endian sequence keys in a sled database of its own
/// (telemetry is dropped oldest-first past its quota, so sled's space behaviour is bounded).
pub struct Spool {
    tree: sled::Tree,
    db: sled::Db,
    dir: PathBuf,
    bytes: AtomicU64,
    quota: u64,
}

fn err(e: impl std::fmt::Display) -> AuditError {
    AuditError::Store(e.to_string())
}

impl Spool {
    pub fn open(dir: &std::path::Path, quota: u64) -> Result<Spool, AuditError> {
        let db = sled::Config::new().path(dir).mode(sled::Mode::LowSpace).open().map_err(err)?;
        let dir = dir.to_path_buf();
        let tree = db.open_tree("telemetry").map_err(err)?;
        let bytes = tree.range(&[0u8; 8][..]..&[0xffu8][..]).filter_map(Result::ok).map(|(_, v)| v.len() as u64).sum();
        Ok(Spool { tree, db, dir, bytes: AtomicU64::new(bytes), quota })
    }

    /// Appends a snapshot; drops the oldest unsent ones past the quota. Returns how many were dropped.
    pub fn push(&self, snapshot: &serde_json::Value) -> Result<u64, AuditError> {
        let next = self
            .tree
            .range(&[0u8; 8][..]..&[0xffu8][..])
            .next_back()
            .transpose()
            .map_err(err)?
            .map_or(Ok(0), |(k, _)| {
                <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes).map_err(|_| err("bad key"))
            })?
            + 1;
        let next = next.max(self.sent_seq()? + 1);
        let bytes = serde_json::to_vec(&serde_json::json!({ "seq": next, "snapshot": snapshot })).map_err(err)?;
        self.bytes.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        self.tree.insert(next.to_be_bytes(), bytes).map_err(err)?;
        let inflight = self.inflight()?;
        let mut dropped = 0;
        while self.bytes.load(Ordering::SeqCst) > self.quota {
            let Some((k, v)) = self.tree.range(&[0u8; 8][..]..&[0xffu8][..]).next().transpose().map_err(err)? else {
                break;
            };
            let seq = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes).unwrap_or(0);
            if seq == next {
                break;
            }
            if inflight.is_some_and(|(a, b)| (a..=b).contains(&seq)) {
                // Telemetry is lossy by design: a batch not yet acknowledged may lose its
                // oldest snapshots too; the next batch is cut from what remains.
                self.tree.remove(META_INFLIGHT).map_err(err)?;
            }
            self.tree.remove(k).map_err(err)?;
            self.bytes.fetch_sub((v.len() as u64).min(self.bytes.load(Ordering::SeqCst)), Ordering::SeqCst);
            dropped += 1;
        }
        self.durable()?;
        Ok(dropped)
    }

    fn durable(&self) -> Result<(), AuditError> {
        self.db.flush().map_err(err)?;
        std::fs::File::open(self.dir.join("db")).and_then(|f| f.sync_all()).map_err(err)
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, AuditError> {
        match self.tree.get(k).map_err(err)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(err)?)),
            None => Ok(None),
        }
    }

    pub fn sent_seq(&self) -> Result<u64, AuditError> {
        Ok(self.meta(META_SENT)?.unwrap_or(0))
    }

    pub fn backlog_bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// What the outbox needs of a stream.
pub trait Stream {
    fn sent_seq(&self) -> Result<u64, AuditError>;
    fn inflight(&self) -> Result<Option<(u64, u64)>, AuditError>;
    fn set_inflight(&self, range: (u64, u64)) -> Result<(), AuditError>;
    fn mark_sent(&self, seq: u64) -> Result<(), AuditError>;
    fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError>;
}

impl Stream for Audit {
    fn sent_seq(&self) -> Result<u64, AuditError> {
        Audit::sent_seq(self)
    }
    fn inflight(&self) -> Result<Option<(u64, u64)>, AuditError> {
        Audit::inflight(self)
    }
    fn set_inflight(&self, range: (u64, u64)) -> Result<(), AuditError> {
        Audit::set_inflight(self, Some(range))
    }
    fn mark_sent(&self, seq: u64) -> Result<(), AuditError> {
        Audit::mark_sent(self, seq)
    }
    fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        Audit::range(self, from, to, limit)
    }
}

impl Stream for Spool {
    fn sent_seq(&self) -> Result<u64, AuditError> {
        Spool::sent_seq(self)
    }
    fn inflight(&self) -> Result<Option<(u64, u64)>, AuditError> {
        self.meta(META_INFLIGHT)
    }
    fn set_inflight(&self, range: (u64, u64)) -> Result<(), AuditError> {
        self.tree.insert(META_INFLIGHT, serde_json::to_vec(&range).map_err(err)?).map_err(err)?;
        self.durable()
    }
    fn mark_sent(&self, seq: u64) -> Result<(), AuditError> {
        let mut b = sled::Batch::default();
        b.insert(META_SENT, serde_json::to_vec(&seq).map_err(err)?);
        b.remove(META_INFLIGHT);
        let mut freed = 0u64;
        for (k, v) in self.tree.range(&[0u8; 8][..]..=&seq.to_be_bytes()[..]).filter_map(Result::ok) {
            freed += v.len() as u64;
            b.remove(k);
        }
        self.tree.apply_batch(b).map_err(err)?;
        self.bytes.fetch_sub(freed.min(self.bytes.load(Ordering::SeqCst)), Ordering::SeqCst);
        self.durable()
    }
    fn range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let mut out = Vec::new();
        for kv in self.tree.range(&from.to_be_bytes()[..]..=&to.min((1 << 56) - 1).to_be_bytes()[..]) {
            let (k, v) = kv.map_err(err)?;
            if let Ok(b) = <[u8; 8]>::try_from(k.as_ref()) {
                out.push((u64::from_be_bytes(b), v.to_vec()));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

pub struct Outbox {
    cfg: UpstreamConfig,
    client: reqwest::Client,
    token: Option<String>,
    node: String,
    site: String,
    audit: Audit,
    spool: Spool,
    metrics: Arc<Metrics>,
    repo: Arc<Repository>,
    privacy: Option<Arc<Privacy>>,
    /// The collector tried first (the last one that answered).
    current: std::sync::atomic::AtomicUsize,
    inventory: Option<Inventory>,
    /// The agent's `/metrics` text, sampled for remote-write telemetry.
    exposition: Option<Exposition>,
    remote_write_token: Option<String>,
}

/// The agent's metrics in the text exposition format, as `/metrics` answers.
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// What the heartbeat reports of the node beyond the outbox's own figures (models, alarms,
/// breaker, key), built when a heartbeat is due.
pub type Inventory = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("upstream: {0}")]
    Send(String),
    #[error(transparent)]
    Store(#[from] AuditError),
    #[error("upstream host {0} is not on the residency allow-list")]
    Residency(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Outbox {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: UpstreamConfig,
        node: &str,
        site: &str,
        audit: Audit,
        metrics: Arc<Metrics>,
        repo: Arc<Repository>,
        privacy: Option<Arc<Privacy>>,
        telemetry_dir: &std::path::Path,
    ) -> Result<Outbox, OutboxError> {
        crate::tls::install_crypto_provider();
        let token = cfg.token_file.as_deref().map(|p| crate::tls::read_token(p, "upstream.token_file")).transpose()?;
        let remote_write_token = cfg
            .remote_write_token_file
            .as_deref()
            .map(|p| crate::tls::read_token(p, "upstream.remote_write_token_file"))
            .transpose()?;
        let mut builder = crate::tls::outbound(
            reqwest::Client::builder(),
            "upstream",
            privacy.as_ref().and_then(|p| p.guard.clone()),
        )
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(10)));
        if let Some(ca) = &cfg.ca {
            builder = crate::tls::add_roots(builder, ca, "upstream.ca")?;
        }
        let client = builder.build().map_err(|source| crate::tls::TlsError::Client { setting: "upstream", source })?;
        let spool = Spool::open(telemetry_dir, cfg.quota_bytes)?;
        Ok(Outbox {
            cfg,
            client,
            token,
            node: node.to_owned(),
            site: site.to_owned(),
            audit,
            spool,
            metrics,
            repo,
            privacy,
            current: std::sync::atomic::AtomicUsize::new(0),
            inventory: None,
            exposition: None,
            remote_write_token,
        })
    }

    /// Sets where remote-write telemetry samples the agent's metrics from.
    pub fn with_exposition(mut self, exposition: Exposition) -> Outbox {
        self.exposition = Some(exposition);
        self
    }

    /// Sends a batch of telemetry snapshots as one remote-write request. A 4xx other than 429
    /// is the receiver refusing these samples for good (out of its window, say): the batch is
    /// dropped with an alarm rather than blocking the stream; anything else is retried.
    /// Records the collector's address (audit, first time and on change).
    fn answered(&self, url: &str, resp: &reqwest::Response) {
        if let Some(g) = self.privacy.as_ref().and_then(|p| p.guard.as_ref()) {
            g.answered("upstream", url, resp);
        }
    }

    async fn remote_write(&self, url: &str, snapshots: &[(u64, Vec<u8>)]) -> Result<(), OutboxError> {
        let mut samples = Vec::with_capacity(snapshots.len());
        for (_, bytes) in snapshots {
            // The spool keeps `{"seq", "snapshot"}`; a snapshot queued before remote-write was
            // configured has no exposition and is skipped.
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else { continue };
            let snap = &v["snapshot"];
            let (Some(t), Some(text)) = (snap["time_ms"].as_i64(), snap["exposition"].as_str()) else { continue };
            samples.push((t, text.to_owned()));
        }
        let body = remote_write::encode(&samples, &[("node", &self.node), ("site", &self.site)]);
        let host = url_host(url).unwrap_or_default();
        if let Some(p) = &self.privacy {
            if !p.host_allowed(&host) {
                self.metrics.set_alarm("residency_refused", Some(format!("remote-write host {host} not allowed")));
                return Err(OutboxError::Residency(host));
            }
        }
        let mut req = self
            .client
            .post(url)
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(body);
        if let Some(t) = &self.remote_write_token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| OutboxError::Send(format!("{url}: {}", crate::tls::describe(&e))))?;
        self.answered(url, &resp);
        if let Some(e) = crate::tls::redirect_refused(url, &resp) {
            return Err(OutboxError::Send(e));
        }
        let status = resp.status();
        if status.is_success() {
            self.metrics.set_alarm("telemetry_rejected", None);
            return Ok(());
        }
        let text: String = resp.text().await.unwrap_or_default().chars().take(300).collect();
        if status.is_client_error() && status.as_u16() != 429 {
            tracing::warn!(%url, status = status.as_u16(), %text, "remote-write refused a telemetry batch; dropped");
            self.metrics
                .set_alarm("telemetry_rejected", Some(format!("remote-write answered {}: {text}", status.as_u16())));
            return Ok(());
        }
        Err(OutboxError::Send(format!("{url}: HTTP {} {text}", status.as_u16())))
    }

    /// Sets what heartbeats report of the node.
    pub fn with_inventory(mut self, inventory: Inventory) -> Outbox {
        self.inventory = Some(inventory);
        self
    }

    /// POSTs `body` to `path` of the first collector that takes it, starting with the one that
    /// last answered. Every collector is checked against the residency allow-list first.
    async fn post(&self, path: &str, body: Vec<u8>, headers: &[(&str, String)]) -> Result<(), OutboxError> {
        let urls = &self.cfg.urls;
        let start = self.current.load(Ordering::Relaxed) % urls.len();
        let mut last_error = None;
        for i in 0..urls.len() {
            let index = (start + i) % urls.len();
            let base = &urls[index];
            let host = url_host(base).unwrap_or_default();
            if let Some(p) = &self.privacy {
                if !p.host_allowed(&host) {
                    self.metrics.set_alarm("residency_refused", Some(format!("upstream host {host} not allowed")));
                    last_error = Some(OutboxError::Residency(host));
                    continue;
                }
            }
            let url = format!("{}/v1/{path}", base.trim_end_matches('/'));
            let mut req = self
                .client
                .post(&url)
                .header("X-Outpost-Node", &self.node)
                .header("X-Outpost-Site", &self.site)
                .body(body.clone());
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let outcome = match req.send().await {
                Err(e) => Err(OutboxError::Send(format!("{url}: {}", crate::tls::describe(&e)))),
                Ok(resp) => {
                    self.answered(&url, &resp);
                    match crate::tls::redirect_refused(&url, &resp) {
                        Some(e) => Err(OutboxError::Send(e)),
                        None if resp.status().is_success() => Ok(()),
                        None => {
                            let status = resp.status().as_u16();
                            let text = resp.text().await.unwrap_or_default();
                            Err(OutboxError::Send(format!(
                                "{url}: HTTP {status} {}",
                                text.chars().take(200).collect::<String>()
                            )))
                        }
                    }
                }
            };
            match outcome {
                Ok(()) => {
                    if index != start {
                        tracing::info!(collector = %base, "upstream: sending to this collector now");
                    }
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    if urls.len() > 1 {
                        tracing::debug!(error = %e, "upstream send failed; trying the next collector");
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| OutboxError::Send("no collector configured".into())))
    }

    /// Sends the node's inventory (agent version, models, alarms, audit position, node key).
    async fn heartbeat(&self) -> Result<(), OutboxError> {
        let mut hb = match &self.inventory {
            Some(f) => f(),
            None => serde_json::json!({}),
        };
        let head = self.audit.head_seq();
        let sent = self.audit.sent_seq().unwrap_or(0);
        if let Some(o) = hb.as_object_mut() {
            o.insert("node".into(), self.node.clone().into());
            o.insert("site".into(), self.site.clone().into());
            o.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
            o.insert("time_ms".into(), (outpost_proto::registry::now() * 1000).into());
            o.insert(
                "audit".into(),
                serde_json::json!({
                    "head_seq": head,
                    "sent_seq": sent,
                    "backlog_records": head.saturating_sub(sent),
                }),
            );
        }
        let body = serde_json::to_vec(&hb).map_err(|e| OutboxError::Send(e.to_string()))?;
        self.post("heartbeat", body, &[("Content-Type", "application/json".into())]).await
    }

    /// Sends every complete batch of a stream; returns the records sent.
    async fn drain(&self, stream: &(dyn Stream + Sync), name: &str) -> Result<u64, OutboxError> {
        let mut sent = 0;
        loop {
            let (first, last) = match stream.inflight()? {
                Some(r) => r,
                None => {
                    let from = stream.sent_seq()? + 1;
                    let recs = stream.range(from, u64::MAX, self.cfg.batch_records)?;
                    let (Some(f), Some(l)) = (recs.first(), recs.last()) else { return Ok(sent) };
                    let r = (f.0, l.0);
                    stream.set_inflight(r)?;
                    r
                }
            };
            let recs = stream.range(first, last, usize::MAX)?;
            if let (Some(url), "telemetry") = (&self.cfg.remote_write_url, name) {
                self.remote_write(url, &recs).await?;
                stream.mark_sent(last)?;
                sent += recs.len() as u64;
                continue;
            }
            let mut ndjson = Vec::new();
            for (_, v) in &recs {
                ndjson.extend_from_slice(v);
                ndjson.push(b'\n');
            }
            let body = zstd::bulk::compress(&ndjson, 3).map_err(|e| OutboxError::Send(e.to_string()))?;
            let headers = [
                ("Content-Type", "application/x-ndjson".to_owned()),
                ("Content-Encoding", "zstd".to_owned()),
                ("Idempotency-Key", format!("{}:{name}:{first}-{last}", self.node)),
            ];
            self.post(name, body, &headers).await?;
            crate::failpoint::hit("outbox-after-send");
            stream.mark_sent(last)?;
            sent += recs.len() as u64;
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        let head = self.audit.head_seq();
        let sent = self.audit.sent_seq().unwrap_or(0);
        m.set_gauge("audit_backlog_records", head.saturating_sub(sent) as f64);
        m.set_gauge("audit_retained_bytes", self.audit.retained_bytes() as f64);
        m.set_gauge("audit_disk_bytes", self.audit.disk_bytes() as f64);
        m.set_gauge("telemetry_backlog_bytes", self.spool.backlog_bytes() as f64);
    }

    /// Queues a telemetry snapshot (dropping the oldest past the quota, with an alarm).
    fn snapshot(&self) -> Result<(), OutboxError> {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let snap = match (&self.cfg.remote_write_url, &self.exposition) {
            // Remote-write: the `/metrics` text as it is now, sent later with this time.
            (Some(_), Some(exposition)) => serde_json::json!({ "time_ms": time_ms, "exposition": exposition() }),
            _ => serde_json::json!({
                "node": self.node,
                "site": self.site,
                "time_ms": time_ms,
                "metrics": self.metrics.snapshot(&self.repo.gauges()),
            }),
        };
        let dropped = self.spool.push(&snap)?;
        if dropped > 0 {
            self.metrics.set_alarm(
                "telemetry_dropped",
                Some(format!("{dropped} oldest telemetry snapshots dropped: upstream quota full")),
            );
        }
        Ok(())
    }

    /// One round: the heartbeat when due (its failure does not hold the streams back), both
    /// streams, pruning, gauges.
    async fn round(&self, heartbeat_due: bool) -> Result<(), OutboxError> {
        if heartbeat_due {
            if let Err(e) = self.heartbeat().await {
                tracing::debug!(error = %e, "heartbeat not sent");
            }
        }
        let result = async {
            self.drain(&self.audit, "audit").await?;
            self.drain(&self.spool, "telemetry").await
        }
        .await;
        // Sent records go after the retention period, or at once when the quota nears full.
        if let Err(e) = self.audit.maintain() {
            tracing::warn!(error = %e, "audit prune failed");
        }
        if self.audit.is_full() {
            self.metrics.set_alarm("audit_quota_full", Some("audit log full: inference refused (fail closed)".into()));
        } else {
            self.metrics.set_alarm("audit_quota_full", None);
        }
        self.update_gauges();
        result.map(|_| ())
    }

    /// Runs until cancelled, then makes one last, time-boxed attempt to flush.
    pub async fn run(self, cancel: CancellationToken, wake: Arc<tokio::sync::Notify>) {
        let mut failures = 0u32;
        let now = tokio::time::Instant::now();
        let mut next_snapshot = now + self.cfg.telemetry_interval;
        let mut next_send = now;
        let mut next_heartbeat = now;
        loop {
            // Snapshots keep their own schedule: they queue (within the quota) while sending
            // is backing off.
            if tokio::time::Instant::now() >= next_snapshot {
                next_snapshot = tokio::time::Instant::now() + self.cfg.telemetry_interval;
                if let Err(e) = self.snapshot() {
                    tracing::warn!(error = %e, "telemetry snapshot not queued");
                }
            }
            if tokio::time::Instant::now() >= next_send {
                let heartbeat_due = tokio::time::Instant::now() >= next_heartbeat;
                let result = self.round(heartbeat_due).await;
                // A failed heartbeat waits for its next interval too: a receiver without
                // `/v1/heartbeat` is not asked once a flush.
                if heartbeat_due {
                    next_heartbeat = tokio::time::Instant::now() + self.cfg.heartbeat_interval;
                }
                match result {
                    Ok(()) => {
                        if failures > 0 {
                            tracing::info!("upstream reachable again");
                        }
                        failures = 0;
                        self.metrics.set_alarm("upstream_unreachable", None);
                        self.metrics.set_gauge(
                            "upstream_last_success_timestamp_seconds",
                            outpost_proto::registry::now() as f64,
                        );
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 {
                            tracing::warn!(error = %e, "upstream send failed; records stay queued");
                        }
                        if failures >= 3 {
                            self.metrics.set_alarm("upstream_unreachable", Some(e.to_string()));
                        }
                    }
                }
                let backoff = if failures == 0 {
                    self.cfg.flush_interval
                } else {
                    let base = self.cfg.flush_interval.as_secs_f64() * 2f64.powi(failures.min(8) as i32);
                    Duration::from_secs_f64(base.min(300.0) * (0.5 + jitter()))
                };
                next_send = tokio::time::Instant::now() + backoff;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_send.min(next_snapshot)) => {}
                _ = wake.notified() => next_send = tokio::time::Instant::now(),
                _ = cancel.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.round(false)).await;
                    return;
                }
            }
        }
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}
