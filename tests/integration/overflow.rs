//! Overflow to the data-centre tier over real HTTP on loopback. The target is a second Outpost
//! serving other versions of the models (9.0.0), so every answer shows where it came from; a
//! faulty proxy in front of it (harness `faulty`) injects errors, hangs, slow answers and broken
//! connections, and logs what reached it.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_tests::faulty::{Faulty, Mode};
use outpost_tests::registry::{StaticServer, TestRegistry};
use outpost_tests::*;
use serde_json::{json, Value};

/// The data-centre side: an Outpost serving mlp@9.0.0 and cnn@9.0.0.
pub(crate) struct Target {
    _reg: TestRegistry,
    _server: StaticServer,
    pub(crate) agent: TestAgent,
}

pub(crate) async fn target() -> Result<Target> {
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "9.0.0")?;
    reg.publish("cnn", "cnn", "9.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), "")).await?;
    Ok(Target { _reg: reg, _server: server, agent })
}

/// The branch box: mlp@1.0.0 may leave the site, cnn@1.0.0 may not (signed manifests).
pub(crate) async fn edge(
    overflow_url: &str,
    overflow_extra: &str,
    models: &str,
) -> Result<(TestRegistry, StaticServer, TestAgent)> {
    let reg = TestRegistry::new()?;
    reg.publish_residency("mlp", "mlp", "1.0.0", true)?;
    reg.publish_residency("cnn", "cnn", "1.0.0", false)?;
    let server = StaticServer::start(reg.path()).await?;
    let extra = format!(
        "{}\n[overflow]\nurl = {overflow_url:?}\nallow_http = true\n{overflow_extra}\n\n[privacy]\npseudonymize = [\"customer\"]\n\n{models}\n",
        registry_toml(&server.url(), &reg.root_json(), "")
    );
    let agent = TestAgent::start(&[], &extra).await?;
    Ok((reg, server, agent))
}

fn request(model: &str, case: usize) -> Result<Value> {
    Ok(golden_for(&root().join("models").join(model))?.request(case))
}

async fn infer(agent: &TestAgent, model: &str, body: &Value) -> Result<Value> {
    let (s, answer) = agent.post(&format!("/v2/models/{model}/infer"), body).await?;
    ensure!(s == 200, "{model}: {s} {answer}");
    Ok(answer)
}

fn route(answer: &Value) -> (&str, &str) {
    (answer["model_version"].as_str().unwrap_or(""), answer["parameters"]["route"].as_str().unwrap_or(""))
}

