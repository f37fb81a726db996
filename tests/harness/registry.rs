//! A registry for tests: a directory written with the real publisher, served by a static HTTP
//! server on loopback that supports ETag and Range, logs requests, and can misbehave on
//! purpose (serve a truncated file, answer 503, go away).

use futures::StreamExt as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost::registry::dsse::Envelope;
use outpost::registry::publish::{self, Publication, RootSpec};
use outpost::registry::{Index, KeyPair, INDEX_TYPE};

use crate::root;

/// Signing keys and a registry directory.
pub struct TestRegistry {
    pub dir: tempfile::TempDir,
    pub root_keys: Vec<KeyPair>,
    pub index_keys: Vec<KeyPair>,
}

impl TestRegistry {
    /// A registry with one root key and one index key (thresholds 1).
    pub fn new() -> Result<TestRegistry> {
        Self::with_keys(1, 1, 1, 1)
    }

    pub fn with_keys(
        roots: usize,
        root_threshold: usize,
        indexes: usize,
        index_threshold: usize,
    ) -> Result<TestRegistry> {
        let dir = tempfile::tempdir()?;
        let root_keys: Vec<KeyPair> = (0..roots).map(|_| KeyPair::generate()).collect::<Result<_, _>>()?;
        let index_keys: Vec<KeyPair> = (0..indexes).map(|_| KeyPair::generate()).collect::<Result<_, _>>()?;
        let spec = RootSpec {
            root_keys: root_keys.iter().map(KeyPair::public).collect(),
            root_threshold,
            index_keys: index_keys.iter().map(KeyPair::public).collect(),
            index_threshold,
            expires_in_secs: 86400 * 30,
            demo_only: false,
        };
        let rs: Vec<&KeyPair> = root_keys.iter().collect();
        let is: Vec<&KeyPair> = index_keys.iter().collect();
        publish::init(dir.path(), &spec, &rs, &is, 86400)?;
        Ok(TestRegistry { dir, root_keys, index_keys })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn root_json(&self) -> PathBuf {
        self.dir.path().join("root.json")
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    pub fn signers(&self) -> Vec<&KeyPair> {
        self.index_keys.iter().collect()
    }

    /// Publishes `models/<src>` (or a fixture directory) as `name@version`.
    pub fn publish_dir(&self, model_dir: &Path, name: &str, version: &str) -> Result<String> {
        self.publish_dir_with(model_dir, name, version, true)
    }

    /// Publishes a committed demo model, saying in its manifest whether it may leave the site.
    pub fn publish_residency(
        &self,
        demo_model: &str,
        name: &str,
        version: &str,
        may_leave_site: bool,
    ) -> Result<String> {
        self.publish_dir_with(&root().join("models").join(demo_model), name, version, may_leave_site)
    }

    fn publish_dir_with(&self, model_dir: &Path, name: &str, version: &str, may_leave_site: bool) -> Result<String> {
        // A directory with a package declaration publishes the model with its steps.
        let package = model_dir.join("package.json");
        let p = Publication {
            package: package.is_file().then_some(package.as_path()),
            model: &model_dir.join("model.onnx"),
            name,
            version,
            channel: "stable",
            golden: &model_dir.join("golden.json"),
            quantization: "fp32",
            may_leave_site,
            index_expires_in_secs: 86400,
        };
        Ok(publish::publish(self.dir.path(), &p, &self.signers())?)
    }

    /// Publishes a committed demo model.
    pub fn publish(&self, demo_model: &str, name: &str, version: &str) -> Result<String> {
        self.publish_dir(&root().join("models").join(demo_model), name, version)
    }

    pub fn index(&self) -> Result<Index> {
        let env = Envelope::parse(&std::fs::read(self.dir.path().join("index.json"))?)?;
        Ok(serde_json::from_slice(&env.payload_bytes()?)?)
    }

    /// Signs and writes an index as given (for crafting attacks).
    pub fn write_index(&self, index: &Index, signers: &[&KeyPair]) -> Result<()> {
        let env = Envelope::sign(INDEX_TYPE, &serde_json::to_vec(index)?, signers);
        std::fs::write(self.dir.path().join("index.json"), env.to_bytes())?;
        Ok(())
    }

    /// The blob file of the newest version of `name`.
    pub fn blob_path(&self, name: &str) -> Result<PathBuf> {
        let stmt = self.statement(name)?;
        Ok(self.dir.path().join("blobs/sha256").join(stmt.predicate.blob.sha256))
    }

    pub fn manifest_path(&self, name: &str) -> Result<PathBuf> {
        let idx = self.index()?;
        let e = idx.models.get(name).and_then(|v| v.last()).ok_or_else(|| anyhow!("{name} not in index"))?;
        Ok(self.dir.path().join("manifests").join(format!("{}.json", e.manifest.sha256)))
    }

    pub fn statement(&self, name: &str) -> Result<outpost::registry::Statement> {
        let env = Envelope::parse(&std::fs::read(self.manifest_path(name)?)?)?;
        Ok(serde_json::from_slice(&env.payload_bytes()?)?)
    }
}

/// Per-path misbehaviour of the static server.
#[derive(Default)]
pub struct Faults {
    /// Path suffix → serve only the first this many bytes (as if the object were that short:
    /// a truncated copy on a mirror, a proxy that gave up).
    pub truncate: Mutex<HashMap<String, usize>>,
    /// Answer 503 to everything.
    pub down: AtomicBool,
    /// Path suffix → send the first this many bytes, then nothing more while the connection
    /// stays open (a link that stalls).
    pub stall: Mutex<HashMap<String, usize>>,
    /// Path suffix → send in this many pieces, one every `throttle_every` (a slow, steady link).
    pub throttle: Mutex<HashMap<String, usize>>,
    pub throttle_every: Mutex<std::time::Duration>,
}

pub struct StaticServer {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub faults: Arc<Faults>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Clone)]
struct ServerState {
    dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    faults: Arc<Faults>,
}

impl StaticServer {
    pub async fn start(dir: &Path) -> Result<StaticServer> {
        Self::start_on(dir, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(dir: &Path, addr: SocketAddr) -> Result<StaticServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Faults::default());
        let state = ServerState { dir: dir.to_path_buf(), log: log.clone(), faults: faults.clone() };
        let app = axum::Router::new().fallback(serve_file).with_state(state);
        let tx = crate::serve_until_stopped(listener, app);
        Ok(StaticServer { addr, log, faults, shutdown: Some(tx) })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_file(State(s): State<ServerState>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let inm = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Ok(mut l) = s.log.lock() {
        l.push(match &range {
            Some(r) => format!("GET /{path} {r}"),
            None => format!("GET /{path}"),
        });
    }
    if s.faults.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if path.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let Ok(bytes) = tokio::fs::read(s.dir.join(&path)).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let etag = format!("\"{}\"", outpost::registry::sha256_hex(&bytes));
    if inm.as_deref() == Some(etag.as_str()) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = etag.parse() {
        headers.insert(header::ETAG, v);
    }
    let (status, body) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-'))
    {
        Some(start) => {
            let start: usize = start.parse().unwrap_or(0);
            if start >= bytes.len() {
                return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            }
            if let Ok(v) = format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()).parse() {
                headers.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, bytes[start..].to_vec())
        }
        None => (StatusCode::OK, bytes),
    };
    let truncate =
        s.faults.truncate.lock().ok().and_then(|t| t.iter().find(|(k, _)| path.ends_with(k.as_str())).map(|(_, v)| *v));
    let mut body = body;
    if let Some(t) = truncate {
        body.truncate(t);
    }
    let find = |m: &Mutex<HashMap<String, usize>>| {
        m.lock().ok().and_then(|t| t.iter().find(|(k, _)| path.ends_with(k.as_str())).map(|(_, v)| *v))
    };
    if let Some(n) = find(&s.faults.stall) {
        // The length says all of it; the first `n` bytes come, then the link goes quiet until
        // the client gives up.
        let first = bytes::Bytes::from(body[..n.min(body.len())].to_vec());
        let stream =
            futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(futures::stream::pending());
        if let Ok(v) = body.len().to_string().parse() {
            headers.insert(header::CONTENT_LENGTH, v);
        }
        return (status, headers, axum::body::Body::from_stream(stream)).into_response();
    }
    if let Some(pieces) = find(&s.faults.throttle) {
        let every = s.faults.throttle_every.lock().map(|d| *d).unwrap_or_default();
        let size = body.len().div_ceil(pieces.max(1)).max(1);
        let chunks: Vec<bytes::Bytes> = body.chunks(size).map(bytes::Bytes::copy_from_slice).collect();
        let stream = futures::stream::iter(chunks).then(move |c| async move {
            tokio::time::sleep(every).await;
            Ok::<_, std::io::Error>(c)
        });
        return (status, headers, axum::body::Body::from_stream(stream)).into_response();
    }
    (status, headers, body).into_response()
}
