//! The collector's HTTP API.
//!
//! Nodes (bearer token from `enroll`): `POST /v1/audit` (zstd NDJSON batches of audit
//! records), `POST /v1/heartbeat` (inventory JSON), `POST /v1/telemetry` (zstd NDJSON
//! snapshots). Readers (token from `reader`, as Bearer or as the password of Basic):
//! `GET /v1/fleet`, `GET /fleet`, `GET /metrics`. `GET /healthz` is open.
//!
//! Every answer is a status with a JSON `error` on failure: 401 unknown credentials, 403 a
//! node writing as another, 413 too large, 400 unreadable, 503 (with `Retry-After`) when the
//! database is unreachable, so agents keep the batch and retry. Never a 500.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::store::{Store, StoreError};

type Labels = Vec<(String, String)>;

/// This collector's own counters (fleet gauges are read from the database at each scrape).
#[derive(Default)]
pub struct Metrics {
    pub records_stored: Counter,
    pub records_duplicate: Counter,
    pub batches: Family<Labels, Counter>,
    pub heartbeats: Counter,
    pub auth_failures: Family<Labels, Counter>,
    pub chain_alarms: Family<Labels, Counter>,
}

pub struct App {
    pub store: Store,
    pub metrics: Metrics,
    pub max_batch_bytes: usize,
    pub silent_after_s: u64,
}

pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/audit", post(audit))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/telemetry", post(telemetry))
        .route("/v1/fleet", get(fleet_json))
        .route("/fleet", get(fleet_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (status, Json(json!({ "error": message.into() }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    }
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"outpost\""));
    }
    r
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Refused(r) => error(StatusCode::FORBIDDEN, r.to_string()),
        StoreError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        other => {
            tracing::warn!(error = %other, "database unavailable");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable, retry later")
        }
    }
}

/// The token of a request: `Bearer <token>`, or the password of `Basic`.
fn token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        return Some(text.split_once(':').map_or(text.clone(), |(_, p)| p.to_owned()));
    }
    None
}

fn fail(app: &App, kind: &str) {
    app.metrics.auth_failures.get_or_create(&vec![("kind".into(), kind.into())]).inc();
}

/// The node a request speaks for; it may only write as itself.
async fn node(app: &App, headers: &HeaderMap) -> Result<String, Response> {
    let Some(t) = token(headers) else {
        fail(app, "missing");
        return Err(error(StatusCode::UNAUTHORIZED, "a node token is required (outpost-collector enroll)"));
    };
    let node = match app.store.node_of(&t).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            fail(app, "unknown");
            return Err(error(StatusCode::UNAUTHORIZED, "unknown node token"));
        }
        Err(e) => return Err(store_error(e)),
    };
    let claimed = headers.get("x-outpost-node").and_then(|v| v.to_str().ok());
    if let Some(c) = claimed.filter(|c| *c != node) {
        fail(app, "other_node");
        tracing::warn!(node, claimed = c, "a node wrote as another node");
        return Err(error(StatusCode::FORBIDDEN, format!("node '{node}' may not write as '{c}'")));
    }
    Ok(node)
}

async fn reader(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    let Some(t) = token(headers) else {
        fail(app, "missing");
        return Err(error(StatusCode::UNAUTHORIZED, "a reader token is required (outpost-collector reader)"));
    };
    match app.store.is_reader(&t).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            fail(app, "unknown");
            Err(error(StatusCode::UNAUTHORIZED, "unknown reader token"))
        }
        Err(e) => Err(store_error(e)),
    }
}

/// The body, decompressed when `Content-Encoding: zstd`, within `cap` bytes.
#[allow(clippy::result_large_err)] // the error is the answer, built once on a failure path
fn decode(headers: &HeaderMap, body: &Bytes, cap: usize) -> Result<Vec<u8>, Response> {
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    match encoding {
        "identity" => Ok(body.to_vec()),
        "zstd" => {
            let decoder = zstd::stream::read::Decoder::new(&body[..])
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("zstd: {e}")))?;
            let mut out = Vec::new();
            decoder
                .take(cap as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("zstd: {e}")))?;
            if out.len() > cap {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("batch larger than {cap} bytes decompressed"),
                ));
            }
            Ok(out)
        }
        other => Err(error(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("content encoding '{other}' (zstd or none)"))),
    }
}

/// The node a batch comes from and the batch, decompressed.
async fn node_batch(app: &App, headers: &HeaderMap, body: &Bytes) -> Result<(String, Vec<u8>), Response> {
    let node = node(app, headers).await?;
    Ok((node, decode(headers, body, app.max_batch_bytes)?))
}