/// Waits (bounded) until the agent's status shows the breaker in `state`.
async fn breaker_becomes(agent: &TestAgent, state: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = agent.get("/admin/status").await?;
        if status["overflow"]["breaker"] == state {
            return Ok(());
        }
        ensure!(Instant::now() < end, "breaker never became {state}: {status}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_when_the_box_would_miss_its_objective_and_never_for_models_that_must_stay() -> Result<()> {
    let t = target().await?;
    let proxy = Faulty::start(&t.agent.base).await?;
    // An objective of 1 µs: every request is older than that by the time it is routed.
    let (_r, _s, agent) = edge(&proxy.url(), "slo_p99 = \"1us\"", "").await?;

    let mut body = request("mlp", 0)?;
    body["parameters"] = json!({ "customer": "alice@example.com", "store": 12 });
    for i in 0..5 {
        body["id"] = json!(format!("slo-{i}"));
        let answer = infer(&agent, "mlp", &body).await?;
        ensure!(route(&answer) == ("9.0.0", "overflow"), "{answer}");
        ensure!(answer["parameters"]["overflow_reason"] == "slo", "{answer}");
        ensure!(answer["model_name"] == "mlp" && answer["id"] == format!("slo-{i}"), "{answer}");
        golden_for(&root().join("models").join("mlp"))?.check(0, &answer)?;
    }
    let seen = proxy.requests();
    ensure!(seen.len() == 5, "{seen:?}");
    for r in &seen {
        ensure!(r["path"] == "/v2/models/mlp/infer", "{r}");
        // Pseudonymized parameters stay pseudonymized on the way out.
        let customer = r["parameters"]["customer"].as_str().unwrap_or("");
        ensure!(customer.starts_with("hmac:") && !customer.contains("alice"), "{r}");
    }

    // A model whose manifest says it may not leave: never upstream, even under load.
    let cnn = request("cnn", 0)?;
    let mut calls = Vec::new();
    for _ in 0..24 {
        let (agent_ref, cnn) = (&agent, cnn.clone());
        calls.push(async move { agent_ref.post("/v2/models/cnn/infer", &cnn).await });
    }
    for r in futures::future::join_all(calls).await {
        let (s, answer) = r?;
        ensure!(s == 200 || s == 503, "{s} {answer}");
        if s == 200 {
            ensure!(route(&answer) == ("1.0.0", "local"), "{answer}");
        }
    }
    // An input marked sensitive keeps an otherwise leave-able request on the box.
    let mut sensitive = request("mlp", 1)?;
    sensitive["inputs"][0]["parameters"] = json!({ "sensitive": true });
    let answer = infer(&agent, "mlp", &sensitive).await?;
    ensure!(route(&answer) == ("1.0.0", "local"), "{answer}");
    let seen = proxy.requests();
    ensure!(seen.len() == 5 && seen.iter().all(|r| r["path"] == "/v2/models/mlp/infer"), "{seen:?}");

    let metrics = agent.agent.service().render_metrics();
    ensure!(
        metrics.contains("outpost_overflow_requests_total{model=\"mlp\",reason=\"slo\",result=\"ok\"} 5"),
        "{metrics}"
    );
    let state = agent.stop_keep_state().await?;
    let recs = crate::audit::records(state.path())?;
    let overflowed =
        recs.values().filter(|r| r["body"]["kind"] == "inference" && r["body"]["route"] == "overflow").count();
    ensure!(overflowed == 5, "the audit log records the route of each request");
    t.agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_breaker_transition_with_errors_hangs_resets_and_slow_answers() -> Result<()> {
    let t = target().await?;
    let proxy = Faulty::start(&t.agent.base).await?;
    let (_r, _s, agent) = edge(
        &proxy.url(),
        "slo_p99 = \"1us\"\ntimeout = \"400ms\"\nfailure_threshold = 3\nfailure_window = \"60s\"\nopen_for = \"300ms\"",
        "",
    )
    .await?;
    let body = request("mlp", 0)?;
    infer(&agent, "mlp", &body).await?; // the box learns its run time

    // Closed → open: three failures, each answered locally with the reason.
    proxy.set(Mode::Error);
    for _ in 0..3 {
        let answer = infer(&agent, "mlp", &body).await?;
        ensure!(route(&answer) == ("1.0.0", "local"), "{answer}");
        ensure!(answer["parameters"]["overflow_fallback"].as_str().is_some_and(|f| f.contains("500")), "{answer}");
    }
    let (_, status) = agent.get("/admin/status").await?;
    ensure!(status["overflow"]["breaker"] == "open", "{status}");
    // Open: served here without trying the target.
    let before = proxy.requests().len();
    let answer = infer(&agent, "mlp", &body).await?;
    ensure!(route(&answer) == ("1.0.0", "local") && proxy.requests().len() == before, "{answer}");

    // Half-open → open: the probe hangs past the overflow timeout, the request is answered here.
    breaker_becomes(&agent, "half_open").await?;
    proxy.set(Mode::Hang);
    let t0 = Instant::now();
    let answer = infer(&agent, "mlp", &body).await?;
    ensure!(route(&answer) == ("1.0.0", "local"), "{answer}");
    ensure!(t0.elapsed() < Duration::from_secs(5), "the hang cost {:?}", t0.elapsed());
    breaker_becomes(&agent, "open").await?;

    // Half-open → open: the probe's connection breaks mid-answer.
    breaker_becomes(&agent, "half_open").await?;
    proxy.set(Mode::Reset);
    let answer = infer(&agent, "mlp", &body).await?;
    ensure!(route(&answer) == ("1.0.0", "local"), "{answer}");
    breaker_becomes(&agent, "open").await?;

    // Half-open → closed: a slow but successful probe.
    breaker_becomes(&agent, "half_open").await?;
    proxy.set(Mode::Slow(Duration::from_millis(50)));
    let answer = infer(&agent, "mlp", &body).await?;
    ensure!(route(&answer) == ("9.0.0", "overflow"), "{answer}");
    let (_, status) = agent.get("/admin/status").await?;
    ensure!(status["overflow"]["breaker"] == "closed" && status["overflow"]["opened"] == 3, "{status}");
    let metrics = agent.agent.service().render_metrics();
    ensure!(metrics.contains("outpost_overflow_breaker_state 0"), "{metrics}");
    ensure!(metrics.contains("outpost_overflow_breaker_opened_total 3"), "{metrics}");
    agent.stop().await?;
    t.agent.stop().await
}

fn flatten(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.as_f64().unwrap_or(0.0)),
    }
}

