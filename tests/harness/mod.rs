//! Test harness: starts the real agent on 127.0.0.1:0 (in-process or as a child process),
//! talks to it over real loopback HTTP, and reads golden files written by ONNX Runtime.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use outpost::config::Config;
use outpost::engine::golden::{compare, Golden};
use outpost::protocol::json::tensors_from_value;
use serde_json::{json, Value};

pub mod broker;
pub mod collector;
pub mod faulty;
pub mod mqtt;
pub mod postgres;
pub mod prometheus;
pub mod registry;
pub mod site;
pub mod upstream;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repository root")
}

/// True when the full suite is requested (CI sets OUTPOST_TEST_FULL=1).
pub fn full_suite() -> bool {
    std::env::var("OUTPOST_TEST_FULL").is_ok_and(|v| v == "1")
}

/// The committed demo models that take tensors, every variant (their `golden.json` requests
/// work as they are).
pub const DEMO_MODELS: [&str; 8] =
    ["cnn", "cnn-int8-dyn", "cnn-int8-qdq", "digit-parity", "mlp", "mlp-int8-dyn", "mlp-int8-qdq", "prob-mean"];
/// The committed demo packages (raw inputs; their golden vectors are in `package.json`).
pub const DEMO_PACKAGES: [&str; 2] = ["cancer-fields", "digits-png"];

/// Every committed demo model and package, sorted.
pub fn demo_names() -> Vec<&'static str> {
    let mut all: Vec<&str> = DEMO_MODELS.iter().chain(&DEMO_PACKAGES).copied().collect();
    all.sort_unstable();
    all
}
/// The transformer variants, built on demand into `.cache/models` by `scripts/gen-models.sh --minilm`.
pub const MINILM_MODELS: [&str; 3] = ["minilm", "minilm-int8-dyn", "minilm-int8-qdq"];

pub fn minilm_dir() -> PathBuf {
    root().join(".cache").join("models")
}

/// Whether the MiniLM variants are built. In the full suite their absence is an error.
pub fn minilm_available() -> bool {
    let ok = MINILM_MODELS.iter().all(|m| minilm_dir().join(m).join("model.onnx").is_file());
    assert!(ok || !full_suite(), "OUTPOST_TEST_FULL=1 but MiniLM is not built: run scripts/gen-models.sh --minilm");
    ok
}

/// A config text with a free loopback port, a temp state dir and the given extra TOML.
pub fn config_text(state_dir: &Path, model_dirs: &[PathBuf], extra: &str) -> String {
    let dirs: Vec<String> = model_dirs.iter().map(|d| format!("{:?}", d.display().to_string())).collect();
    format!(
        "[node]\nsite = \"test-site\"\nname = \"test-node\"\nstate_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n[local_models]\ndirs = [{}]\n\n{extra}\n",
        state_dir.display().to_string(),
        dirs.join(", ")
    )
}

/// An in-process agent with an HTTP client pointed at it.
pub struct TestAgent {
    pub agent: outpost::Agent,
    pub base: String,
    pub http: reqwest::Client,
    pub state: tempfile::TempDir,
}

impl TestAgent {
    /// Starts an agent serving the given model directories; returns once models are loaded.
    pub async fn start(model_dirs: &[PathBuf], extra: &str) -> Result<TestAgent> {
        Self::start_with_state(tempfile::tempdir()?, model_dirs, extra).await
    }

    /// Like [`TestAgent::start`], in an existing state directory (a restart).
    pub async fn start_with_state(state: tempfile::TempDir, model_dirs: &[PathBuf], extra: &str) -> Result<TestAgent> {
        let text = config_text(state.path(), model_dirs, extra);
        Self::start_text(state, &text, "http", http_client()).await
    }