async fn audit(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let (node, ndjson) = match node_batch(&app, &headers, &body).await {
        Ok(nb) => nb,
        Err(r) => return r,
    };
    let result = |r: &str| vec![("result".to_owned(), r.to_owned())];
    match app.store.apply_batch(&node, &ndjson).await {
        Ok(a) => {
            app.metrics.records_stored.inc_by(a.stored as u64);
            app.metrics.records_duplicate.inc_by(a.duplicates as u64);
            app.metrics.batches.get_or_create(&result("stored")).inc();
            for al in &a.alarms {
                app.metrics.chain_alarms.get_or_create(&vec![("kind".into(), al.kind.as_str().into())]).inc();
            }
            let alarms: Vec<_> = a
                .alarms
                .iter()
                .map(|al| json!({"kind": al.kind.as_str(), "seq": al.seq, "detail": al.detail}))
                .collect();
            Json(json!({
                "stored": a.stored,
                "duplicates": a.duplicates,
                "head_seq": a.head_seq,
                "alarms": alarms,
            }))
            .into_response()
        }
        Err(e) => {
            app.metrics.batches.get_or_create(&result("refused")).inc();
            store_error(e)
        }
    }
}

async fn heartbeat(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let node = match node(&app, &headers).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "a heartbeat is a JSON object"),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("heartbeat: {e}")),
    };
    match app.store.heartbeat(&node, &value).await {
        Ok(alarms) => {
            app.metrics.heartbeats.inc();
            for al in &alarms {
                app.metrics.chain_alarms.get_or_create(&vec![("kind".into(), al.kind.as_str().into())]).inc();
            }
            Json(json!({ "node": node, "alarms": alarms.len() })).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn telemetry(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let (node, ndjson) = match node_batch(&app, &headers, &body).await {
        Ok(nb) => nb,
        Err(r) => return r,
    };
    // The newest snapshot of the batch is kept for the fleet view.
    let last = ndjson
        .split(|&b| b == b'\n')
        .rev()
        .find_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok().filter(serde_json::Value::is_object));
    if let Some(snapshot) = last {
        if let Err(e) = app.store.telemetry(&node, &snapshot).await {
            return store_error(e);
        }
    }
    Json(json!({ "node": node })).into_response()
}

async fn fleet_json(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = reader(&app, &headers).await {
        return r;
    }
    match crate::fleet::rows(&app.store, app.silent_after_s).await {
        Ok(rows) => Json(json!({ "nodes": rows })).into_response(),
        Err(e) => store_error(e),
    }
}

async fn fleet_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = reader(&app, &headers).await {
        return r;
    }
    match crate::fleet::rows(&app.store, app.silent_after_s).await {
        Ok(rows) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CONTENT_SECURITY_POLICY, "default-src 'none'; style-src 'unsafe-inline'"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            crate::fleet::page(&rows),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = reader(&app, &headers).await {
        return r;
    }
    let started = Instant::now();
    let rows = match crate::fleet::rows(&app.store, app.silent_after_s).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let m = &app.metrics;
    let mut reg = Registry::default();
    reg.register("outpost_collector_records_stored", "Audit records this collector stored", m.records_stored.clone());
    reg.register(
        "outpost_collector_records_duplicate",
        "Audit records received again and dropped (re-sent batches)",
        m.records_duplicate.clone(),
    );
    reg.register("outpost_collector_batches", "Audit batches received, by result", m.batches.clone());
    reg.register("outpost_collector_heartbeats", "Heartbeats received", m.heartbeats.clone());
    reg.register("outpost_collector_auth_failures", "Requests refused for their credentials", m.auth_failures.clone());
    reg.register(
        "outpost_collector_chain_alarms",
        "Chain alarms this collector raised, by kind",
        m.chain_alarms.clone(),
    );
    let nodes = Gauge::<i64>::default();
    nodes.set(rows.len() as i64);
    reg.register("outpost_fleet_nodes", "Enrolled nodes", nodes);
    let seen = Gauge::<i64>::default();
    seen.set(rows.iter().filter(|r| !r.silent).count() as i64);
    reg.register("outpost_fleet_nodes_seen", "Nodes heard from recently", seen);
    let lag = Family::<Labels, Gauge<i64>>::default();
    let alarms = Family::<Labels, Gauge<i64>>::default();
    for r in &rows {
        let l = vec![("node".to_owned(), r.node.clone())];
        if let Some(v) = r.audit_lag {
            lag.get_or_create(&l).set(v as i64);
        }
        alarms.get_or_create(&l).set(r.chain_alarms);
    }
    reg.register("outpost_fleet_audit_lag_records", "Audit records a node holds that are not stored yet", lag);
    reg.register("outpost_fleet_chain_alarms", "Chain alarms raised for a node (all collectors)", alarms);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &reg).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "metrics could not be rendered");
    }
    tracing::debug!(us = started.elapsed().as_micros() as u64, "metrics rendered");
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
