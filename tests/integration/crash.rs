//! Crash safety of installs: the agent as a child process is stopped dead (abort at a chosen
//! point, which a `kill -9` there would do) mid-download, after verification, mid-decompress
//! and after activation but before its state is persisted, round after round. After every
//! crash the store holds only complete, verified versions; after the last restart the new
//! version serves.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use outpost::registry::sha256_hex;
use outpost::store::Store;
use outpost_tests::registry::{StaticServer, TestRegistry};
use outpost_tests::*;

use crate::outpost_bin;

/// Every installed version's files exist and hash to their names.
fn assert_store_consistent(state_dir: &Path) -> anyhow::Result<Vec<String>> {
    let key = outpost::store::crypt::StoreKey::load_or_create(&state_dir.join("store.key"), false)
        .map_err(anyhow::Error::msg)?;
    let store = Store::open(state_dir)?.with_key(Some(key));
    let state = store.load_state()?;
    let mut versions = Vec::new();
    for (name, m) in &state.installed {
        for v in std::iter::once(&m.current).chain(m.previous.as_ref()) {
            // Decrypted in memory and re-hashed by the store.
            let model = store.read_model(&v.model_sha256)?;
            assert_eq!(sha256_hex(&model), v.model_sha256, "{name}@{} model file", v.version);
            let manifest = std::fs::read(store.manifest_path(&v.manifest_sha256))?;
            assert_eq!(sha256_hex(&manifest), v.manifest_sha256, "{name}@{} manifest", v.version);
        }
        versions.push(format!("{name}@{}", m.current.version));
    }
    Ok(versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_install_step_never_leaves_a_half_installed_model() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let state = tempfile::tempdir()?;
    let config = state.path().join("outpost.toml");
    std::fs::write(&config, config_text(state.path(), &[], &registry_toml(&server.url(), &reg.root_json(), "")))?;
    let args = ["run", "--config", config.to_str().unwrap_or_default()];

    // First start installs 1.0.0; then it is killed outright.
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    child.signal("KILL")?;
    assert_eq!(child.wait_status(Duration::from_secs(30))?.signal(), Some(9));
    assert_eq!(assert_store_consistent(state.path())?, vec!["mlp@1.0.0"]);

    reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
    let points = ["download-mid", "after-verify", "store-decompress", "mid-activation", "before-persist"];
    let rounds = if full_suite() { 5 } else { 2 };
    for round in 0..rounds {
        for point in points {
            let mut child = ChildAgent::spawn_env(&outpost_bin(), &args, &[("OUTPOST_FAILPOINTS", point)])?;
            let status = child.wait_status(Duration::from_secs(60))?;
            assert_eq!(status.signal(), Some(6), "round {round}, {point}: expected an abort, got {status:?}");
            assert!(child.log.iter().any(|l| l.contains(&format!("failpoint {point}"))), "{point} was reached");
            let versions = assert_store_consistent(state.path())?;
            assert_eq!(versions, vec!["mlp@1.0.0"], "round {round}, {point}: only the complete version is installed");
        }
    }

    // A clean restart: 1.0.0 serves from the store at once, then the poll installs 1.1.0.
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    let http = http_client();
    let golden = golden_for(&root().join("models/mlp-int8-qdq"))?;
    let r = http.post(format!("http://{addr}/v2/models/mlp/infer")).json(&golden.request(0)).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["model_version"], "1.1.0");
    golden.check(0, &body)?;
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    assert_eq!(assert_store_consistent(state.path())?, vec!["mlp@1.1.0"]);
    Ok(())
}

/// systemd's side of the watchdog: a notify socket the agent pings.
#[test]
fn a_stuck_inference_run_withholds_the_watchdog_ping() -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir()?;
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path)?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, config_text(&dir.path().join("state"), &[root().join("models")], ""))?;
    let socket_env = socket_path.display().to_string();
    let mut agent = ChildAgent::spawn_env(
        &crate::outpost_bin(),
        &["run", "--config", config.to_str().unwrap_or_default()],
        &[("NOTIFY_SOCKET", &socket_env), ("WATCHDOG_USEC", "500000"), ("OUTPOST_FAILPOINTS", "worker-hang")],
    )?;
    let addr = agent.wait_listening()?;
    // The hanging request must reach a loaded model (before that it is refused, and nothing
    // hangs): the agent listens while its models still load.
    agent.wait_for("initial model load finished", std::time::Duration::from_secs(120))?;
    let recv = |socket: &UnixDatagram| -> Option<String> {
        let mut buf = [0u8; 256];
        socket.recv(&mut buf).ok().map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    // While the agent makes progress, it pings.
    let mut pings = 0;
    for _ in 0..50 {
        if recv(&socket).is_some_and(|m| m.contains("WATCHDOG=1")) {
            pings += 1;
            if pings == 2 {
                break;
            }
        }
    }
    assert_eq!(pings, 2, "the agent pings the watchdog while healthy");
    // A request whose run hangs (the failpoint's marker as its first value).
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut body = golden.request(0);
    body["inputs"][0]["data"][0] = serde_json::json!(-12345.0);
    let body = serde_json::to_vec(&body)?;
    let mut stream = std::net::TcpStream::connect(&addr)?;
    write!(stream, "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len())?;
    stream.write_all(&body)?;
    agent.wait_for("withholding the watchdog ping", std::time::Duration::from_secs(30))?;
    // Pings sent before the run was seen as stuck may be queued: drain them, then none comes
    // for three timeouts.
    socket.set_nonblocking(true)?;
    while recv(&socket).is_some() {}
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(std::time::Duration::from_millis(1500)))?;
    let mut late = Vec::new();
    while let Some(m) = recv(&socket) {
        late.push(m);
    }
    assert!(!late.iter().any(|m| m.contains("WATCHDOG=1")), "pinged while a run is stuck: {late:?}");
    drop(stream);
    let _ = agent.signal("KILL");
    Ok(())
}
