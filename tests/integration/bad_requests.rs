//! Bad input gets the right 4xx with `{"error": ...}` and loses nothing: the server keeps
//! serving correct answers afterwards.

use outpost_tests::*;
use serde_json::{json, Value};

fn mlp_input(shape: Value, datatype: &str, data: Value) -> Value {
    json!({ "inputs": [{ "name": "X", "shape": shape, "datatype": datatype, "data": data }] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_request_gets_its_status_and_the_server_keeps_serving() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let row: Vec<f32> = vec![0.5; 30];
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "wrong shape",
            "mlp",
            serde_json::to_vec(&mlp_input(json!([1, 29]), "FP32", json!(vec![0.5f32; 29])))?,
            400,
            "dimension 1 must be 30",
        ),
        ("wrong rank", "mlp", serde_json::to_vec(&mlp_input(json!([30]), "FP32", json!(row)))?, 400, "rank 2"),
        (
            "wrong dtype",
            "mlp",
            serde_json::to_vec(&mlp_input(json!([1, 30]), "FP64", json!(row)))?,
            400,
            "must be FP32, got FP64",
        ),
        (
            "wrong input name",
            "mlp",
            serde_json::to_vec(&json!({"inputs": [{"name": "Y", "shape": [1, 30], "datatype": "FP32", "data": row}]}))?,
            400,
            "missing input 'X'",
        ),
        (
            "element count",
            "mlp",
            serde_json::to_vec(&mlp_input(json!([2, 30]), "FP32", json!(row)))?,
            400,
            "needs 60 elements but data has 30",
        ),
        (
            "unknown datatype",
            "mlp",
            serde_json::to_vec(&mlp_input(json!([1, 30]), "FP8", json!(row)))?,
            400,
            "unknown datatype",
        ),
        (
            "string data for FP32",
            "mlp",
            serde_json::to_vec(&mlp_input(json!([1, 1]), "FP32", json!(["a"])))?,
            400,
            "must be numbers",
        ),
        ("zero batch", "mlp", serde_json::to_vec(&mlp_input(json!([0, 30]), "FP32", json!([])))?, 400, "must not be 0"),
        (
            "extra input",
            "mlp",
            serde_json::to_vec(&json!({"inputs": [
            {"name": "X", "shape": [1, 30], "datatype": "FP32", "data": row},
            {"name": "Z", "shape": [1], "datatype": "FP32", "data": [1]}]}))?,
            400,
            "expected 1 inputs",
        ),
        (
            "unknown output",
            "mlp",
            serde_json::to_vec(&json!({"inputs": [{"name": "X", "shape": [1, 30], "datatype": "FP32", "data": row}],
            "outputs": [{"name": "nope"}]}))?,
            400,
            "unknown output 'nope'",
        ),
        ("malformed JSON", "mlp", b"{\"inputs\": [".to_vec(), 400, "malformed request JSON"),
        ("not JSON at all", "mlp", b"\x00\x01binary".to_vec(), 400, "malformed request JSON"),
        ("missing inputs", "mlp", b"{}".to_vec(), 400, "missing field `inputs`"),
        (
            "missing data",
            "mlp",
            serde_json::to_vec(&json!({"inputs": [{"name": "X", "shape": [1, 30], "datatype": "FP32"}]}))?,
            400,
            "missing field `data`",
        ),
        (
            "missing shape",
            "mlp",
            serde_json::to_vec(&json!({"inputs": [{"name": "X", "datatype": "FP32", "data": row}]}))?,
            400,
            "missing field `shape`",
        ),
        (
            "unknown model",
            "nope",
            serde_json::to_vec(&mlp_input(json!([1, 30]), "FP32", json!(row)))?,
            404,
            "unknown model 'nope'",
        ),
        ("body over the limit", "mlp", vec![b' '; 16 * 1024 * 1024 + 1], 413, "larger than 16777216 bytes"),
    ];
    for (what, model, body, status, needle) in cases {
        let (s, _, v) = agent.post_raw(&format!("/v2/models/{model}/infer"), body).await?;
        assert_eq!(s, status, "{what}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{what}: no error field in {v}"));
        assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
    }
    let (s, _, v) = agent
        .post_raw(
            "/v2/models/mlp/versions/9/infer",
            serde_json::to_vec(&mlp_input(json!([1, 30]), "FP32", json!(row)))?,
        )
        .await?;
    assert_eq!(s, 404, "{v}");

    // 405 for the wrong method, with a JSON error.
    let r = agent.http.get(agent.url("/v2/models/mlp/infer")).send().await?;
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await?;
    assert!(v["error"].is_string());
    let r = agent.http.post(agent.url("/v2/health/live")).send().await?;
    assert_eq!(r.status().as_u16(), 405);

    // A chunked body (no Content-Length) over the limit is cut off with 413 too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..17).map(|_| Ok(vec![b' '; 1024 * 1024])).collect();
    let stream = futures::stream::iter(chunks);
    let r = agent.http.post(agent.url("/v2/models/mlp/infer")).body(reqwest::Body::wrap_stream(stream)).send().await?;
    assert_eq!(r.status().as_u16(), 413);

    // Still serving, correctly.
    let golden = golden_for(&root().join("models/mlp"))?;
    let (s, body) = agent.post("/v2/models/mlp/infer", &golden.request(2)).await?;
    assert_eq!(s, 200, "{body}");
    golden.check(2, &body)?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_body_limit_applies() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let text = config_text(state.path(), &[root().join("models")], "")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nmax_body_bytes = 4096");
    let path = state.path().join("outpost.toml");
    std::fs::write(&path, text)?;
    let agent = outpost::start(outpost::config::Config::load(&path)?).await?;
    agent.started().await;
    let http = outpost_tests::http_client();
    let url = format!("http://{}/v2/models/mlp/infer", agent.addr());
    let r = http.post(&url).body(vec![b' '; 4097]).send().await?;
    assert_eq!(r.status().as_u16(), 413);
    let golden = golden_for(&root().join("models/mlp"))?;
    let r = http.post(&url).json(&golden.request(0)).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_outside_its_table_gets_400_naming_the_input() -> anyhow::Result<()> {
    if !minilm_available() {
        eprintln!("skipped: MiniLM not built (scripts/gen-models.sh --minilm)");
        return Ok(());
    }
    let agent = TestAgent::start(&[minilm_dir()], "").await?;
    for model in MINILM_MODELS {
        let golden = golden_for(&minilm_dir().join(model))?;
        for bad in [30_522i64, 1 << 40, -1] {
            let mut body = golden.request(0);
            body["inputs"][0]["data"][3] = json!(bad);
            let (s, answer) = agent.post(&format!("/v2/models/{model}/infer"), &body).await?;
            assert_eq!(s, 400, "{model} {bad}: {answer}");
            let e = answer["error"].as_str().unwrap_or_default();
            assert!(e.contains("input 'input_ids' element 3") && e.contains("[0, 30522)"), "{e}");
        }
        // And it keeps serving.
        let (s, answer) = agent.post(&format!("/v2/models/{model}/infer"), &golden.request(0)).await?;
        assert_eq!(s, 200, "{answer}");
        golden.check(0, &answer)?;
    }
    agent.stop().await
}

