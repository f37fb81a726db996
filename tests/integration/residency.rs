//! Residency on every outbound path, at connect time: two loopback addresses, 127.0.0.1 on
//! the allow-list and 127.0.0.2 off it, one server per path on each. The destinations are
//! named (`*.test`, pinned to addresses by `[privacy.hosts]`), so the check that matters is
//! the one made against the address being connected to, not against the configured text.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_tests::broker::{Broker, BrokerOptions};
use outpost_tests::*;
use serde_json::Value;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The outbound paths, as the guard names them.
const PATHS: [&str; 5] = ["registry", "upstream", "overflow", "webhook hooks", "mqtt broker"];

/// A listener on `ip:port` that counts the connections it accepts (and holds them open).
async fn counting_listener(ip: [u8; 4], port: u16) -> Result<(Arc<AtomicUsize>, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind((std::net::IpAddr::from(ip), port)).await?;
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, SeqCst);
            if held.len() < 64 {
                held.push(s);
            }
        }
    });
    Ok((seen, task))
}

/// An HTTP server on 127.0.0.1 answering `{}` to everything and counting requests.
async fn allowed_http() -> Result<(u16, Arc<AtomicUsize>, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    let app = axum::Router::new().fallback(move || {
        count.fetch_add(1, SeqCst);
        async { "{}" }
    });
    Ok((port, seen, serve_until_stopped(listener, app)))
}

/// The agent's audit records of kind `outbound`.
fn outbound_records(agent: &TestAgent) -> Result<Vec<Value>> {
    let audit = agent.agent.audit().context("audit on")?;
    let records = audit.range(1, audit.head_seq() + 1, 100_000)?;
    Ok(records
        .iter()
        .filter_map(|(_, bytes)| serde_json::from_slice::<Value>(bytes).ok())
        .map(|v| if v.get("body").is_some() { v["body"].clone() } else { v })
        .filter(|v| v["kind"] == "outbound")
        .collect())
}

/// Settings sending every path to `<path>.test` at the given ports, pinned to `addresses`.
fn outbound_toml(
    ports: &[u16; 5],
    addresses: &str,
    secret: &std::path::Path,
    trusted_root: &std::path::Path,
) -> String {
    let [registry, collector, overflow, hooks, broker] = ports;
    format!(
        "{}\n[upstream]\nurl = \"http://collector.test:{collector}\"\nallow_http = true\nflush_interval = \"20ms\"\n\n\
         [overflow]\nurl = \"http://overflow.test:{overflow}\"\nallow_http = true\n\n\
         [models.faraway]\noverflow = \"remote_only\"\n\n\
         [[webhooks]]\nname = \"hooks\"\nurl = \"http://hooks.test:{hooks}\"\nallow_http = true\nsecret_file = {:?}\n\
         retry_initial = \"50ms\"\nretry_max = \"200ms\"\n\n\
         {}\n\
         [privacy]\nresidency_allow = [\"127.0.0.1/32\"]\n\n\
         [privacy.hosts]\n\"registry.test\" = {addresses}\n\"collector.test\" = {addresses}\n\
         \"overflow.test\" = {addresses}\n\"hooks.test\" = {addresses}\n\"broker.test\" = {addresses}\n",
        registry_toml(&format!("http://registry.test:{registry}"), trusted_root, ""),
        secret.display().to_string(),
        mqtt::mqtt_toml(&format!("mqtt://broker.test:{broker}"), ""),
    )
}