    /// Starts an agent from a whole configuration text written to `<state>/outpost.toml`;
    /// `scheme` and `http` are what the test talks to it with.
    pub async fn start_text(
        state: tempfile::TempDir,
        text: &str,
        scheme: &str,
        http: reqwest::Client,
    ) -> Result<TestAgent> {
        let path = state.path().join("outpost.toml");
        std::fs::write(&path, text)?;
        let config = Config::load(&path)?;
        let agent = outpost::start(config).await?;
        tokio::time::timeout(Duration::from_secs(120), agent.started())
            .await
            .context("models did not load in 120 s")?;
        let base = format!("{scheme}://{}", agent.addr());
        Ok(TestAgent { agent, base, http, state })
    }

    /// The committed demo models.
    pub async fn demo() -> Result<TestAgent> {
        Self::start(&[root().join("models")], "").await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(self.url(path)).send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Value)> {
        let r = self.http.post(self.url(path)).body(body).send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await?;
        Ok((status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let (s, _, v) = self.post_raw(path, serde_json::to_vec(body)?).await?;
        Ok((s, v))
    }

    pub async fn stop(self) -> Result<()> {
        self.agent.shutdown().await?;
        Ok(())
    }

    /// Stops the agent and hands back its state directory for a restart.
    pub async fn stop_keep_state(self) -> Result<tempfile::TempDir> {
        self.agent.shutdown().await?;
        Ok(self.state)
    }

    pub fn config_path(&self) -> PathBuf {
        self.state.path().join("outpost.toml")
    }
}

/// A model's golden file, parsed, plus the raw JSON cases.
pub struct GoldenSet {
    pub golden: Golden,
    pub raw: Value,
}

pub fn golden_for(dir: &Path) -> Result<GoldenSet> {
    let bytes = std::fs::read(dir.join("golden.json")).with_context(|| format!("golden of {}", dir.display()))?;
    let golden = Golden::parse(&bytes).map_err(|e| anyhow!(e))?;
    let raw: Value = serde_json::from_slice(&bytes)?;
    Ok(GoldenSet { golden, raw })
}

impl GoldenSet {
    /// Case `i` as a V2 request body.
    pub fn request(&self, i: usize) -> Value {
        json!({ "id": format!("golden-{i}"), "inputs": self.raw["cases"][i]["inputs"] })
    }

    /// Checks a V2 response against case `i`; returns the largest absolute error.
    pub fn check(&self, i: usize, response: &Value) -> Result<f64> {
        let all: Vec<&str> = self.golden.cases[i].outputs.iter().map(|t| t.name.as_str()).collect();
        self.check_outputs(i, response, &all)
    }

    /// Checks only the named outputs of case `i`.
    pub fn check_outputs(&self, i: usize, response: &Value, names: &[&str]) -> Result<f64> {
        let got = tensors_from_value(response["outputs"].clone()).map_err(|e| anyhow!("response outputs: {e}"))?;
        let mut max_err = 0.0f64;
        for want in self.golden.cases[i].outputs.iter().filter(|t| names.contains(&t.name.as_str())) {
            let have = got.iter().find(|t| t.name == want.name).ok_or_else(|| anyhow!("no output {}", want.name))?;
            max_err = max_err
                .max(compare(have, want, &self.golden.tolerance).map_err(|e| anyhow!("output {}: {e}", want.name))?);
        }
        Ok(max_err)
    }
}

/// The agent as a child process, with its log lines readable as they arrive.
pub struct ChildAgent {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl ChildAgent {
    /// Starts `bin` (the test build of the `outpost` CLI) with `args`.
    pub fn spawn(bin: &Path, args: &[&str]) -> Result<ChildAgent> {
        Self::spawn_env(bin, args, &[])
    }

    /// Like [`ChildAgent::spawn`] with extra environment variables.
    pub fn spawn_env(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<ChildAgent> {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let rx = stderr_lines(&mut child, None)?;
        Ok(ChildAgent { child, lines: rx, log: Vec::new() })
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!("no log line with {needle:?} within {timeout:?}; log so far:\n{}", self.log.join("\n")),
            }
        }
    }

    /// Like [`ChildAgent::wait_for`], but a matching line already read (while waiting for
    /// another) counts: for lines whose order against others is not fixed.
    pub fn seen_or_wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return Ok(line.clone());
        }
        self.wait_for(needle, timeout)
    }

