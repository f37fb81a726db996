//! Zero-trust LAN access: TLS with curl and reqwest, mTLS principals, the DESIGN §9 role
//! matrix endpoint by endpoint, wrong and revoked tokens, rate limits, secrets kept out of the
//! logs, connection limits and timeouts, clients that hang up, and the encrypted model store.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use outpost::auth::Role;
use outpost_tests::broker::Pki;
use outpost_tests::*;
use serde_json::Value;

/// A token's secret and its `[auth] tokens` entry.
fn token(name: &str, roles: &[Role], models: Option<&[&str]>) -> (String, String) {
    let models: Option<Vec<String>> = models.map(|m| m.iter().map(|s| (*s).to_owned()).collect());
    outpost::auth::create_token(name, roles, models.as_deref()).expect("token")
}

fn config(state: &Path, http_extra: &str, rest: &str) -> String {
    format!(
        "[node]\nsite = \"test-site\"\nname = \"test-node\"\nstate_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n{http_extra}\n\n[local_models]\ndirs = [{:?}]\n\n{rest}\n",
        state.display().to_string(),
        root().join("models").display().to_string(),
    )
}

fn tls_keys(pki: &Pki, mtls: bool) -> String {
    let mut s = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        pki.path("server.pem").display().to_string(),
        pki.path("server.pk8.key").display().to_string()
    );
    if mtls {
        s.push_str(&format!("client_ca = {:?}\n", pki.path("ca.pem").display().to_string()));
    }
    s
}

fn tls_client(pki: &Pki, identity: Option<&str>) -> Result<reqwest::Client> {
    outpost::tls::install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path("ca.pem"))?)?;
    let mut b = reqwest::Client::builder().add_root_certificate(ca).timeout(Duration::from_secs(30));
    if let Some(name) = identity {
        let mut pem = std::fs::read(pki.path(&format!("{name}.pem")))?;
        pem.extend(std::fs::read(pki.path(&format!("{name}.pk8.key")))?);
        b = b.identity(reqwest::Identity::from_pem(&pem)?);
    }
    Ok(b.build()?)
}

