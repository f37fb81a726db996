//! Every V2 endpoint over real HTTP, plus metrics and reload.

use outpost_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metadata_and_readiness() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let (s, body) = agent.get("/v2/health/live").await?;
    assert_eq!((s, body["live"].clone()), (200, json!(true)));
    let (s, body) = agent.get("/v2/health/ready").await?;
    assert_eq!((s, body["ready"].clone()), (200, json!(true)));

    let (s, body) = agent.get("/v2").await?;
    assert_eq!(s, 200);
    assert_eq!(body["name"], "outpost");
    assert!(body["extensions"].as_array().is_some_and(|e| e.contains(&json!("model_repository"))));

    let (s, body) = agent.get("/v2/models/mlp").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["name"], "mlp");
    assert_eq!(body["versions"], json!(["1"]));
    assert_eq!(body["inputs"], json!([{ "name": "X", "datatype": "FP32", "shape": [-1, 30] }]));
    let outputs = body["outputs"].as_array().expect("outputs");
    assert!(outputs.contains(&json!({ "name": "label", "datatype": "INT64", "shape": [-1] })), "{body}");
    assert!(outputs.contains(&json!({ "name": "probabilities", "datatype": "FP32", "shape": [-1, 2] })), "{body}");

    let (s, body) = agent.get("/v2/models/cnn/versions/1").await?;
    assert_eq!(s, 200);
    assert_eq!(body["inputs"], json!([{ "name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8] }]));
    let (s, body) = agent.get("/v2/models/cnn/ready").await?;
    assert_eq!((s, body["ready"].clone()), (200, json!(true)));
    let (s, _) = agent.get("/v2/models/cnn/versions/1/ready").await?;
    assert_eq!(s, 200);

    let (s, body) = agent.get("/v2/models/nope").await?;
    assert_eq!(s, 404);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("unknown model 'nope'")), "{body}");
    let (s, body) = agent.get("/v2/models/cnn/versions/7").await?;
    assert_eq!(s, 404, "{body}");
    let (s, _) = agent.get("/v2/models/cnn/versions/7/ready").await?;
    assert_eq!(s, 404);
    let (s, body) = agent.get("/v2/nothing/here").await?;
    assert_eq!(s, 404);
    assert!(body["error"].is_string());
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_infer_output_selection_and_id_echo() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut req = golden.request(2);
    req["outputs"] = json!([{ "name": "probabilities" }]);
    req["id"] = json!("abc-123");
    let (s, body) = agent.post("/v2/models/mlp/versions/1/infer", &req).await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["id"], "abc-123");
    assert_eq!(body["model_version"], "1");
    assert_eq!(body["parameters"]["route"], "local");
    let outs = body["outputs"].as_array().expect("outputs");
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0]["name"], "probabilities");
    assert_eq!(outs[0]["shape"], json!([8, 2]));
    golden.check_outputs(2, &body, &["probabilities"])?;
    let (s, body) = agent.post("/v2/models/mlp/versions/2/infer", &req).await?;
    assert_eq!(s, 404, "{body}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_index_and_metrics() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let (s, index) = agent.post("/v2/repository/index", &json!({})).await?;
    assert_eq!(s, 200);
    let names: Vec<&str> = index.as_array().expect("list").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, demo_names());
    assert!(index.as_array().expect("list").iter().all(|m| m["state"] == "READY" && m["version"] == "1"));

    let golden = golden_for(&root().join("models/cnn"))?;
    for _ in 0..3 {
        let (s, _) = agent.post("/v2/models/cnn/infer", &golden.request(0)).await?;
        assert_eq!(s, 200);
    }
    let (s, _) = agent.post("/v2/models/cnn/infer", &json!({"inputs": []})).await?;
    assert_eq!(s, 400);
    let text = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    // Request metrics carry the version that served (a canary is compared with its default).
    assert!(text.contains("outpost_inference_requests_total{model=\"cnn\",version=\"1\",outcome=\"ok\"} 3"), "{text}");
    let sum = |prefix: &str| -> u64 {
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    };
    assert_eq!(sum("outpost_inference_failures_total{model=\"cnn\""), 1, "{text}");
    assert_eq!(sum("outpost_inference_duration_seconds_count{model=\"cnn\""), 4, "{text}");
    assert!(text.contains("outpost_queue_depth{model=\"cnn\"} 0"), "{text}");
    assert!(text.contains("outpost_model_ready{model=\"mlp\",version=\"1\"} 1"), "{text}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_models_and_keeps_serving() -> anyhow::Result<()> {
    let models = tempfile::tempdir()?;
    let copy = |name: &str| -> anyhow::Result<()> {
        let dst = models.path().join(name);
        std::fs::create_dir_all(&dst)?;
        for f in ["model.onnx", "golden.json"] {
            std::fs::copy(root().join("models").join(name).join(f), dst.join(f))?;
        }
        Ok(())
    };
    copy("mlp")?;
    let agent = TestAgent::start(&[models.path().to_path_buf()], "").await?;
    assert_eq!(agent.get("/v2/models/cnn/ready").await?.0, 404);
    copy("cnn")?;
    std::fs::remove_dir_all(models.path().join("mlp"))?;
    let cfg = agent.agent.config();
    agent.agent.reload((*cfg).clone()).await;
    assert_eq!(agent.get("/v2/models/cnn/ready").await?.0, 200);
    assert_eq!(agent.get("/v2/models/mlp/ready").await?.0, 404);
    let golden = golden_for(&root().join("models/cnn"))?;
    let (s, body) = agent.post("/v2/models/cnn/infer", &golden.request(1)).await?;
    assert_eq!(s, 200, "{body}");
    golden.check(1, &body)?;
    agent.stop().await
}

