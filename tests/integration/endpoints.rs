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
    assert_eq!(names, DEMO_MODELS.to_vec());
    assert!(index.as_array().expect("list").iter().all(|m| m["state"] == "READY" && m["version"] == "1"));

    let golden = golden_for(&root().join("models/cnn"))?;
    for _ in 0..3 {
        let (s, _) = agent.post("/v2/models/cnn/infer", &golden.request(0)).await?;
        assert_eq!(s, 200);
    }
    let (s, _) = agent.post("/v2/models/cnn/infer", &json!({"inputs": []})).await?;
    assert_eq!(s, 400);
    let text = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    assert!(text.contains("outpost_inference_requests_total{model=\"cnn\",outcome=\"ok\"} 3"), "{text}");
    assert!(text.contains("outpost_inference_requests_total{model=\"cnn\",outcome=\"invalid_input\"} 1"), "{text}");
    assert!(text.contains("outpost_inference_failures_total{model=\"cnn\"} 1"), "{text}");
    assert!(text.contains("outpost_inference_duration_seconds_count{model=\"cnn\"} 4"), "{text}");
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
