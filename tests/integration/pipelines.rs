//! Pipelines: models chained as a DAG (fan-out, fan-in) and a cascade, served under their own
//! names over HTTP, gRPC and MQTT, audited as one request with their steps. The reference
//! answers are ONNX Runtime's, chained by `scripts/gen-packages.py` (models/pipelines-probes.json).

use base64::Engine as _;
use outpost_proto::protocol::grpc as pb;
use outpost_tests::broker::{Broker, BrokerOptions};
use outpost_tests::mqtt::{mqtt_toml, Requester};
use outpost_tests::registry::{StaticServer, TestRegistry};
use outpost_tests::*;
use serde_json::{json, Value};

fn probes() -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(root().join("models/pipelines-probes.json"))?)?)
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"].as_array().and_then(|o| o.iter().find(|t| t["name"] == name)).unwrap_or(&Value::Null)
}

fn assert_close(have: &Value, want: &Value, atol: f64) {
    let h: Vec<f64> = serde_json::from_value(have["data"].clone()).unwrap_or_default();
    let w: Vec<f64> = serde_json::from_value(want.clone()).unwrap_or_default();
    assert_eq!(h.len(), w.len(), "{have} vs {want}");
    for (a, b) in h.iter().zip(&w) {
        assert!((a - b).abs() <= atol, "{a} vs {b}: {have} vs {want}");
    }
}

/// The request records of the audit log (their bodies).
fn requests(agent: &TestAgent) -> anyhow::Result<Vec<Value>> {
    let recs = agent.agent.audit().ok_or_else(|| anyhow::anyhow!("audit off"))?.range(1, u64::MAX, usize::MAX)?;
    Ok(recs
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Value>(v).ok())
        .map(|r| r["body"].clone())
        .filter(|b| b.get("request_id").is_some())
        .collect())
}

/// The audit record of the request `id`: exactly one.
fn record_of(agent: &TestAgent, id: &str) -> anyhow::Result<Value> {
    let found: Vec<Value> = requests(agent)?.into_iter().filter(|r| r["request_id"] == id).collect();
    anyhow::ensure!(found.len() == 1, "one record for {id}, found {}: {found:?}", found.len());
    Ok(found[0].clone())
}