/// The binary tensor extension: the same request as binary gives bit-identical outputs to the
/// JSON one; malformed binary requests are 400 with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_json_requests_give_identical_outputs() -> anyhow::Result<()> {
    use outpost::protocol::json::{parse_binary_request, request_from_value};
    let agent = TestAgent::demo().await?;
    let golden = golden_for(&root().join("models").join("cnn"))?;
    let json_req = golden.request(0);
    let (s, json_answer) = agent.post("/v2/models/cnn/infer", &json_req).await?;
    assert_eq!(s, 200, "{json_answer}");

    let parsed = request_from_value(json_req.clone())?;
    let x = &parsed.inputs[0];
    let raw = x.data.to_le_bytes();
    let header = serde_json::json!({
        "inputs": [{ "name": x.name, "shape": x.shape, "datatype": x.datatype().as_str(),
                     "parameters": { "binary_data_size": raw.len() } }],
        "parameters": { "binary_data_output": true },
    });
    let mut body = serde_json::to_vec(&header)?;
    let header_len = body.len();
    body.extend_from_slice(&raw);
    let resp = agent
        .http
        .post(agent.url("/v2/models/cnn/infer"))
        .header("Inference-Header-Content-Length", header_len.to_string())
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let out_len: usize = resp.headers()["inference-header-content-length"].to_str()?.parse()?;
    let bytes = resp.bytes().await?;
    let head: serde_json::Value = serde_json::from_slice(&bytes[..out_len])?;
    // Decode the binary outputs with the request parser (same layout) and compare exactly.
    let as_inputs = serde_json::json!({ "inputs": head["outputs"] });
    let mut decoded_body = serde_json::to_vec(&as_inputs)?;
    let decoded_len = decoded_body.len();
    decoded_body.extend_from_slice(&bytes[out_len..]);
    let decoded = parse_binary_request(&decoded_body, decoded_len)?;
    let from_json = outpost::protocol::json::tensors_from_value(json_answer["outputs"].clone())?;
    assert_eq!(decoded.inputs, from_json, "binary and JSON answers differ");
    golden.check(0, &serde_json::json!({ "outputs": outpost::protocol::json::tensors_to_value(&decoded.inputs) }))?;

    for (what, header_value, body, needle) in [
        ("header past the body", (body.len() + 1).to_string(), body.clone(), "larger than the body"),
        ("bytes left over", header_len.to_string(), [body.clone(), vec![0]].concat(), "belong to no input"),
        ("bytes missing", header_len.to_string(), body[..body.len() - 4].to_vec(), "runs past"),
        ("not a number", "ten".to_owned(), body.clone(), "byte count"),
    ] {
        let r = agent
            .http
            .post(agent.url("/v2/models/cnn/infer"))
            .header("Inference-Header-Content-Length", header_value)
            .body(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text}");
    }
    agent.stop().await
}

