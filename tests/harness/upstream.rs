//! A receiver of the upstream protocol for tests: `POST /v1/{audit|telemetry}` with a
//! zstd-compressed NDJSON body, deduplicated by `Idempotency-Key` as a real collector would.
//! It can refuse (503) on demand. (Vector's `http_server` source is the production receiver.)

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

#[derive(Default)]
pub struct Received {
    pub streams: Mutex<BTreeMap<String, Vec<Value>>>,
    keys: Mutex<HashSet<String>>,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    pub refuse: AtomicBool,
    pub notify: tokio::sync::Notify,
    pub headers_seen: Mutex<Vec<(String, String, String)>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub received: Arc<Received>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    pub async fn start() -> Result<Receiver> {
        Self::start_on("127.0.0.1:0".parse()?, Arc::new(Received::default())).await
    }

    /// Starts on `addr`, keeping what an earlier receiver got (a collector that restarts).
    pub async fn start_on(addr: SocketAddr, received: Arc<Received>) -> Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route("/v1/{stream}", axum::routing::post(ingest)).with_state(received.clone());
        let tx = crate::serve_until_stopped(listener, app);
        Ok(Receiver { addr, received, shutdown: Some(tx) })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub fn records(&self, stream: &str) -> Vec<Value> {
        self.received.streams.lock().map(|s| s.get(stream).cloned().unwrap_or_default()).unwrap_or_default()
    }

    /// Waits (bounded) until `pred` holds for the received records of `stream`.
    pub async fn wait_until(
        &self,
        stream: &str,
        pred: impl Fn(&[Value]) -> bool,
        timeout: std::time::Duration,
    ) -> Result<()> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.received.notify.notified();
            if pred(&self.records(stream)) {
                return Ok(());
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                anyhow::bail!("upstream did not receive what was expected within {timeout:?}");
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn ingest(
    State(r): State<Arc<Received>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if r.refuse.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if h("content-encoding") != "zstd" {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
    }
    let key = h("idempotency-key");
    if key.is_empty() {
        return StatusCode::BAD_REQUEST;
    }
    if let Ok(mut seen) = r.headers_seen.lock() {
        seen.push((key.clone(), h("x-outpost-node"), h("x-outpost-site")));
    }
    let Ok(raw) = zstd::stream::decode_all(&body[..]) else { return StatusCode::BAD_REQUEST };
    let mut fresh = false;
    if let Ok(mut keys) = r.keys.lock() {
        fresh = keys.insert(key);
    }
    if fresh {
        let values: Vec<Value> = raw
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        if let Ok(mut s) = r.streams.lock() {
            s.entry(stream).or_default().extend(values);
        }
        r.batches.fetch_add(1, Ordering::SeqCst);
    } else {
        r.duplicates.fetch_add(1, Ordering::SeqCst);
    }
    r.notify.notify_waiters();
    StatusCode::OK
}