/// The top probability the MLP gives `body`, asked of `agent`.
async fn top_probability(agent: &TestAgent, body: &Value) -> Result<f64> {
    let answer = infer(agent, "mlp", body).await?;
    let p = answer["outputs"].as_array().context("outputs")?.iter().find(|o| o["name"] == "probabilities");
    Ok(p.context("probabilities")?["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(Value::as_f64)
        .fold(0.0, f64::max))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_confidence_answers_are_escalated_to_the_target() -> Result<()> {
    let t = target().await?;
    // Inputs on the line between two golden cases of different classes: the one the model is
    // least sure about (asked of the target, which has the same weights) is the unsure case.
    let golden = golden_for(&root().join("models").join("mlp"))?;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for i in 0..golden.raw["cases"].as_array().map_or(0, Vec::len) {
        let mut flat = Vec::new();
        flatten(&golden.request(i)["inputs"][0]["data"], &mut flat);
        rows.extend(flat.chunks(30).map(<[f64]>::to_vec));
    }
    rows.truncate(8);
    let one = |x: &[f64]| json!({ "inputs": [{ "name": "X", "shape": [1, 30], "datatype": "FP32", "data": x }] });
    let (mut unsure, mut low) = (Value::Null, 1.0);
    let (mut sure, mut high) = (Value::Null, 0.0);
    for a in &rows {
        for b in &rows {
            for step in 0..=10 {
                let w = f64::from(step) / 10.0;
                let mix: Vec<f64> = a.iter().zip(b).map(|(p, q)| p * (1.0 - w) + q * w).collect();
                let body = one(&mix);
                let top = top_probability(&t.agent, &body).await?;
                if top < low {
                    (unsure, low) = (body.clone(), top);
                }
                if top > high {
                    (sure, high) = (body, top);
                }
            }
        }
    }
    ensure!(high - low > 0.02, "no input the model is unsure about: {low}..{high}");
    let threshold = (low + high) / 2.0;

    let proxy = Faulty::start(&t.agent.base).await?;
    let models = format!("[models.mlp]\nconfidence_output = \"probabilities\"\nconfidence_min = {threshold}\n");
    let (_r, _s, agent) = edge(&proxy.url(), "slo_p99 = \"10s\"", &models).await?;

    sure["id"] = json!("sure");
    let answer = infer(&agent, "mlp", &sure).await?;
    ensure!(route(&answer) == ("1.0.0", "local"), "confident ({high}): {answer}");
    unsure["id"] = json!("unsure");
    let answer = infer(&agent, "mlp", &unsure).await?;
    ensure!(route(&answer) == ("9.0.0", "overflow"), "unsure ({low} < {threshold}): {answer}");
    ensure!(answer["parameters"]["overflow_reason"] == "low_confidence", "{answer}");
    let seen = proxy.requests();
    ensure!(seen.len() == 1 && seen[0]["id"] == "unsure", "only the unsure case went upstream: {seen:?}");

    // The target failing: the local answer stands.
    proxy.set(Mode::Error);
    let answer = infer(&agent, "mlp", &unsure).await?;
    ensure!(route(&answer) == ("1.0.0", "local") && answer["parameters"]["overflow_fallback"].is_string(), "{answer}");
    agent.stop().await?;
    t.agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_mid_request_loses_no_request() -> Result<()> {
    let t = target().await?;
    let mut proxy = Faulty::start(&t.agent.base).await?;
    let (_r, _s, agent) = edge(&proxy.url(), "slo_p99 = \"1us\"\ntimeout = \"20s\"", "").await?;
    let body = request("mlp", 0)?;
    infer(&agent, "mlp", &body).await?;
    proxy.set(Mode::Hang);
    let n = 12;
    let mut calls = Vec::new();
    for i in 0..n {
        let mut b = body.clone();
        b["id"] = json!(format!("k-{i}"));
        let agent = &agent;
        calls.push(async move { agent.post("/v2/models/mlp/infer", &b).await });
    }
    let all = futures::future::join_all(calls);
    let killer = async {
        // Every request is waiting on the target; then it dies.
        proxy.wait_for_requests(n, Duration::from_secs(20)).await?;
        proxy.kill();
        Ok::<(), anyhow::Error>(())
    };
    let (answers, killed) = tokio::join!(all, killer);
    killed?;
    for (i, r) in answers.into_iter().enumerate() {
        let (s, answer) = r?;
        ensure!(s == 200, "request {i}: {s} {answer}");
        ensure!(route(&answer) == ("1.0.0", "local"), "answered here after the target died: {answer}");
        ensure!(answer["id"] == format!("k-{i}"), "{answer}");
    }
    agent.stop().await?;
    t.agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_sends_a_model_that_must_stay_to_the_target_and_config_cannot_loosen_it() -> Result<()> {
    let t = target().await?;
    let proxy = Faulty::start(&t.agent.base).await?;
    // Configured before the box has the CNN: remote-only, a 1 µs objective and a confidence
    // threshold no answer meets. Then the registry installs cnn@1.0.0, signed may_leave_site
    // = false: every route must keep it here.
    let models =
        "[models.cnn]\noverflow = \"remote_only\"\nconfidence_output = \"probabilities\"\nconfidence_min = 1.0\n";
    let (_r, _s, agent) = edge(&proxy.url(), "slo_p99 = \"1us\"", models).await?;
    let cnn = request("cnn", 0)?;
    let calls = (0..24).map(|_| agent.post("/v2/models/cnn/infer", &cnn));
    for r in futures::future::join_all(calls).await {
        let (s, answer) = r?;
        ensure!(s == 200 || s == 503, "{s} {answer}");
        if s == 200 {
            ensure!(route(&answer) == ("1.0.0", "local"), "{answer}");
        }
    }
    ensure!(proxy.requests().is_empty(), "the target saw {:?}", proxy.requests());
    // The configuration that asks to send it away is refused, naming the model and the key.
    let config = agent.config_path();
    let _state = agent.stop_keep_state().await?;
    let out =
        std::process::Command::new(crate::outpost_bin()).args(["check-config", "--config"]).arg(&config).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(78), "{:?} {err}", out.status.code());
    ensure!(err.contains("models.cnn.overflow") && err.contains("may_leave_site = false"), "{err}");
    t.agent.stop().await
}