/// The response cache (opt-in per model): a repeated request gets byte-identical answers and
/// counts as a hit; a new version starts with an empty cache, so no answer crosses versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_returns_identical_bytes_and_never_crosses_versions() -> anyhow::Result<()> {
    use outpost_tests::registry::{StaticServer, TestRegistry};
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let models = "[models.mlp]\ncache_bytes = 1048576\n";
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), models)).await?;
    let golden = golden_for(&root().join("models").join("mlp"))?;
    let body = serde_json::to_vec(&golden.request(0))?;
    let raw = |b: Vec<u8>| {
        let (http, url) = (agent.http.clone(), agent.url("/v2/models/mlp/infer"));
        async move { anyhow::Ok(http.post(url).body(b).send().await?.bytes().await?) }
    };
    let first = raw(body.clone()).await?;
    let second = raw(body.clone()).await?;
    assert_eq!(first, second, "a hit answers the same bytes");
    golden.check(0, &serde_json::from_slice(&second)?)?;
    let other = raw(serde_json::to_vec(&golden.request(1))?).await?;
    golden.check(1, &serde_json::from_slice(&other)?)?;
    let metrics = agent.agent.service().render_metrics();
    assert!(metrics.contains("outpost_cache_requests_total{model=\"mlp\",result=\"hit\"} 1"), "{metrics}");
    assert!(metrics.contains("outpost_cache_requests_total{model=\"mlp\",result=\"miss\"} 2"), "{metrics}");

    // Version 2.0.0 (other weights): the same request is a miss and answers from 2.0.0.
    reg.publish("mlp-int8-qdq", "mlp", "2.0.0")?;
    agent.agent.poll_registry().await?;
    let after: serde_json::Value = serde_json::from_slice(&raw(body).await?)?;
    assert_eq!(after["model_version"], "2.0.0", "{after}");
    let metrics = agent.agent.service().render_metrics();
    assert!(metrics.contains("outpost_cache_requests_total{model=\"mlp\",result=\"hit\"} 1"), "{metrics}");
    assert!(metrics.contains("outpost_cache_requests_total{model=\"mlp\",result=\"miss\"} 3"), "{metrics}");
    agent.stop().await
}