async fn post_png(agent: &TestAgent, path: &str, png: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    let r = agent.http.post(agent.url(path)).header("content-type", "image/png").body(png).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_with_fan_out_and_fan_in_answers_as_onnx_runtime_chained_over_http_grpc_and_mqtt(
) -> anyhow::Result<()> {
    let broker = Broker::start(BrokerOptions::default())?;
    let extra = format!("{}\n[grpc]\nlisten = \"127.0.0.1:0\"\n", mqtt_toml(&broker.url(), ""));
    let agent = TestAgent::start(&[root().join("models")], &extra).await?;
    let (s, meta) = agent.get("/v2/models/digit-report").await?;
    assert_eq!(s, 200, "{meta}");
    assert_eq!(meta["platform"], "pipeline");
    assert_eq!(meta["parameters"]["steps"].as_array().map(Vec::len), Some(4), "{meta}");
    // Inputs and outputs as the models that take and give them declare them.
    assert_eq!(meta["inputs"], json!([{ "name": "image", "datatype": "BYTES", "shape": [-1] }]), "{meta}");
    let outputs = meta["outputs"].as_array().cloned().unwrap_or_default();
    assert!(outputs.contains(&json!({ "name": "parity", "datatype": "FP32", "shape": [-1, 2] })), "{meta}");
    let (s, ready) = agent.get("/v2/models/digit-report/ready").await?;
    assert_eq!(s, 200, "{ready}");
    let status = std::process::Command::new(crate::outpost_bin()).args(["status", "--url", &agent.base]).output()?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("pipeline digit-report v1: 4 steps over digit-parity, digits-png, prob-mean"), "{status}");
    // Triton's model configuration, as tritonclient asks for it.
    let (s, config) = agent.get("/v2/models/digit-report/config").await?;
    assert_eq!(s, 200, "{config}");
    assert_eq!(
        (config["platform"].as_str(), config["input"][0]["data_type"].as_str()),
        (Some("pipeline"), Some("TYPE_STRING")),
        "{config}"
    );

    let probes = probes()?;
    for (i, p) in probes["digit-report"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let png = base64::engine::general_purpose::STANDARD.decode(p["png"].as_str().unwrap_or_default())?;
        let (s, body) = post_png(&agent, "/v2/models/digit-report/infer", png.clone()).await?;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["model_name"], "digit-report");
        assert_eq!(output(&body, "digit")["data"], json!([p["digit"]]), "{body}");
        assert_close(output(&body, "probabilities"), &p["probabilities"], 1e-5);
        assert_close(output(&body, "parity"), &p["parity"], 1e-5);
        // One audit record for the whole pipeline (none of its own for a step), naming every
        // step and the model each ran.
        let all = requests(&agent)?;
        assert_eq!(all.len(), i + 1, "{all:?}");
        let rec = all[i].clone();
        assert_eq!(rec["model"], "digit-report", "{rec}");
        let steps = rec["parameters"]["pipeline_steps"].as_array().cloned().unwrap_or_default();
        let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
        assert_eq!(names.len(), 4, "{rec}");
        for (step, model) in
            [("read", "digits-png"), ("reread", "digits-png"), ("agree", "prob-mean"), ("parity", "digit-parity")]
        {
            assert!(steps.iter().any(|s| s["step"] == step && s["model"] == model && s["outcome"] == "ok"), "{rec}");
        }
    }
    let p0 = &probes["digit-report"][0];
    let png = base64::engine::general_purpose::STANDARD.decode(p0["png"].as_str().unwrap_or_default())?;

    // MQTT v5, the image as the payload.
    let req = Requester::connect(broker.port, "camera-2", None, None).await?;
    let reply = req.request_typed("outpost/test-site/infer/digit-report", "r-1", png.clone(), "image/png").await?;
    assert_eq!(output(&reply, "digit")["data"], json!([p0["digit"]]), "{reply}");

    // gRPC, the image as a BYTES tensor (length-prefixed raw contents, as tritonclient sends).
    use prost::Message as _;
    let addr = agent.agent.grpc_addr().ok_or_else(|| anyhow::anyhow!("no gRPC listener"))?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut raw = (png.len() as u32).to_le_bytes().to_vec();
    raw.extend(&png);
    let request = pb::ModelInferRequest {
        model_name: "digit-report".into(),
        inputs: vec![pb::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    };
    let meta = crate::grpc::raw_call(
        &channel,
        "/inference.GRPCInferenceService/ModelMetadata",
        pb::ModelRef { name: "digit-report".into(), version: String::new() }.encode_to_vec(),
    )
    .await?;
    let meta = pb::ModelMetadataResponse::decode(meta.as_slice())?;
    assert_eq!((meta.platform.as_str(), meta.inputs.len(), meta.outputs.len()), ("pipeline", 1, 3), "{meta:?}");
    let answer = crate::grpc::raw_call(&channel, crate::grpc::INFER, request.encode_to_vec()).await?;
    let answer = pb::ModelInferResponse::decode(answer.as_slice())?;
    let i = answer.outputs.iter().position(|o| o.name == "digit").ok_or_else(|| anyhow::anyhow!("no digit"))?;
    let digit = p0["digit"].as_str().unwrap_or_default().as_bytes();
    let mut want = (digit.len() as u32).to_le_bytes().to_vec();
    want.extend(digit);
    assert_eq!(answer.raw_output_contents[i], want);

    // A step that fails names the step; a wrong input names the input.
    let (s, body) = post_png(&agent, "/v2/models/digit-report/infer", b"not an image".to_vec()).await?;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|m| m.starts_with("step 'read'") || m.starts_with("step 'reread'")),
        "{body}"
    );
    let (s, body) = agent
        .post(
            "/v2/models/digit-report/infer",
            &json!({ "inputs": [{ "name": "photo", "datatype": "BYTES", "shape": [1], "data": ["x"] }] }),
        )
        .await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("no input 'photo'")), "{body}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_answers_from_the_small_model_when_it_is_sure_else_from_the_large_one() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let probes = probes()?;
    for (i, p) in probes["cancer-triage"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let id = format!("triage-{i}");
        let req =
            json!({ "id": id, "inputs": [{ "name": "X", "datatype": "FP32", "shape": [1, 30], "data": p["X"] }] });
        let (s, body) = agent.post("/v2/models/cancer-triage/infer", &req).await?;
        assert_eq!(s, 200, "{body}");
        assert_eq!(output(&body, "label")["data"], json!([p["label"]]), "{body}");
        assert_close(output(&body, "probabilities"), &p["probabilities"], 1e-4);
        let steps = body["parameters"]["pipeline_steps"].as_array().cloned().unwrap_or_default();
        let answered = steps.last().map(|s| s["model"].clone()).unwrap_or_default();
        assert_eq!(answered, p["answered_by"], "{body}");
        // The unsure case ran both stages, and the record says so.
        let rec = record_of(&agent, &id)?;
        let ran: Vec<Value> = rec["parameters"]["pipeline_steps"].as_array().cloned().unwrap_or_default();
        if p["answered_by"] == "mlp" {
            assert_eq!(ran.len(), 2, "{rec}");
            assert_eq!(
                (ran[0]["model"].as_str(), ran[0]["sure"].as_bool()),
                (Some("mlp-int8-dyn"), Some(false)),
                "{rec}"
            );
        } else {
            assert_eq!(ran.len(), 1, "{rec}");
            assert_eq!(ran[0]["sure"], true, "{rec}");
        }
    }
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_pipelines_from_the_registry_serve_and_forged_or_older_ones_are_refused() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    for m in ["digits-png", "digit-parity", "prob-mean"] {
        reg.publish_dir(&root().join("models").join(m), m, "1.0.0")?;
    }
    let docs: Vec<outpost::api::pipeline::PipelineDoc> =
        serde_json::from_slice(&std::fs::read(root().join("models/pipelines.json"))?)?;
    let report_only: Vec<_> = docs.iter().filter(|d| d.name == "digit-report").cloned().collect();
    outpost::registry::publish::publish_pipelines(reg.path(), report_only.clone(), &reg.signers(), 86400)?;
    let v1 = std::fs::read(reg.path().join("pipelines.json"))?;
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), "")).await?;
    let p0 = &probes()?["digit-report"][0];
    let png = base64::engine::general_purpose::STANDARD.decode(p0["png"].as_str().unwrap_or_default())?;
    let (s, body) = post_png(&agent, "/v2/models/digit-report/infer", png.clone()).await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["model_version"], "1", "the pipelines.json version");

    // Signed by a key the root does not name: refused, the trusted one serves on.
    let stranger = outpost::registry::KeyPair::generate()?;
    let forged_dir = tempfile::tempdir()?;
    std::fs::copy(reg.root_json(), forged_dir.path().join("root.json"))?;
    let mut renamed = report_only.clone();
    renamed[0].outputs.remove("parity");
    outpost::registry::publish::publish_pipelines(forged_dir.path(), renamed, &[&stranger], 86400)
        .expect_err("the publisher checks the key too");
    let doc = outpost::api::pipeline::Pipelines {
        kind: "pipelines".into(),
        version: 9,
        expires: outpost::registry::format_time(outpost::registry::now() + 86400),
        pipelines: report_only.clone(),
    };
    let forged = outpost::registry::dsse::Envelope::sign(
        outpost_proto::registry::pipeline::PIPELINES_TYPE,
        &serde_json::to_vec(&doc)?,
        &[&stranger],
    );
    std::fs::write(reg.path().join("pipelines.json"), forged.to_bytes())?;
    let r = agent.agent.poll_registry().await?;
    assert!(r.failed.iter().any(|(n, e)| n == "pipelines.json" && e.contains("signature")), "{r:?}");
    let (s, body) = post_png(&agent, "/v2/models/digit-report/infer", png.clone()).await?;
    assert_eq!(s, 200, "{body}");

    // Version 2 (both pipelines), then version 1 again: a rollback, refused.
    std::fs::write(reg.path().join("pipelines.json"), &v1)?;
    outpost::registry::publish::publish_pipelines(reg.path(), docs.clone(), &reg.signers(), 86400)?;
    let r = agent.agent.poll_registry().await?;
    assert!(!r.failed.iter().any(|(n, _)| n == "pipelines.json"), "{r:?}");
    let (s, meta) = agent.get("/v2/models/cancer-triage").await?;
    assert_eq!((s, meta["versions"].clone()), (200, json!(["2"])), "{meta}");
    std::fs::write(reg.path().join("pipelines.json"), &v1)?;
    let r = agent.agent.poll_registry().await?;
    assert!(r.failed.iter().any(|(n, e)| n == "pipelines.json" && e.contains("not newer")), "{r:?}");

    // Restarted offline: the persisted pipelines serve from the first moment.
    let state = agent.stop_keep_state().await?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let agent =
        TestAgent::start_with_state(state, &[], &registry_toml(&format!("http://{dead}/"), &reg.root_json(), ""))
            .await?;
    let (s, body) = post_png(&agent, "/v2/models/digit-report/infer", png).await?;
    assert_eq!((s, body["model_version"].clone()), (200, json!("2")), "{body}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_keeps_inputs_marked_sensitive_and_what_comes_of_them_on_the_site() -> anyhow::Result<()> {
    // The box overflows every mlp request (an objective of 1 µs) to the data-centre agent.
    let t = crate::overflow::target().await?;
    let proxy = outpost_tests::faulty::Faulty::start(&t.agent.base).await?;
    let (reg, _server, agent) = crate::overflow::edge(&proxy.url(), "slo_p99 = \"1us\"", "").await?;
    let doc: outpost::api::pipeline::PipelineDoc = serde_json::from_value(json!({
        "name": "screen", "inputs": ["X"],
        "steps": [{ "name": "m", "model": "mlp", "inputs": { "X": "input.X" } }],
        "outputs": { "probabilities": "m.probabilities" } }))?;
    outpost::registry::publish::publish_pipelines(reg.path(), vec![doc], &reg.signers(), 86400)?;
    agent.agent.poll_registry().await?;
    let mut body = golden_for(&root().join("models/mlp"))?.request(0);
    let (s, answer) = agent.post("/v2/models/screen/infer", &body).await?;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["parameters"]["pipeline_steps"][0]["route"], "overflow", "{answer}");
    assert_eq!(proxy.requests().len(), 1);
    body["inputs"][0]["parameters"] = json!({ "sensitive": true });
    let (s, answer) = agent.post("/v2/models/screen/infer", &body).await?;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["parameters"]["pipeline_steps"][0]["route"], "local", "{answer}");
    assert_eq!(proxy.requests().len(), 1, "nothing more left the site");
    agent.stop().await?;
    t.agent.stop().await
}