/// An MLP request in the binary tensor extension: 30 FP32 values, the first one `first`.
fn binary_mlp_request(first: f32) -> (Vec<u8>, usize) {
    let header = serde_json::to_vec(&json!({
        "inputs": [{ "name": "X", "shape": [1, 30], "datatype": "FP32", "parameters": { "binary_data_size": 120 } }]
    }))
    .unwrap_or_default();
    let mut body = header.clone();
    for i in 0..30 {
        let v = if i == 0 { first } else { 0.5 };
        body.extend_from_slice(&v.to_le_bytes());
    }
    (body, header.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_inputs_are_refused_in_json_and_binary_unless_the_model_allows_them() -> anyhow::Result<()> {
    let agent = TestAgent::start(&[root().join("models")], "[models.cnn]\nallow_non_finite = true\n").await?;
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (body, header_len) = binary_mlp_request(v);
        let r = agent
            .http
            .post(agent.url("/v2/models/mlp/infer"))
            .header("Inference-Header-Content-Length", header_len)
            .body(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let answer: Value = r.json().await?;
        assert_eq!(status, 400, "{v}: {answer}");
        let e = answer["error"].as_str().unwrap_or_default();
        assert!(e.contains("input 'X' element 0 is not a finite number"), "{e}");
    }
    // JSON has no NaN literal; a request spelling it is refused as bad JSON, as before.
    let (s, _, _) = agent
        .post_raw("/v2/models/mlp/infer", r#"{"inputs":[{"name":"X","shape":[1,1],"datatype":"FP32","data":[NaN]}]}"#)
        .await?;
    assert_eq!(s, 400);
    // A model configured to accept them runs them.
    let golden = golden_for(&root().join("models/cnn"))?;
    let body = golden.request(0);
    let n = body["inputs"][0]["data"].as_array().map_or(0, Vec::len);
    let header = serde_json::to_vec(&json!({ "inputs": [{
        "name": body["inputs"][0]["name"], "shape": body["inputs"][0]["shape"], "datatype": "FP32",
        "parameters": { "binary_data_size": n * 4 } }] }))?;
    let mut bytes = header.clone();
    for i in 0..n {
        let v = if i == 0 { f32::NAN } else { body["inputs"][0]["data"][i].as_f64().unwrap_or(0.0) as f32 };
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let r = agent
        .http
        .post(agent.url("/v2/models/cnn/infer"))
        .header("Inference-Header-Content-Length", header.len())
        .body(bytes)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    agent.stop().await
}