/// An agent with an upstream, one request answered, and its `/metrics` text once a send round
/// upstream has succeeded (so the outbox's gauges and times are there).
async fn metrics_once_sent_upstream() -> anyhow::Result<(TestAgent, outpost_tests::upstream::Receiver, String)> {
    let up = outpost_tests::upstream::Receiver::start().await?;
    let extra = format!("[upstream]\nurl = \"{}\"\nallow_http = true\nflush_interval = \"50ms\"\n", up.url());
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(0)).await?.0, 200);
    let mut text = String::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(text.contains("outpost_audit_backlog_records") && text.contains("outpost_upstream_last_success")) {
        anyhow::ensure!(std::time::Instant::now() < end, "no send round upstream:\n{text}");
        agent.agent.wake_outbox();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        text = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    }
    Ok((agent, up, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_pass_promtool_check_metrics() -> anyhow::Result<()> {
    let promtool = std::path::Path::new("/usr/bin/promtool");
    if !promtool.is_file() {
        assert!(!full_suite(), "OUTPOST_TEST_FULL=1 needs promtool (scripts/setup-test.sh installs prometheus)");
        return Ok(());
    }
    // With an upstream, so the outbox's gauges are there too.
    let (agent, _up, text) = metrics_once_sent_upstream().await?;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?, text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool:\n{report}");
    // A scraper that asks for OpenMetrics (Prometheus does) gets it from the same families.
    let om = agent
        .http
        .get(agent.url("/metrics"))
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await?;
    let kind = om.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(kind.starts_with("application/openmetrics-text; version=1.0.0"), "{kind}");
    let om = om.text().await?;
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE outpost_inference_requests counter\n"), "{om}");
    assert!(om.contains("outpost_inference_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\"} 1\n"), "{om}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_headless_chromium_under_the_boxs_auth() -> anyhow::Result<()> {
    let browser = std::path::Path::new("/usr/bin/chromium");
    if !browser.is_file() {
        assert!(!full_suite(), "OUTPOST_TEST_FULL=1 needs chromium (scripts/setup-test.sh installs it)");
        return Ok(());
    }
    let token = "observe-token-for-the-status-page";
    let digest = outpost_proto::registry::hex::encode(&outpost_proto::registry::sha256(token.as_bytes()));
    let extra = format!("[auth]\ntokens = [{{ name = \"ops\", sha256 = \"{digest}\", roles = [\"observe\"] }}]\n");
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;
    let dom = |url: String, extra_args: Vec<String>| -> anyhow::Result<String> {
        let profile = tempfile::tempdir()?;
        let out = std::process::Command::new(browser)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
            .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Lets the page's script fetch and render before the DOM is printed.
            .arg("--virtual-time-budget=5000")
            .args(extra_args)
            .arg(url)
            .output()?;
        anyhow::ensure!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    // The page itself is public and holds no data; without a token it asks for one.
    let r = agent.http.get(agent.url("/")).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let csp = r.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(csp.contains("script-src 'sha256-") && csp.contains("default-src 'none'"), "{csp}");
    assert_eq!(agent.get("/admin/status").await?.0, 401);
    let locked = dom(agent.url("/"), vec!["--dump-dom".into()])?;
    assert!(locked.contains("sign in") && !locked.contains("as-published"), "{locked}");
    // The token typed once (here in the fragment, which never reaches the server).
    let page = format!("{}/#token={token}", agent.base);
    let html = dom(page.clone(), vec!["--dump-dom".into()])?;
    assert!(html.contains("test-node (test-site)"), "{html}");
    assert!(html.contains("ready"), "{html}");
    for m in DEMO_MODELS {
        assert!(html.contains(&format!("<td>{m}</td>")), "{m} missing: {html}");
    }
    assert!(html.contains("READY") && html.contains("<svg") && html.contains("alarms: none"), "{html}");
    // A phone-sized screenshot renders (the README's: OUTPOST_STATUS_SCREENSHOT=path).
    let shot = tempfile::tempdir()?;
    let png = std::env::var("OUTPOST_STATUS_SCREENSHOT")
        .unwrap_or_else(|_| shot.path().join("status.png").display().to_string());
    dom(page, vec![format!("--screenshot={png}"), "--window-size=420,760".into()])?;
    assert!(std::fs::read(&png)?.starts_with(b"\x89PNG"));
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_build_info_process_figures_and_last_success_times() -> anyhow::Result<()> {
    let (agent, _up, text) = metrics_once_sent_upstream().await?;
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let last = value(&text, "outpost_upstream_last_success_timestamp_seconds").unwrap_or(0.0);
    assert!((now - last).abs() < 60.0, "{last} vs {now}");
    assert!(text.contains(&format!("outpost_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{text}");
    // This test process is the agent's process: its RSS is at least the models' size.
    assert!(value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 10e6), "{text}");
    assert!(value(&text, "process_open_fds").is_some_and(|v| v >= 3.0), "{text}");
    assert!(value(&text, "process_cpu_seconds_total").is_some_and(|v| v > 0.0), "{text}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_what_it_can_and_names_what_needs_a_restart_without_storing_it() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let running = agent.agent.config();
    let path = agent.config_path();
    // A new listen address and a new [upstream] section (restart only), and a model disabled
    // (live).
    let text = std::fs::read_to_string(&path)?.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        + "\n[upstream]\nurl = \"http://127.0.0.1:1\"\nallow_http = true\n\n[models.cnn]\nenabled = false\n";
    std::fs::write(&path, text)?;
    let report = agent.agent.reload(outpost::config::Config::load(&path)?).await;
    assert_eq!(report.needs_restart, ["http.listen", "[upstream]"], "{report:?}");
    assert_eq!(report.applied, ["models.cnn"], "{report:?}");
    let now = agent.agent.config();
    assert_eq!(now.http.listen, running.http.listen, "a refused value is not stored");
    assert!(now.upstream.is_none(), "a refused section is not stored");
    assert_eq!(agent.get("/v2/models/cnn/ready").await?.0, 404, "the live part is applied");
    let (_, status) = agent.get("/admin/status").await?;
    let alarm = status["alarms"]["restart_needed"].as_str().unwrap_or_default().to_owned();
    assert!(alarm.contains("http.listen") && alarm.contains("[upstream]"), "{status}");
    // Back to what runs: the alarm clears.
    std::fs::write(&path, config_text(agent.state.path(), &[root().join("models")], ""))?;
    agent.agent.reload(outpost::config::Config::load(&path)?).await;
    let (_, status) = agent.get("/admin/status").await?;
    assert!(status["alarms"].get("restart_needed").is_none(), "{status}");
    assert_eq!(agent.get("/v2/models/cnn/ready").await?.0, 200);
    agent.stop().await
}