/// Sends traffic down every path until `done` holds of the outbound records (bounded).
async fn drive_until(agent: &TestAgent, what: &str, done: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Registry (a poll, itself an administrative event for the webhook), overflow (a
        // model served only there), upstream (the outbox); MQTT connects on its own.
        let _ = agent.agent.poll_registry().await;
        let _ = agent.post("/v2/models/faraway/infer", &mlp_request()?).await;
        agent.agent.wake_outbox();
        let records = outbound_records(agent)?;
        if done(&records) {
            return Ok(records);
        }
        ensure!(Instant::now() < deadline, "{what} within 30 s; outbound records: {records:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mlp_request() -> Result<Value> {
    Ok(golden_for(&root().join("models/mlp"))?.request(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outbound_path_connects_only_to_an_allowed_address_and_records_it() -> Result<()> {
    // Each destination name resolves to 127.0.0.2 first, then 127.0.0.1: a server on each,
    // same port. Only the allowed one may ever see a connection.
    let mut allowed = Vec::new();
    let mut ports = [0u16; 5];
    let mut stops = Vec::new();
    for port in ports.iter_mut().take(4) {
        let (p, seen, stop) = allowed_http().await?;
        *port = p;
        allowed.push(seen);
        stops.push(stop);
    }
    let broker = Broker::start(BrokerOptions::default())?;
    ports[4] = broker.port;
    let mut outside = Vec::new();
    for p in ports {
        outside.push(counting_listener([127, 0, 0, 2], p).await?);
    }
    let reg = outpost_tests::registry::TestRegistry::new()?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("hooks.secret");
    std::fs::write(&secret, SECRET)?;
    let extra = outbound_toml(&ports, "[\"127.0.0.2\", \"127.0.0.1\"]", &secret, &reg.root_json());
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;

    let records = drive_until(&agent, "every path connected", |r| {
        PATHS.iter().all(|p| r.iter().any(|v| v["purpose"] == *p && v["allowed"] == true))
    })
    .await?;
    for p in PATHS {
        let mine: Vec<&Value> = records.iter().filter(|v| v["purpose"] == p).collect();
        // Recorded once (the address did not change), naming the address connected to.
        ensure!(mine.len() == 1, "{p}: {mine:?}");
        ensure!(
            mine[0]["address"] == "127.0.0.1" && mine[0]["host"].as_str().is_some_and(|h| h.ends_with(".test")),
            "{p}: {mine:?}"
        );
    }
    for (i, seen) in allowed.iter().enumerate() {
        ensure!(seen.load(SeqCst) > 0, "the allowed server of {} saw nothing", PATHS[i]);
    }
    for (i, (seen, _)) in outside.iter().enumerate() {
        ensure!(seen.load(SeqCst) == 0, "{}: {} connections reached 127.0.0.2", PATHS[i], seen.load(SeqCst));
    }
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_resolving_off_the_list_is_never_connected_to_and_the_refusal_names_its_path() -> Result<()> {
    let mut ports = [0u16; 5];
    let mut outside = Vec::new();
    for port in &mut ports {
        let l = std::net::TcpListener::bind("127.0.0.2:0")?;
        *port = l.local_addr()?.port();
        drop(l);
        outside.push(counting_listener([127, 0, 0, 2], *port).await?);
    }
    let reg = outpost_tests::registry::TestRegistry::new()?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("hooks.secret");
    std::fs::write(&secret, SECRET)?;
    let extra = outbound_toml(&ports, "[\"127.0.0.2\"]", &secret, &reg.root_json());
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;

    // The registry poll and an overflowed request fail, saying which path and why.
    let err = agent.agent.poll_registry().await.err().context("the poll must fail")?.to_string();
    ensure!(err.contains("registry destination registry.test") && err.contains("residency_allow"), "{err}");
    let (status, answer) = agent.post("/v2/models/faraway/infer", &mlp_request()?).await?;
    let why = answer["error"].as_str().unwrap_or_default();
    ensure!(status == 503 && why.contains("overflow destination overflow.test"), "{status} {answer}");

    let records = drive_until(&agent, "every path refused", |r| {
        PATHS.iter().all(|p| r.iter().any(|v| v["purpose"] == *p && v["allowed"] == false))
    })
    .await?;
    ensure!(records.iter().all(|v| v["allowed"] == false && v["address"] == "127.0.0.2"), "{records:?}");
    let metrics = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    ensure!(
        metrics.lines().any(|l| l.starts_with("outpost_residency_refused_total ") && !l.ends_with(" 0")),
        "no refusal counted"
    );
    let (_, status) = agent.get("/admin/status").await?;
    ensure!(status.to_string().contains("residency_refused"), "no alarm: {status}");
    for (i, (seen, _)) in outside.iter().enumerate() {
        ensure!(seen.load(SeqCst) == 0, "{}: {} connections reached 127.0.0.2", PATHS[i], seen.load(SeqCst));
    }
    agent.stop().await
}

/// A destination written as an address off the list is refused when the configuration is
/// read, for every path, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_address_off_the_list_is_refused_with_the_configuration() -> Result<()> {
    let state = tempfile::tempdir()?;
    let reg = outpost_tests::registry::TestRegistry::new()?;
    std::fs::copy(reg.root_json(), state.path().join("r.json"))?;
    let secret = state.path().join("s");
    std::fs::write(&secret, SECRET)?;
    let cases = [
        ("[registry]\nurl = \"http://127.0.0.2:1\"\ntrusted_root = \"r.json\"\nallow_http = true\n", "registry.url"),
        ("[upstream]\nurl = \"http://127.0.0.2:1\"\nallow_http = true\n", "upstream.url"),
        // The short and numeric forms a URL parser reads as 127.0.0.2.
        ("[upstream]\nurl = \"http://127.2:1\"\nallow_http = true\n", "upstream.url"),
        ("[overflow]\nurl = \"http://2130706434:1\"\nallow_http = true\n", "overflow.url"),
        ("[overflow]\nurl = \"http://127.0.0.2:1\"\nallow_http = true\n", "overflow.url"),
        (
            &format!(
                "[[webhooks]]\nurl = \"http://127.0.0.2:1\"\nallow_http = true\nsecret_file = {:?}\n",
                secret.display().to_string()
            ),
            "webhooks.url",
        ),
        ("[mqtt]\nurl = \"mqtt://127.0.0.2:1\"\n", "mqtt.host"),
    ];
    // With names listed and without: an address-only list lets any name through to the
    // connect-time check, so an address must never pass for a name.
    for (allow, (section, setting)) in ["\"127.0.0.1/32\", \"*.branch.example\"", "\"127.0.0.1/32\""]
        .into_iter()
        .flat_map(|a| cases.iter().map(move |c| (a, c)))
    {
        let text = config_text(
            state.path(),
            &[root().join("models")],
            &format!("{section}\n[privacy]\nresidency_allow = [{allow}]\n"),
        );
        let path = state.path().join("outpost.toml");
        std::fs::write(&path, text)?;
        let out =
            std::process::Command::new(crate::outpost_bin()).args(["check-config", "--config"]).arg(&path).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(setting) && stderr.contains("residency_allow"),
            "{setting}: {stderr}"
        );
    }
    Ok(())
}