fn mlp_request() -> Result<Value> {
    Ok(golden_for(&root().join("models").join("mlp"))?.request(0))
}

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, reqwest::header::HeaderMap, Value)> {
    let mut req = if method == "POST" { http.post(url) } else { http.get(url) };
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await?;
    Ok((status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_with_reqwest_and_curl() -> Result<()> {
    let pki = Pki::generate()?;
    let (secret, entry) = token("pos", &[Role::Infer], None);
    let state = tempfile::tempdir()?;
    let text = config(state.path(), &tls_keys(&pki, false), &format!("[auth]\ntokens = [{entry}]\n"));
    let agent = TestAgent::start_text(state, &text, "https", tls_client(&pki, None)?).await?;
    let url = format!("https://localhost:{}", agent.agent.addr().port());

    let (s, _, body) =
        call(&agent.http, "POST", &format!("{url}/v2/models/mlp/infer"), Some(&secret), Some(&mlp_request()?)).await?;
    ensure!(s == 200, "reqwest over TLS: {s} {body}");
    // Plain HTTP to the TLS port gets no answer in clear.
    let plain =
        http_client().get(format!("http://127.0.0.1:{}/v2/health/live", agent.agent.addr().port())).send().await;
    ensure!(plain.is_err(), "plain HTTP on the TLS listener: {plain:?}");

    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--cacert"])
        .arg(pki.path("ca.pem"))
        .args(["-H", &format!("Authorization: Bearer {secret}"), &format!("{url}/v2/models/mlp")])
        .output()
        .context("curl (scripts/setup-test.sh installs it)")?;
    let written = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(written == "200 2", "curl over TLS (HTTP/2 by ALPN): {written} {}", String::from_utf8_lossy(&out.stderr));
    // curl without the CA refuses the server: the certificate is not from a public CA.
    let out = std::process::Command::new("curl").args(["-sS", &format!("{url}/v2/health/live")]).output()?;
    ensure!(!out.status.success(), "curl must not trust the test CA by default");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_missing_and_foreign_certificates_and_records_the_principal() -> Result<()> {
    let pki = Pki::generate()?;
    let state = tempfile::tempdir()?;
    let auth = "[auth]\nclients = [{ subject = \"pos-terminal-1\", roles = [\"infer\"], models = [\"mlp\"] }]\n";
    let text = config(state.path(), &tls_keys(&pki, true), auth);
    let agent = TestAgent::start_text(state, &text, "https", tls_client(&pki, Some("client"))?).await?;
    let url = format!("https://localhost:{}", agent.agent.addr().port());
    let infer = format!("{url}/v2/models/mlp/infer");
    let req = mlp_request()?;

    let none = call(&tls_client(&pki, None)?, "POST", &infer, None, Some(&req)).await;
    ensure!(none.is_err(), "no client certificate must fail the handshake: {none:?}");
    let rogue = call(&tls_client(&pki, Some("rogue"))?, "POST", &infer, None, Some(&req)).await;
    ensure!(rogue.is_err(), "a certificate from another CA (same CN) must fail: {rogue:?}");

    let (s, _, body) = call(&agent.http, "POST", &infer, None, Some(&req)).await?;
    ensure!(s == 200, "the right certificate: {s} {body}");
    let (s, _, _) = call(&agent.http, "POST", &format!("{url}/v2/models/cnn/infer"), None, Some(&req)).await?;
    ensure!(s == 403, "the certificate's principal may run mlp only: {s}");
    let (s, _, _) = call(&agent.http, "GET", &format!("{url}/metrics"), None, None).await?;
    ensure!(s == 403, "infer role may not read metrics: {s}");

    let metrics = agent.agent.service().render_metrics();
    ensure!(metrics.contains("outpost_tls_handshake_failures_total 2"), "{metrics}");
    let state = agent.stop_keep_state().await?;
    let recs = crate::audit::records(state.path())?;
    let inference = recs.values().find(|r| r["body"]["kind"] == "inference").context("an inference record")?;
    ensure!(inference["body"]["principal"] == "cert:pos-terminal-1", "{inference}");
    let denied = recs.values().find(|r| r["body"]["kind"] == "auth_failure").context("an auth failure record")?;
    ensure!(denied["body"]["principal"] == "cert:pos-terminal-1", "{denied}");
    Ok(())
}

/// The DESIGN §9 matrix, row by row: the endpoint, then whether each of (no credentials,
/// infer, observe, admin) may call it. The infer token is limited to `mlp`.
const MATRIX: &[(&str, &str, [bool; 4])] = &[
    ("GET", "/v2/health/live", [true, true, true, true]),
    ("GET", "/v2/health/ready", [true, true, true, true]),
    ("GET", "/v2", [false, true, true, true]),
    ("GET", "/v2/models/mlp", [false, true, true, true]),
    ("GET", "/v2/models/mlp/versions/1", [false, true, true, true]),
    ("GET", "/v2/models/mlp/ready", [false, true, true, true]),
    ("GET", "/v2/models/mlp/versions/1/ready", [false, true, true, true]),
    ("GET", "/v2/models/mlp/config", [false, true, true, true]),
    ("GET", "/v2/models/mlp/versions/1/config", [false, true, true, true]),
    ("GET", "/v2/models/stats", [false, false, true, true]),
    ("GET", "/v2/models/mlp/stats", [false, false, true, true]),
    ("GET", "/v2/models/mlp/versions/1/stats", [false, false, true, true]),
    ("POST", "/v2/models/mlp/infer", [false, true, false, true]),
    ("POST", "/v2/models/mlp/versions/1/infer", [false, true, false, true]),
    ("POST", "/v2/models/cnn/infer", [false, false, false, true]),
    ("GET", "/metrics", [false, false, true, true]),
    ("GET", "/admin/status", [false, false, true, true]),
    ("POST", "/v2/repository/index", [false, false, true, true]),
    ("POST", "/admin/models/mlp/rollback", [false, false, false, true]),
    ("POST", "/admin/registry/poll", [false, false, false, true]),
    ("GET", "/admin/audit/export?since=1h", [false, false, false, true]),
    ("POST", "/v2/repository/models/mlp-int8-dyn/unload", [false, false, false, true]),
    ("POST", "/v2/repository/models/mlp-int8-dyn/load", [false, false, false, true]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_role_of_the_matrix() -> Result<()> {
    let (infer, infer_entry) = token("pos", &[Role::Infer], Some(&["mlp"]));
    let (observe, observe_entry) = token("grafana", &[Role::Observe], None);
    let (admin, admin_entry) = token("ops", &[Role::Admin], None);
    let state = tempfile::tempdir()?;
    let text = config(state.path(), "", &format!("[auth]\ntokens = [{infer_entry}, {observe_entry}, {admin_entry}]\n"));
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let cnn_req = golden_for(&root().join("models").join("cnn"))?.request(0);
    let mlp_req = mlp_request()?;
    let mut failures = Vec::new();
    for (method, path, allowed) in MATRIX {
        for (i, bearer) in [None, Some(infer.as_str()), Some(observe.as_str()), Some(admin.as_str())].iter().enumerate()
        {
            let body = if path.contains("/cnn/") {
                Some(&cnn_req)
            } else if path.ends_with("/infer") {
                Some(&mlp_req)
            } else {
                None
            };
            let (s, headers, answer) = call(&agent.http, method, &agent.url(path), *bearer, body).await?;
            let who = ["none", "infer", "observe", "admin"][i];
            let expected_refusal = if i == 0 { 401 } else { 403 };
            if allowed[i] {
                if s == 401 || s == 403 {
                    failures.push(format!("{method} {path} as {who}: refused with {s} {answer}"));
                }
            } else if s != expected_refusal {
                failures.push(format!("{method} {path} as {who}: {s}, expected {expected_refusal}"));
            } else if s == 401 && !headers.contains_key("www-authenticate") {
                failures.push(format!("{method} {path}: 401 without WWW-Authenticate"));
            }
        }
    }
    ensure!(failures.is_empty(), "matrix mismatches:\n{}", failures.join("\n"));
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_revoked_tokens_are_refused_and_rate_limits_answer_429() -> Result<()> {
    let (keep, keep_entry) = token("keep", &[Role::Infer], None);
    let (revoke, revoke_entry) = token("leaver", &[Role::Infer], None);
    let state = tempfile::tempdir()?;
    let text = config(
        state.path(),
        "",
        &format!("[auth]\ntokens = [{keep_entry}, {revoke_entry}]\nrate_limit = 0.2\nrate_burst = 3\n"),
    );
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let url = agent.url("/v2/models/mlp");
    let (s, _, body) = call(&agent.http, "GET", &url, Some("opt_not-a-real-token"), None).await?;
    ensure!(s == 401 && body["error"].as_str().is_some_and(|e| e.contains("unknown or revoked")), "{s} {body}");
    let (s, _, _) = call(&agent.http, "GET", &url, Some(&revoke), None).await?;
    ensure!(s == 200, "before revocation: {s}");

    // Revocation: the entry leaves the config, which is reloaded (SIGHUP does the same).
    let without = text.replace(&format!(", {revoke_entry}"), "");
    ensure!(without != text);
    std::fs::write(agent.config_path(), &without)?;
    agent.agent.reload(outpost::config::Config::load(&agent.config_path())?).await;
    let (s, _, _) = call(&agent.http, "GET", &url, Some(&revoke), None).await?;
    ensure!(s == 401, "revoked token: {s}");

    // `keep` has a burst of 3 and refills one request every 5 s: the 4th quick call is refused.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let (s, h, _) = call(&agent.http, "GET", &url, Some(&keep), None).await?;
        statuses.push(s);
        if s == 429 {
            retry_after = h.get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        }
    }
    ensure!(statuses == [200, 200, 200, 429], "{statuses:?}");
    ensure!(
        retry_after.as_deref().is_some_and(|v| v.parse::<u64>().is_ok_and(|n| (1..=5).contains(&n))),
        "{retry_after:?}"
    );
    let m = agent.agent.service().render_metrics();
    ensure!(m.contains("outpost_http_access_denied_total{reason=\"unauthenticated\"} 2"), "{m}");
    ensure!(m.contains("outpost_http_access_denied_total{reason=\"rate_limited\"} 1"), "{m}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_or_the_audit_log() -> Result<()> {
    // The token comes from the CLI, as an operator makes one.
    let out = std::process::Command::new(crate::outpost_bin())
        .args(["token", "create", "pos", "--roles", "infer,observe", "--models", "mlp"])
        .output()?;
    ensure!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let secret = printed.lines().find(|l| l.starts_with("opt_")).context("secret line")?.to_owned();
    let entry = printed.lines().find(|l| l.starts_with("{ name = \"pos\"")).context("entry line")?.to_owned();
    ensure!(!entry.contains(&secret), "the config entry holds the digest only");

    let state = tempfile::tempdir()?;
    let text = config(state.path(), "", &format!("[log]\nlevel = \"debug\"\n\n[auth]\ntokens = [{entry}]\n"));
    let cfg_path = state.path().join("outpost.toml");
    std::fs::write(&cfg_path, &text)?;
    let args = ["run", "--config", cfg_path.to_str().context("path")?];
    let mut child = ChildAgent::spawn_env(&crate::outpost_bin(), &args, &[("RUST_LOG", "debug")])?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    let http = http_client();
    let wrong = "opt_wrong-secret-that-must-not-be-logged";
    let (s, _, _) =
        call(&http, "POST", &format!("http://{addr}/v2/models/mlp/infer"), Some(&secret), Some(&mlp_request()?))
            .await?;
    ensure!(s == 200, "{s}");
    let (s, _, _) = call(&http, "GET", &format!("http://{addr}/metrics"), Some(wrong), None).await?;
    ensure!(s == 401, "{s}");
    child.signal("TERM")?;
    ensure!(child.wait_exit(Duration::from_secs(30))? == 0);
    let logs = child.log.join("\n");
    ensure!(logs.contains("access denied"), "the failure is logged: {logs}");
    for s in [secret.as_str(), wrong, &secret[4..20]] {
        ensure!(!logs.contains(s), "a secret reached the log");
        for f in walk(state.path()) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            ensure!(!String::from_utf8_lossy(&bytes).contains(s), "a secret reached {}", f.display());
        }
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Reads until the peer closes (Ok(bytes read)) or `limit` passes (Err).
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>> {
    s.set_read_timeout(Some(limit))?;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(all),
            Err(e) => return Err(e).context("the connection stayed open"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_http1_requests_past_the_connections_yields_are_all_answered() -> Result<()> {
    let state = tempfile::tempdir()?;
    let text = config(state.path(), "", "");
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    // 100 requests in one write: hyper's dispatcher yields after 16, and a connection that
    // keeps waking itself is let go to the runtime after a repeat (`http::selfwake`); each
    // yield must still end in another poll. The last request closes the connection.
    let n = 100;
    let mut head = "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n".repeat(n - 1);
    head.push_str("GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut c = TcpStream::connect(agent.agent.addr())?;
    c.write_all(head.as_bytes())?;
    // Without that poll the connection would wait for its idle tick (15 s here).
    let got = read_until_closed(&mut c, Duration::from_secs(10))?;
    let answered = String::from_utf8_lossy(&got).matches("HTTP/1.1 200").count();
    ensure!(answered == n, "{answered} of {n} pipelined requests answered");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_closes_connections_that_began_no_request_instead_of_waiting_for_them() -> Result<()> {
    let pki = Pki::generate()?;
    // With TLS, a client that opened a connection and sent nothing holds it in the handshake
    // (on both listeners); without, the gRPC listener waits for its first bytes.
    for tls in [true, false] {
        let state = tempfile::tempdir()?;
        let keys = if tls { tls_keys(&pki, false) } else { String::new() };
        let text = config(state.path(), &keys, "[grpc]\nlisten = \"127.0.0.1:0\"\n");
        let cfg_path = state.path().join("outpost.toml");
        std::fs::write(&cfg_path, &text)?;
        let args = ["run", "--config", cfg_path.to_str().context("path")?];
        let mut child = ChildAgent::spawn_env(&crate::outpost_bin(), &args, &[("RUST_LOG", "info,outpost=debug")])?;
        let grpc = child.wait_for("grpc listener bound", Duration::from_secs(60))?;
        let grpc: std::net::SocketAddr = grpc
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .context("the gRPC listener's address")?
            .parse()?;
        let addr: std::net::SocketAddr = child.wait_listening()?.parse()?;
        child.wait_for("initial model load finished", Duration::from_secs(60))?;
        let silent: Vec<std::net::SocketAddr> = if tls { vec![addr, grpc] } else { vec![grpc] };
        let mut held = Vec::new();
        for to in &silent {
            held.push(TcpStream::connect(to)?);
            // A later connection answered on the same listener: the silent one was accepted
            // before it (one accept loop, in order).
            let scheme = if tls { "https" } else { "http" };
            let client = if tls { tls_client(&pki, None)? } else { http_client() };
            // (The gRPC listener answers this HTTP/1.1 probe 415.)
            client.get(format!("{scheme}://localhost:{}/v2/health/live", to.port())).send().await?;
        }
        child.signal("TERM")?;
        ensure!(child.wait_exit(Duration::from_secs(60))? == 0, "the agent stops cleanly");
        let log = child.log.join("\n");
        let closed = child.log.iter().filter(|l| l.contains("closed a connection that began no request")).count();
        ensure!(
            closed == silent.len(),
            "tls={tls}: {closed} of {} silent connections closed at shutdown:\n{log}",
            silent.len()
        );
        ensure!(!log.contains("TLS handshake timed out"), "the shutdown waited for a handshake:\n{log}");
        ensure!(!log.contains("still open after the shutdown grace"), "{log}");
        drop(held);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_oversized_and_excess_connections_are_cut_off() -> Result<()> {
    let state = tempfile::tempdir()?;
    let http_extra =
        "max_connections = 3\nheader_read_timeout = \"300ms\"\nidle_timeout = \"400ms\"\nmax_header_bytes = 8192\nrequest_timeout = \"500ms\"\n";
    let text = config(state.path(), http_extra, "");
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let addr = agent.agent.addr();
    let get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n";

    // Slow loris: half a request head, then nothing. Cut off by the header read timeout.
    let mut slow = TcpStream::connect(addr)?;
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")?;
    let t = std::time::Instant::now();
    read_until_closed(&mut slow, Duration::from_secs(10))?;
    ensure!(t.elapsed() < Duration::from_secs(5), "slow head cut off after {:?}", t.elapsed());

    // Idle keep-alive: one request answered, then silence. Closed by the idle timeout.
    let mut idle = TcpStream::connect(addr)?;
    idle.write_all(get)?;
    let got = read_until_closed(&mut idle, Duration::from_secs(10))?;
    ensure!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));

    // A slow body: the head arrives, a tenth of the body, then nothing. 408 within the request
    // timeout, and the connection closes.
    let mut slow_body = TcpStream::connect(addr)?;
    slow_body
        .write_all(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\":")?;
    let t = std::time::Instant::now();
    let got = read_until_closed(&mut slow_body, Duration::from_secs(10))?;
    ensure!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&got));
    ensure!(t.elapsed() < Duration::from_secs(5), "slow body cut off after {:?}", t.elapsed());

    // A request head over max_header_bytes: 431, not a buffer that grows. The server answers
    // and closes with the rest of the head unread, so the kernel may reset the connection
    // before the client reads the 431: a reset is the same refusal.
    let mut big = TcpStream::connect(addr)?;
    let head = format!("GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    let _ = big.write_all(head.as_bytes());
    let got = read_until_closed(&mut big, Duration::from_secs(10))?;
    let text = String::from_utf8_lossy(&got);
    ensure!(text.starts_with("HTTP/1.1 431") || got.is_empty(), "an oversized head was not refused: {text}");

    // max_connections = 3: three open, answered connections; the fourth is closed at once.
    // First the connections above must be gone on the server's side too: a client sees the
    // close a moment before the server's task gives its slot back.
    let metrics = || agent.agent.service().render_metrics();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics().contains("outpost_http_connections_open 0\n") && std::time::Instant::now() < until {
        tokio::task::yield_now().await;
    }
    ensure!(metrics().contains("outpost_http_connections_open 0\n"), "earlier connections still open: {}", metrics());
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr)?;
        c.write_all(get)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf)?;
        ensure!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        open.push(c);
    }
    let mut extra = TcpStream::connect(addr)?;
    let _ = extra.write_all(get);
    let got = read_until_closed(&mut extra, Duration::from_secs(10))?;
    ensure!(got.is_empty(), "the connection over the limit got an answer");
    let m = metrics();
    ensure!(m.contains("outpost_http_connections_refused_total 1"), "{m}");
    ensure!(m.contains("outpost_http_connections_open 3\n"), "{m}");
    drop(open);
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_store_is_encrypted_and_unreadable_without_its_key() -> Result<()> {
    use outpost_tests::registry::{StaticServer, TestRegistry};
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), "")).await?;
    let (s, body) = agent.post("/v2/models/mlp/infer", &mlp_request()?).await?;
    ensure!(s == 200, "{s} {body}");
    let config_path = agent.config_path();
    let state = agent.stop_keep_state().await?;

    // On disk: not the ONNX bytes, nor any run of them; the key is private to the agent's user.
    let onnx = std::fs::read(root().join("models").join("mlp").join("model.onnx"))?;
    let stored = std::fs::read_dir(state.path().join("store").join("models"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "onnx"))
        .context("a stored model")?;
    let bytes = std::fs::read(&stored)?;
    ensure!(bytes.starts_with(b"OPSTENC1") && bytes.len() > onnx.len(), "{} bytes", bytes.len());
    for window in onnx.chunks(64).filter(|w| w.len() == 64) {
        ensure!(!bytes.windows(64).any(|b| b == window), "plaintext ONNX found in the store file");
    }
    let key_file = state.path().join("store.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file)?.permissions());
    ensure!(mode & 0o777 == 0o600, "store key mode {mode:o}");

    // Without the key the agent refuses to start rather than serve or silently re-key.
    let key = std::fs::read(&key_file)?;
    std::fs::remove_file(&key_file)?;
    let err = outpost::start(outpost::config::Config::load(&config_path)?).await.err().context("start must fail")?;
    ensure!(err.to_string().contains("restore the key file"), "{err}");
    ensure!(!key_file.exists(), "no new key was made over a store that holds models");

    // With another key (registry unreachable): the model fails authentication and is not served.
    std::fs::write(&key_file, [0x5a; 32])?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let text = std::fs::read_to_string(&config_path)?.replace(&server.url(), &format!("http://{dead}/"));
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let (s, body) = agent.get("/v2/models/mlp/ready").await?;
    ensure!(s != 200, "{body}");
    let list = crate::model_list(&agent.config_path())?;
    ensure!(list.contains("failed authentication"), "{list}");
    let state = agent.stop_keep_state().await?;

    // The right key back, registry back: the model is fetched, verified and served again.
    std::fs::write(&key_file, &key)?;
    let text = std::fs::read_to_string(&config_path)?.replace(&format!("http://{dead}/"), &server.url());
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let (s, body) = agent.post("/v2/models/mlp/infer", &mlp_request()?).await?;
    ensure!(s == 200, "{s} {body}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_swaps_the_certificate_and_a_bad_one_keeps_the_current() -> Result<()> {
    let (old_pki, new_pki) = (Pki::generate()?, Pki::generate()?);
    let state = tempfile::tempdir()?;
    // The configured paths are files the test replaces, as an operator's renewal job would.
    let (cert, key) = (state.path().join("server.pem"), state.path().join("server.key"));
    std::fs::copy(old_pki.path("server.pem"), &cert)?;
    std::fs::copy(old_pki.path("server.pk8.key"), &key)?;
    let tls = format!("tls_cert = {:?}\ntls_key = {:?}\n", cert.display().to_string(), key.display().to_string());
    let text = config(state.path(), &tls, "");
    let agent = TestAgent::start_text(state, &text, "https", tls_client(&old_pki, None)?).await?;
    let url = format!("https://localhost:{}/v2/health/live", agent.agent.addr().port());
    ensure!(tls_client(&old_pki, None)?.get(&url).send().await?.status() == 200);
    ensure!(tls_client(&new_pki, None)?.get(&url).send().await.is_err(), "the new CA is not in use yet");

    std::fs::copy(new_pki.path("server.pem"), &cert)?;
    std::fs::copy(new_pki.path("server.pk8.key"), &key)?;
    agent.agent.reload(outpost::config::Config::load(&agent.config_path())?).await;
    // Fresh clients: new connections get the new certificate.
    ensure!(tls_client(&new_pki, None)?.get(&url).send().await?.status() == 200, "renewed certificate served");
    ensure!(tls_client(&old_pki, None)?.get(&url).send().await.is_err(), "the old certificate is gone");

    // A broken file on reload: logged, and the current certificate keeps serving.
    std::fs::write(&cert, "not a certificate")?;
    let cfg = agent.agent.config();
    agent.agent.reload((*cfg).clone()).await;
    ensure!(tls_client(&new_pki, None)?.get(&url).send().await?.status() == 200, "kept after a bad reload");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_requests_neither_fills_the_audit_log_nor_stops_inference() -> Result<()> {
    use futures::StreamExt as _;
    let (good, entry) = token("pos", &[Role::Infer], None);
    let state = tempfile::tempdir()?;
    // 1 MiB of audit quota: 1,800 full records of refused requests would fill it.
    let text = config(state.path(), "", &format!("[auth]\ntokens = [{entry}]\n\n[audit]\nquota_bytes = 1048576\n"));
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let audit = agent.agent.audit().context("audit on")?.clone();
    let before = audit.retained_bytes();
    // The flood comes from another loopback address, on kept-alive connections.
    let attacker = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = agent.url("/v2/models/mlp/infer");
    let body = serde_json::to_vec(&mlp_request()?)?;
    let statuses: Vec<u16> = futures::stream::iter(0..100_000)
        .map(|_| {
            let req = attacker.post(&url).bearer_auth("not-a-token").body(body.clone());
            async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    ensure!(statuses.iter().all(|&s| s == 401 || s == 429), "only 401 and 429");
    ensure!(refused > 90_000, "a failing source is refused before authentication: {refused} of 100000");
    // Inference from the point of sale goes on.
    let (s, _, answer) = call(&agent.http, "POST", &url, Some(&good), Some(&mlp_request()?)).await?;
    ensure!(s == 200, "{s} {answer}");
    let m = agent.agent.service().render_metrics();
    ensure!(m.contains(&format!("outpost_http_access_denied_total{{reason=\"source_blocked\"}} {refused}")), "{m}");
    let grown = audit.retained_bytes() - before;
    ensure!(grown < 16 * 1024, "the audit log grew by {grown} bytes for 100,000 refused requests");
    let state = agent.stop_keep_state().await?;
    // The refused requests are in the log as one summary with their count.
    let summaries: Vec<Value> = crate::audit::records(state.path())?
        .into_values()
        .filter(|r| r["body"]["kind"] == "auth_failure" && r["body"]["count"].as_u64().unwrap_or(0) > 1)
        .collect();
    let counted: u64 = summaries.iter().filter_map(|r| r["body"]["count"].as_u64()).sum();
    ensure!(counted >= 99_000, "summaries count the refused requests: {counted} ({summaries:?})");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() -> Result<()> {
    let (good, entry) = token("pos", &[Role::Infer], None);
    let state = tempfile::tempdir()?;
    let text = config(state.path(), "", &format!("[auth]\ntokens = [{entry}]\n"));
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = agent
            .http
            .get(agent.url("/v2/models/mlp"))
            .header("Authorization", format!("{scheme} {good}"))
            .send()
            .await?;
        ensure!(r.status() == 200, "{scheme}: {}", r.status());
    }
    agent.stop().await
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) from a kept-alive stream.
fn read_response(s: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(s.read(&mut byte)? == 1, "connection closed after {} bytes", head.len());
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((head, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_reading_the_body_keep_http1_connections_and_http2_streams_whole() -> Result<()> {
    let (good, entry) = token("pos", &[Role::Infer], None);
    let (big, big_entry) = token("big", &[Role::Infer], None);
    let state = tempfile::tempdir()?;
    let text = config(
        state.path(),
        "max_body_bytes = 100000\n",
        &format!("[auth]\ntokens = [{entry}, {big_entry}]\nrate_limit = 0.01\nrate_burst = 2\n"),
    );
    let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
    let addr = agent.agent.addr();
    let body = serde_json::to_vec(&mlp_request()?)?;
    // HTTP/1.1: a 401, a 200, a 404 and a 429 (over the rate limit) on one connection, each
    // request with a body; every answer arrives and the connection stays open.
    let blocking = tokio::task::spawn_blocking({
        let body = body.clone();
        let good = good.clone();
        move || -> Result<Vec<String>> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut heads = Vec::new();
            for (path, token) in [
                ("/v2/models/mlp/infer", "wrong"),
                ("/v2/models/mlp/infer", good.as_str()),
                ("/v2/no/such/thing", good.as_str()),
                ("/v2/models/mlp/infer", good.as_str()),
            ] {
                let req = format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                s.write_all(req.as_bytes())?;
                s.write_all(&body)?;
                heads.push(read_response(&mut s)?.0);
            }
            Ok(heads)
        }
    })
    .await??;
    let codes: Vec<&str> = blocking.iter().map(|h| h.split(' ').nth(1).unwrap_or("")).collect();
    ensure!(codes == ["401", "200", "404", "429"], "{codes:?}");
    ensure!(blocking.iter().all(|h| !h.contains("connection: close")), "{blocking:?}");

    // HTTP/2: 20 refused POSTs with bodies on one connection all get their answer.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().timeout(Duration::from_secs(30)).build()?;
    let url = agent.url("/v2/models/mlp/infer");
    let answers =
        futures::future::join_all((0..20).map(|_| h2.post(&url).bearer_auth("wrong").body(body.clone()).send())).await;
    for a in answers {
        let r = a.context("an HTTP/2 answer, not a stream error")?;
        ensure!(r.status() == 401, "{}", r.status());
    }

    // A declared length over the limit is answered at once: the client waits for
    // `100 Continue` and sends no body.
    let head = tokio::task::spawn_blocking(move || -> Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(
            format!(
                "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {big}\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )?;
        Ok(read_response(&mut s).context("413 within 2 s, with no body sent")?.0)
    })
    .await??;
    ensure!(head.starts_with("http/1.1 413"), "{head}");
    ensure!(head.contains("connection: close"), "{head}");
    agent.stop().await
}

/// A server that counts what reaches it.
async fn counting_server(
    ip: [u8; 4],
) -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>, tokio::sync::oneshot::Sender<()>)> {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind((std::net::IpAddr::from(ip), 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let count = seen.clone();
    let app = axum::Router::new().fallback(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { "{}" }
    });
    Ok((url, seen, serve_until_stopped(listener, app)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_outbound_client_follows_a_redirect_off_the_residency_allow_list() -> Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    // Off the allow-list: 127.0.0.2. Every answer of the allowed host redirects there.
    let (outside, reached, _stop_outside) = counting_server([127, 0, 0, 2]).await?;
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let allowed = format!("http://{}", listener.local_addr()?);
    let log = asked.clone();
    let target = outside.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        log.lock().unwrap_or_else(|p| p.into_inner()).push(uri.path().to_owned());
        let to = format!("{target}{}", uri.path());
        async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, to)]) }
    });
    let _stop_allowed = serve_until_stopped(listener, app);

    let reg = outpost_tests::registry::TestRegistry::new()?;
    let extra = format!(
        "{}\n[overflow]\nurl = {allowed:?}\nallow_http = true\n\n[models.faraway]\noverflow = \"remote_only\"\n\n[upstream]\nurl = {allowed:?}\nallow_http = true\nflush_interval = \"20ms\"\n\n[privacy]\nresidency_allow = [\"127.0.0.1\"]\n",
        registry_toml(&allowed, &reg.root_json(), "")
    );
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;
    // The registry: the poll fails, naming the redirect and its target.
    let err = agent.agent.poll_registry().await.err().context("a redirect is an error")?.to_string();
    ensure!(err.contains("redirect refused") && err.contains("127.0.0.2"), "{err}");
    // Overflow (a model served only by the target): refused, saying why.
    let (s, answer) = agent.post("/v2/models/faraway/infer", &mlp_request()?).await?;
    let why = answer["error"].as_str().unwrap_or_default();
    ensure!(s == 503 && why.contains("redirect refused") && why.contains("127.0.0.2"), "{s} {answer}");
    // Upstream: the outbox tries, and is refused (bounded wait for its attempt).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !asked.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|p| p.starts_with("/v1/audit")) {
        ensure!(std::time::Instant::now() < deadline, "the outbox made no attempt in 30 s");
        agent.agent.wake_outbox();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(reached.load(SeqCst) == 0, "{} requests reached the host off the allow-list", reached.load(SeqCst));
    agent.stop().await
}

/// The thin clients take the agent's address, TLS and token from the configuration they find
/// (`[cli]`), as an operator on an mTLS box with tokens would run them: no environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_reach_an_mtls_box_with_the_configurations_cli_settings() -> Result<()> {
    let pki = Pki::generate()?;
    let (secret, entry) = token("ops", &[Role::Observe, Role::Admin], None);
    let state = tempfile::tempdir()?;
    let auth = format!("[auth]\ntokens = [{entry}]\n");
    let text = config(state.path(), &tls_keys(&pki, true), &auth);
    let agent = TestAgent::start_text(state, &text, "https", tls_client(&pki, Some("client"))?).await?;
    let token_file = agent.state.path().join("cli.token");
    std::fs::write(&token_file, format!("{secret}\n"))?;
    let cli = |with_cert: bool| {
        let mut c = format!(
            "[cli]\nurl = \"https://localhost:{}\"\nca = {:?}\ntoken_file = {:?}\n",
            agent.agent.addr().port(),
            pki.path("ca.pem").display().to_string(),
            token_file.display().to_string()
        );
        if with_cert {
            c.push_str(&format!(
                "client_cert = {:?}\nclient_key = {:?}\n",
                pki.path("client.pem").display().to_string(),
                pki.path("client.pk8.key").display().to_string()
            ));
        }
        c
    };
    let status = |extra: &str| -> Result<(Option<i32>, String)> {
        let path = agent.state.path().join("cli.toml");
        std::fs::write(&path, format!("{text}\n{extra}"))?;
        let out = std::process::Command::new(crate::outpost_bin())
            .args(["status", "--config"])
            .arg(&path)
            .env_remove("OUTPOST_TOKEN")
            .env_remove("OUTPOST_CA_FILE")
            .output()?;
        Ok((
            out.status.code(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        ))
    };
    let (code, out) = status(&cli(true))?;
    ensure!(code == Some(0) && out.contains("test-node (test-site)"), "with [cli]: {code:?} {out}");
    // Without the client certificate, the mTLS listener refuses the handshake: exit 69, named.
    let (code, out) = status(&cli(false))?;
    ensure!(code == Some(69) && out.contains("outpost:"), "without a client certificate: {code:?} {out}");
    // Without the token file, the box answers 401: the command fails and says so.
    let no_token = cli(true).lines().filter(|l| !l.starts_with("token_file")).collect::<Vec<_>>().join("\n");
    let (code, out) = status(&no_token)?;
    ensure!(code == Some(1) && out.contains("error"), "without a token: {code:?} {out}");
    agent.stop().await
}

/// HTTP/1.1 clients that send a request and hang up at once (forty of them, against a model
/// that runs each request for milliseconds on one thread) do not leave the model running their
/// requests: the agent notices each closed connection and drops its request unrun. A last,
/// live request, queued behind them, tells when the worker is through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_clients_that_hung_up_are_not_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("slow"))?;
    for f in ["model.onnx", "golden.json"] {
        std::fs::copy(root().join("tests/fixtures/models/mlp-slow").join(f), dir.path().join("slow").join(f))?;
    }
    let agent =
        TestAgent::start(&[dir.path().to_path_buf()], "[models.slow]\ninstances = 1\nmax_queue = 256\n").await?;
    let golden = golden_for(&root().join("tests/fixtures/models/mlp-slow"))?;
    let body = serde_json::to_vec(&golden.request(0))?;
    let runs = |meta: &Value| meta["parameters"]["runs"].as_u64().unwrap_or(0);
    let (_, before) = agent.get("/v2/models/slow").await?;
    let addr = agent.agent.addr();
    for _ in 0..40 {
        let mut s = TcpStream::connect(addr)?;
        let head = format!(
            "POST /v2/models/slow/infer HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(&body)?;
        drop(s);
    }
    let (status, answer) = agent.post("/v2/models/slow/infer", &golden.request(0)).await?;
    ensure!(status == 200, "{answer}");
    golden.check(0, &answer)?;
    let (_, after) = agent.get("/v2/models/slow").await?;
    let ran = runs(&after) - runs(&before);
    // The one running when the hang-ups were seen (a few more on a slow machine) and the last.
    ensure!(ran <= 10, "{ran} runs for 40 requests whose clients hung up and 1 live one: {after}");
    tokio::time::timeout(Duration::from_secs(30), agent.stop()).await??;
    Ok(())
}
