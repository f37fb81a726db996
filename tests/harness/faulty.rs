//! A faulty overflow target: an HTTP proxy on loopback in front of a real V2 server (another
//! Outpost), whose behaviour the test switches: pass through, answer 500, hang, answer slowly,
//! or break the connection mid-answer. It logs every request it receives (path, parameters,
//! input names), so tests can prove what did and did not leave the box.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward to the real target.
    Pass,
    /// Answer 500 at once.
    Error,
    /// Never answer (until [`Faulty::kill`]).
    Hang,
    /// Wait, then forward.
    Slow(Duration),
    /// Send the status line and headers, then break the connection.
    Reset,
}

#[derive(Clone)]
struct Shared {
    target: String,
    mode: Arc<Mutex<Mode>>,
    log: Arc<Mutex<Vec<Value>>>,
    killed: Arc<tokio::sync::Notify>,
    arrived: Arc<tokio::sync::Notify>,
    client: reqwest::Client,
}

pub struct Faulty {
    pub addr: SocketAddr,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Faulty {
    /// Starts the proxy in front of `target` (e.g. `http://127.0.0.1:1234`).
    pub async fn start(target: &str) -> Result<Faulty> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Shared {
            target: target.trim_end_matches('/').to_owned(),
            mode: Arc::new(Mutex::new(Mode::Pass)),
            log: Arc::default(),
            killed: Arc::new(tokio::sync::Notify::new()),
            arrived: Arc::new(tokio::sync::Notify::new()),
            client: crate::http_client(),
        };
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let stop = crate::serve_until_stopped(listener, app);
        Ok(Faulty { addr, shared, stop: Some(stop) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Every request received so far: `{"path", "parameters", "inputs": [names]}`.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `n` requests have arrived (or fails after `timeout`).
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Result<()> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            if self.requests().len() >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                anyhow::bail!("{} of {n} requests arrived within {timeout:?}", self.requests().len());
            }
        }
    }

    /// Dies: hanging requests get their connection broken, and nothing new is accepted.
    pub fn kill(&mut self) {
        self.shared.killed.notify_waiters();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A body that fails after nothing: the client sees the connection break mid-answer.
fn broken_body() -> Body {
    Body::from_stream(futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "target died"))
    }))
}

async fn handle(State(s): State<Shared>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let header_len = headers
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let json = &body[..header_len.unwrap_or(body.len()).min(body.len())];
    let parsed: Value = serde_json::from_slice(json).unwrap_or(Value::Null);
    let inputs: Vec<Value> = parsed["inputs"].as_array().into_iter().flatten().map(|i| i["name"].clone()).collect();
    // Listen for the kill before the request is visible in the log, so a test that waits for
    // the log and then kills cannot slip between the two.
    let killed = s.killed.notified();
    tokio::pin!(killed);
    killed.as_mut().enable();
    s.log.lock().unwrap_or_else(|p| p.into_inner()).push(serde_json::json!({
        "path": uri.path(),
        "id": parsed["id"],
        "parameters": parsed["parameters"],
        "inputs": inputs,
    }));
    s.arrived.notify_waiters();
    let mode = *s.mode.lock().unwrap_or_else(|p| p.into_inner());
    match mode {
        Mode::Error => return (StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response(),
        Mode::Hang => {
            killed.await;
            return Response::builder().status(200).body(broken_body()).unwrap_or_default();
        }
        Mode::Reset => return Response::builder().status(200).body(broken_body()).unwrap_or_default(),
        Mode::Slow(d) => tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = killed => return Response::builder().status(200).body(broken_body()).unwrap_or_default(),
        },
        Mode::Pass => {}
    }
    let mut req = s.client.post(format!("{}{}", s.target, uri.path())).body(body);
    if let Some(n) = header_len {
        req = req.header("Inference-Header-Content-Length", n.to_string());
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let mut out = Response::builder().status(status);
            for h in ["content-type", "inference-header-content-length"] {
                if let Some(v) = r.headers().get(h) {
                    out = out.header(h, v.clone());
                }
            }
            let bytes = r.bytes().await.unwrap_or_default();
            out.body(Body::from(bytes)).unwrap_or_default()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