    /// The bound address, from the "listening" log line.
    pub fn wait_listening(&mut self) -> Result<String> {
        let line = self.wait_for("listening", Duration::from_secs(60))?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .ok_or_else(|| anyhow!("no addr in {line}"))?;
        Ok(addr.to_owned())
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        self.wait_status(timeout)?.code().ok_or_else(|| anyhow!("killed by a signal"))
    }

    /// Waits for the process to end, however it ends.
    pub fn wait_status(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Everything it wrote before it ended: the reader thread may still be reading
                // the pipe; it hangs up at the pipe's end of file (bounded by the timeout).
                loop {
                    let left = end.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    match self.lines.recv_timeout(left) {
                        Ok(line) => self.log.push(line),
                        Err(_) => break,
                    }
                }
                return Ok(status);
            }
            // Drain log lines while waiting; the channel wakes us when the process writes.
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.log.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(self.child.wait()?),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() > end {
                bail!("process did not exit within {timeout:?}");
            }
        }
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A closed loop for the benches: `clients` callers each POST `body` to `url` and wait for the
/// answer, for `seconds` and at most `max` requests in all. Returns requests answered per
/// second and the answered requests' latencies (ms), sorted.
pub async fn closed_loop(
    http: &reqwest::Client,
    url: &str,
    body: &bytes::Bytes,
    clients: usize,
    seconds: f64,
    max: usize,
) -> (f64, Vec<f64>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let budget = std::sync::Arc::new(AtomicUsize::new(max));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, body, budget) = (http.clone(), url.to_owned(), body.clone(), budget.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end
                    && budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok()
                {
                    let t = Instant::now();
                    let ok = match http.post(&url).body(body.clone()).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    if ok {
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat.len() as f64 / wall, lat)
}

/// The `p` quantile of sorted values (0 when empty).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0.0)
}

/// An HTTP client for tests (installs the process's rustls provider first).
pub fn http_client() -> reqwest::Client {
    outpost::tls::install_crypto_provider();
    reqwest::Client::new()
}

/// `[registry]` TOML for a test registry (polled by hand: the timer is an hour).
pub fn registry_toml(url: &str, trusted_root: &Path, extra: &str) -> String {
    format!(
        "[registry]\nurl = {:?}\ntrusted_root = {:?}\nallow_http = true\npoll_interval = \"1h\"\ntimeout = \"5s\"\n{extra}\n",
        url,
        trusted_root.display().to_string()
    )
}

/// A model directory holding only the MLP (fast restarts).
pub fn mlp_only() -> Result<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    let dst = d.path().join("mlp");
    std::fs::create_dir_all(&dst)?;
    for f in ["model.onnx", "golden.json"] {
        std::fs::copy(root().join("models/mlp").join(f), dst.join(f))?;
    }
    Ok(d)
}

/// Serves `app` on `listener` until the returned sender is used or dropped.
pub fn serve_until_stopped(listener: tokio::net::TcpListener, app: axum::Router) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    tx
}

/// A child's stderr as lines on a channel (and copied into `log` when given), read by a thread.
/// Waits for a child's stderr line containing `ready` (at most 60 s), then keeps draining its
/// log so it never blocks on a full pipe. On failure the child is killed and its log returned.
pub fn wait_ready(child: &mut Child, ready: &str, what: &str) -> Result<()> {
    let lines = stderr_lines(child, None)?;
    let mut log = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.contains(ready) => break,
            Ok(l) => log.push(l),
            Err(_) => {
                let _ = child.kill();
                bail!("{what} did not start:\n{}", log.join("\n"))
            }
        }
    }
    std::thread::spawn(move || while lines.recv().is_ok() {});
    Ok(())
}

pub fn stderr_lines(
    child: &mut Child,
    log: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
) -> Result<mpsc::Receiver<String>> {
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(l) = &log {
                if let Ok(mut l) = l.lock() {
                    l.push(line.clone());
                }
            }
            if tx.send(line).is_err() && log.is_none() {
                break;
            }
        }
    });
    Ok(rx)
}
