//! Every demo model variant answers its golden cases over HTTP within tolerance, and models
//! that the engine cannot run correctly are refused at load while the others serve.

use outpost_tests::*;
use serde_json::Value;

async fn check_all_cases(agent: &TestAgent, dir: &std::path::Path, name: &str) -> anyhow::Result<f64> {
    let golden = golden_for(&dir.join(name))?;
    let mut max_err = 0.0f64;
    for i in 0..golden.golden.cases.len() {
        let (status, body) = agent.post(&format!("/v2/models/{name}/infer"), &golden.request(i)).await?;
        assert_eq!(status, 200, "{name} case {i}: {body}");
        assert_eq!(body["model_name"], name);
        assert_eq!(body["id"], format!("golden-{i}"));
        let err = golden.check(i, &body).map_err(|e| anyhow::anyhow!("{name} case {i}: {e}"))?;
        max_err = max_err.max(err);
    }
    Ok(max_err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_demo_model_reproduces_onnx_runtime_over_http() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let models = root().join("models");
    for name in DEMO_MODELS {
        let err = check_all_cases(&agent, &models, name).await?;
        eprintln!("{name}: max abs error vs ONNX Runtime {err:.3e}");
    }
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_variants_reproduce_onnx_runtime_over_http() -> anyhow::Result<()> {
    if !minilm_available() {
        eprintln!(
            "skipped: MiniLM not built (scripts/gen-models.sh --minilm); OUTPOST_TEST_FULL=1 makes this an error"
        );
        return Ok(());
    }
    let broken = root().join(".cache").join("fixtures");
    let agent = TestAgent::start(&[minilm_dir(), broken], "").await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for name in MINILM_MODELS {
        let err = check_all_cases(&agent, &minilm_dir(), name).await?;
        eprintln!("{name}: max abs error vs ONNX Runtime {err:.3e}");
        // A run of several rows with nothing else queued: a model this large splits it over
        // the free cores. Each row still gives the golden embedding.
        let golden = golden_for(&minilm_dir().join(name))?;
        let mut two = golden.raw["cases"][0]["inputs"].clone();
        for t in two.as_array_mut().into_iter().flatten() {
            let row = t["data"].as_array().cloned().unwrap_or_default();
            t["shape"][0] = 2.into();
            t["data"] = row.iter().chain(&row).cloned().collect();
        }
        let (status, body) =
            agent.post(&format!("/v2/models/{name}/infer"), &serde_json::json!({ "inputs": two })).await?;
        assert_eq!(status, 200, "{body}");
        let out = &body["outputs"][0];
        let data = out["data"].as_array().cloned().unwrap_or_default();
        assert_eq!(out["shape"][0], 2, "{body}");
        for (r, row) in data.chunks(data.len() / 2).enumerate() {
            let mut shape = out["shape"].clone();
            shape[0] = 1.into();
            let one = serde_json::json!({ "outputs": [{
                "name": out["name"], "datatype": out["datatype"], "shape": shape, "data": row
            }] });
            golden.check(0, &one).map_err(|e| anyhow::anyhow!("{name}, row {r} of a split run: {e}"))?;
        }
        let (_, meta) = agent.get(&format!("/v2/models/{name}")).await?;
        assert_eq!(meta["parameters"]["intra_op_threads"], cores, "{meta}");
        if cores > 1 {
            assert!(meta["parameters"]["split_runs"].as_u64() > Some(0), "the two-row run was split: {meta}");
            // One row, nothing else queued, runs of milliseconds: split too. The other tests
            // of this binary share the CPU slots, so a few tries (bounded) may find none free.
            let before = meta["parameters"]["split_runs"].as_u64();
            let one = serde_json::json!({ "inputs": golden.raw["cases"][0]["inputs"] });
            let mut after = before;
            for _ in 0..20 {
                let (status, body) = agent.post(&format!("/v2/models/{name}/infer"), &one).await?;
                assert_eq!(status, 200, "{body}");
                golden.check(0, &body).map_err(|e| anyhow::anyhow!("{name}, a one-row split run: {e}"))?;
                let (_, meta) = agent.get(&format!("/v2/models/{name}")).await?;
                after = meta["parameters"]["split_runs"].as_u64();
                if after > before {
                    break;
                }
            }
            assert!(
                after > before,
                "{name}: a lone one-row run of a long-running model splits ({before:?} -> {after:?})"
            );
        }
    }
    // ONNX Runtime's default static QDQ of the same encoder: tract runs it without error, but
    // the embeddings point elsewhere. Refused at load by the golden vectors' cosine check.
    let (_, index) = agent.post("/v2/repository/index", &serde_json::json!({})).await?;
    let entry = index_entry(&index, "minilm-int8-qdq-default");
    assert_eq!(entry["state"], "UNAVAILABLE", "{index}");
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cosine similarity"), "{reason}");
    agent.stop().await
}

fn index_entry<'a>(index: &'a Value, name: &str) -> &'a Value {
    index.as_array().and_then(|a| a.iter().find(|m| m["name"] == name)).unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_unsupported_models_are_refused_while_others_serve() -> anyhow::Result<()> {
    let fixtures = root().join("tests").join("fixtures").join("models");
    let agent = TestAgent::start(&[root().join("models"), fixtures], "").await?;
    let (status, index) = agent.post("/v2/repository/index", &serde_json::json!({})).await?;
    assert_eq!(status, 200);

    // An operator tract lacks: refused with the operator's name.
    let unsupported = index_entry(&index, "unsupported-op");
    assert_eq!(unsupported["state"], "UNAVAILABLE", "{index}");
    let reason = unsupported["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Scaler"), "reason names the operator: {reason}");

    // DequantizeLinear -> Softmax -> QuantizeLinear (uint8): tract runs it without error but
    // wrongly; only the golden vectors catch it.
    let u8_fixture = index_entry(&index, "qdq-softmax-u8");
    assert_eq!(u8_fixture["state"], "UNAVAILABLE", "{index}");
    let reason = u8_fixture["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("golden vectors not reproduced"), "{reason}");

    // The int8 variant makes tract's optimizer panic (or compute wrongly): refused, process alive.
    let i8_fixture = index_entry(&index, "qdq-softmax-i8");
    assert_eq!(i8_fixture["state"], "UNAVAILABLE", "{index}");
    eprintln!("qdq-softmax-i8 refused: {}", i8_fixture["reason"]);

    for name in ["unsupported-op", "qdq-softmax-u8", "qdq-softmax-i8"] {
        let (status, body) = agent.get(&format!("/v2/models/{name}/ready")).await?;
        assert_eq!(status, 503, "{name}: {body}");
        let golden = golden_for(&root().join("tests/fixtures/models").join(name))?;
        let (status, body) = agent.post(&format!("/v2/models/{name}/infer"), &golden.request(0)).await?;
        assert_eq!(status, 503, "{name}: {body}");
        assert!(body["error"].is_string());
    }

    // The demo models serve alongside.
    for name in DEMO_MODELS {
        assert_eq!(index_entry(&index, name)["state"], "READY", "{name}: {index}");
    }
    let (status, _) = agent.get("/v2/health/ready").await?;
    assert_eq!(status, 200);
    let golden = golden_for(&root().join("models/mlp"))?;
    let (status, body) = agent.post("/v2/models/mlp/infer", &golden.request(0)).await?;
    assert_eq!(status, 200, "{body}");
    golden.check(0, &body)?;
    agent.stop().await
}

/// Split runs of a large model (the inference pool's threads share each matrix product, kept
/// awake for the length of the run) give exactly the outputs of the same run on one thread,
/// run after run, and each finishes (a stalled helper would show as a timeout here).
#[test]
fn split_runs_give_exactly_the_one_thread_outputs() {
    use outpost::engine::LoadedModel;
    use outpost::protocol::{Tensor, TensorData};
    use std::time::Duration;
    if !minilm_available() {
        eprintln!("skipped: MiniLM not built (scripts/gen-models.sh --minilm)");
        return;
    }
    let onnx = std::fs::read(minilm_dir().join("minilm").join("model.onnx")).expect("MiniLM");
    let model = std::sync::Arc::new(LoadedModel::load(&onnx, 2).expect("MiniLM loads"));
    // Eight rows and one row of 14 tokens: MiniLM's products are large enough for tract to
    // split them, at one row only from the agent's lower panel threshold.
    for (rows, seq) in [(8, 14), (1, 14)] {
        let ids = (0..rows * seq).map(|i| 1000 + (i as i64 * 7919) % 20000).collect();
        let inputs = model
            .validate(vec![
                Tensor { name: "input_ids".into(), shape: vec![rows, seq], data: TensorData::I64(ids) },
                Tensor {
                    name: "attention_mask".into(),
                    shape: vec![rows, seq],
                    data: TensorData::I64(vec![1; rows * seq]),
                },
            ])
            .expect("valid inputs");
        let want = model.run(inputs.clone()).expect("runs on one thread");
        let (tx, rx) = std::sync::mpsc::channel();
        let split = model.clone();
        std::thread::spawn(move || {
            for _ in 0..8 {
                if tx.send(split.run_on(inputs.clone(), 2)).is_err() {
                    return;
                }
            }
        });
        for run in 0..8 {
            let got = rx.recv_timeout(Duration::from_secs(60)).expect("a split run finishes").expect("runs split");
            assert_eq!(got, want, "{rows} rows: split run {run} differs from the one-thread run");
        }
    }
}
