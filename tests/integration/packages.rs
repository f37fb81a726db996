//! Model packages: raw data in (text, PNG bytes, named fields), answers out, with the steps
//! shipped and signed with the model. Expected values come from ONNX Runtime fed by reference
//! processing (`scripts/gen-packages.py`): the reference `tokenizers` for text, numpy for
//! pixels and fields.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use outpost_tests::broker::{Broker, BrokerOptions};
use outpost_tests::mqtt::{mqtt_toml, Requester};
use outpost_tests::registry::{StaticServer, TestRegistry};
use outpost_tests::*;
use serde_json::{json, Value};

use crate::model_list;

/// A model directory holding only the named packages of `src` (symlinked).
fn only(src: &Path, names: &[&str]) -> anyhow::Result<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    for n in names {
        std::os::unix::fs::symlink(src.join(n), d.path().join(n))?;
    }
    Ok(d)
}

fn package_golden(dir: &Path) -> anyhow::Result<Value> {
    let p: Value = serde_json::from_slice(&std::fs::read(dir.join("package.json"))?)?;
    Ok(p["golden"].clone())
}

/// The first golden case's raw items (decoded from base64 when so marked) and outputs.
fn golden_case(dir: &Path, case: usize) -> anyhow::Result<(Vec<Vec<u8>>, Vec<Value>)> {
    let g = package_golden(dir)?;
    let input = &g["cases"][case]["inputs"][0];
    let items = input["data"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no data"))?
        .iter()
        .map(|d| {
            let s = d.as_str().unwrap_or_default();
            if input["encoding"] == "base64" {
                Ok(base64::engine::general_purpose::STANDARD.decode(s)?)
            } else {
                Ok(s.as_bytes().to_vec())
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outputs = g["cases"][case]["outputs"].as_array().cloned().unwrap_or_default();
    Ok((items, outputs))
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"].as_array().and_then(|o| o.iter().find(|t| t["name"] == name)).unwrap_or(&Value::Null)
}

fn assert_close(have: &Value, want: &Value, atol: f64) {
    let (h, w) =
        (have["data"].as_array().cloned().unwrap_or_default(), want["data"].as_array().cloned().unwrap_or_default());
    assert_eq!(h.len(), w.len(), "{have} vs {want}");
    assert_eq!(have["shape"], want["shape"], "{have} vs {want}");
    for (a, b) in h.iter().zip(&w) {
        match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= atol, "{x} vs {y}: {have} vs {want}"),
            _ => assert_eq!(a, b, "{have} vs {want}"),
        }
    }
}

/// A V2 binary-extension body: a JSON header and one BYTES input, each element a 4-byte
/// little-endian length and its bytes (what tritonclient sends).
fn binary_bytes_request(input: &str, items: &[Vec<u8>]) -> (Vec<u8>, usize) {
    let mut data = Vec::new();
    for it in items {
        data.extend((it.len() as u32).to_le_bytes());
        data.extend(it);
    }
    let head = json!({ "inputs": [{ "name": input, "datatype": "BYTES", "shape": [items.len()],
        "parameters": { "binary_data_size": data.len() } }] })
    .to_string()
    .into_bytes();
    let n = head.len();
    (head.into_iter().chain(data).collect(), n)
}

async fn post_typed(agent: &TestAgent, path: &str, body: Vec<u8>, content_type: &str) -> anyhow::Result<(u16, Value)> {
    let r = agent.http.post(agent.url(path)).header("content-type", content_type).body(body).send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn demo(name: &str) -> PathBuf {
    root().join("models").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digits_cnn_takes_png_bytes_over_http_binary_v2_and_mqtt() -> anyhow::Result<()> {
    let dir = only(&root().join("models"), &["digits-png"])?;
    let broker = Broker::start(BrokerOptions::default())?;
    let agent = TestAgent::start(&[dir.path().to_path_buf()], &mqtt_toml(&broker.url(), "")).await?;
    let (items, want) = golden_case(&demo("digits-png"), 0)?;
    let (digit, probs) = (&want[0], &want[2]);

    // Metadata shows the raw input, not the model's tensor.
    let (_, meta) = agent.get("/v2/models/digits-png").await?;
    assert_eq!(meta["inputs"], json!([{ "name": "image", "datatype": "BYTES", "shape": [-1] }]), "{meta}");
    assert!(meta["outputs"]
        .as_array()
        .is_some_and(|o| o.iter().any(|t| t["name"] == "digit" && t["datatype"] == "BYTES")));

    // The PNG as the body, with its own content type.
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", items[0].clone(), "image/png").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(output(&body, "digit"), digit, "{body}");
    assert_close(output(&body, "probabilities"), probs, 1e-5);

    // A V2 request with the binary tensor extension: BYTES length-prefixed.
    let (raw, n) = binary_bytes_request("image", &items);
    let r = agent
        .http
        .post(agent.url("/v2/models/digits-png/infer"))
        .header("inference-header-content-length", n)
        .body(raw)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await?;
    assert_eq!(output(&body, "digit"), digit, "{body}");

    // MQTT v5: the raw bytes, the content type in the publish properties.
    let req = Requester::connect(broker.port, "camera-1", None, None).await?;
    let reply = req.request_typed("outpost/test-site/infer/digits-png", "png-1", items[0].clone(), "image/png").await?;
    assert_eq!(output(&reply, "digit"), digit, "{reply}");
    // Not an image: a clear error, over both transports.
    let reply =
        req.request_typed("outpost/test-site/infer/digits-png", "png-2", b"GIF89a".to_vec(), "image/gif").await?;
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("not accepted")), "{reply}");
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", b"<svg/>".to_vec(), "image/svg+xml").await?;
    assert_eq!(s, 400, "{body}");
    // A bare model takes no raw input.
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_image_is_refused_before_decoding_and_the_box_serves_on() -> anyhow::Result<()> {
    let dir = only(&root().join("models"), &["digits-png"])?;
    let agent = TestAgent::start(&[dir.path().to_path_buf()], "").await?;
    // A PNG bomb: 3000 × 3000 black pixels compress to a few kilobytes; the package takes at
    // most 4 Mpixels.
    let mut bomb = std::io::Cursor::new(Vec::new());
    image::GrayImage::new(3000, 3000).write_to(&mut bomb, image::ImageFormat::Png)?;
    let bomb = bomb.into_inner();
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", bomb, "image/png").await?;
    assert_eq!(s, 400, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.contains("3000×3000") && msg.contains("refused before decoding"), "{msg}");
    // A JPEG declaring 65000 × 65000 in its header.
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::GrayImage::new(8, 8).write_to(&mut jpeg, image::ImageFormat::Jpeg)?;
    let mut jpeg = jpeg.into_inner();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).ok_or_else(|| anyhow::anyhow!("no SOF0"))?;
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", jpeg, "image/jpeg").await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("refused before decoding")), "{body}");
    // Larger than the package's byte limit: refused before reading the header.
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", vec![0u8; (1 << 20) + 1], "image/png").await?;
    assert_eq!(s, 400, "{body}");
    // The box answers the next request.
    let (items, want) = golden_case(&demo("digits-png"), 1)?;
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", items[0].clone(), "image/png").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(output(&body, "digit"), &want[0]);
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tabular_mlp_takes_a_json_object_of_named_fields_or_a_csv_line() -> anyhow::Result<()> {
    let dir = only(&root().join("models"), &["cancer-fields"])?;
    let agent = TestAgent::start(&[dir.path().to_path_buf()], "").await?;
    let g = package_golden(&demo("cancer-fields"))?;
    for (i, case) in g["cases"].as_array().cloned().unwrap_or_default().iter().enumerate() {
        let req = json!({ "id": format!("row-{i}"), "inputs": [case["inputs"][0]] });
        let (s, body) = agent.post("/v2/models/cancer-fields/infer", &req).await?;
        assert_eq!(s, 200, "{body}");
        for want in case["outputs"].as_array().cloned().unwrap_or_default() {
            let name = want["name"].as_str().unwrap_or_default();
            assert_close(output(&body, name), &want, 1e-5);
        }
    }
    let (_, want) = golden_case(&demo("cancer-fields"), 0)?;
    // The same row as a CSV line, and as the JSON object alone, sent raw.
    let csv = std::fs::read(demo("cancer-fields").join("sample.csv"))?;
    let (s, body) = post_typed(&agent, "/v2/models/cancer-fields/infer", csv, "text/csv").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(output(&body, "diagnosis"), &want[0], "{body}");
    let object = std::fs::read(demo("cancer-fields").join("sample.json"))?;
    let (s, body) = post_typed(&agent, "/v2/models/cancer-fields/infer", object.clone(), "text/plain").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(output(&body, "diagnosis"), &want[0], "{body}");
    // A field missing, a field unknown: named in the error.
    let mut row: serde_json::Map<String, Value> = serde_json::from_slice(&object)?;
    row.remove("worst_area");
    let (s, body) =
        post_typed(&agent, "/v2/models/cancer-fields/infer", serde_json::to_vec(&row)?, "text/plain").await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("field 'worst_area' is missing")), "{body}");
    row.insert("worst_area".into(), json!(1.0));
    row.insert("wrost_area".into(), json!(1.0));
    let (s, body) =
        post_typed(&agent, "/v2/models/cancer-fields/infer", serde_json::to_vec(&row)?, "text/plain").await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("unknown field 'wrost_area'")), "{body}");
    // A bare model refuses an image clearly, and still reads V2 JSON labelled as text.
    let agent2 = TestAgent::start(&[mlp_only()?.path().to_path_buf()], "").await?;
    let (s, body) = post_typed(&agent2, "/v2/models/mlp/infer", b"\x89PNG".to_vec(), "image/png").await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("model package")), "{body}");
    let v2 = serde_json::to_vec(&golden_for(&root().join("models/mlp"))?.request(0))?;
    let (s, body) = post_typed(&agent2, "/v2/models/mlp/infer", v2, "text/plain; charset=utf-8").await?;
    assert_eq!(s, 200, "{body}");
    agent2.stop().await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_with_its_tokenizer_turns_text_into_the_embedding_onnx_runtime_gives() -> anyhow::Result<()> {
    let src = minilm_dir().join("minilm-text");
    if !src.join("package.json").is_file() {
        assert!(
            !full_suite(),
            "OUTPOST_TEST_FULL=1 but the MiniLM text package is not built: run scripts/setup-test.sh"
        );
        return Ok(());
    }
    let dir = only(&minilm_dir(), &["minilm-text"])?;
    let agent = TestAgent::start(&[dir.path().to_path_buf()], "").await?;
    // Sentences the golden vectors do not hold, with ONNX Runtime's embeddings of the ids the
    // reference tokenizer gave.
    let probes: Value = serde_json::from_slice(&std::fs::read(src.join("probes.json"))?)?;
    let texts = probes["texts"].clone();
    let n = texts.as_array().map_or(0, Vec::len);
    let req = json!({ "inputs": [{ "name": "text", "datatype": "BYTES", "shape": [n], "data": texts }] });
    let (s, body) = agent.post("/v2/models/minilm-text/infer", &req).await?;
    assert_eq!(s, 200, "{body}");
    let have = output(&body, "embedding");
    let want: Vec<Vec<f64>> = serde_json::from_value(probes["embedding"].clone())?;
    let data: Vec<f64> = serde_json::from_value(have["data"].clone())?;
    assert_eq!(have["shape"], json!([n, 384]));
    for (row, w) in data.chunks(384).zip(&want) {
        let err = row.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-4, "max abs error {err}");
    }
    // One text as a plain-text body.
    let first = texts[0].as_str().unwrap_or_default().as_bytes().to_vec();
    let (s, body) = post_typed(&agent, "/v2/models/minilm-text/infer", first, "text/plain; charset=utf-8").await?;
    assert_eq!(s, 200, "{body}");
    let one: Vec<f64> = serde_json::from_value(output(&body, "embedding")["data"].clone())?;
    assert!(one.iter().zip(&want[0]).all(|(a, b)| (a - b).abs() < 1e-4));
    // Not UTF-8: a clear error.
    let (s, body) = post_typed(&agent, "/v2/models/minilm-text/infer", vec![0xff, 0xfe], "text/plain").await?;
    assert_eq!(s, 400, "{body}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_labels_file_is_refused_like_a_tampered_model() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    reg.publish_dir(&demo("digits-png"), "digits", "1.0.0")?;
    let stmt = reg.statement("digits")?;
    let decl = stmt.predicate.processing.clone().ok_or_else(|| anyhow::anyhow!("the manifest carries the package"))?;
    let first = decl.files.get("labels.txt").ok_or_else(|| anyhow::anyhow!("labels.txt is signed"))?.clone();
    let server = StaticServer::start(reg.path()).await?;
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), "")).await?;
    let (items, want) = golden_case(&demo("digits-png"), 0)?;
    let (s, body) = post_typed(&agent, "/v2/models/digits/infer", items[0].clone(), "image/png").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(output(&body, "digit"), &want[0]);

    // 1.1.0 (its labels file one line longer), with the labels file swapped on the registry
    // after signing.
    let next = tempfile::tempdir()?;
    for f in ["model.onnx", "golden.json", "package.json"] {
        std::fs::copy(demo("digits-png").join(f), next.path().join(f))?;
    }
    std::fs::write(next.path().join("labels.txt"), "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\nnot a digit\n")?;
    reg.publish_dir(next.path(), "digits", "1.1.0")?;
    let labels = reg.statement("digits")?.predicate.processing.and_then(|d| d.files.get("labels.txt").cloned());
    let labels = labels.ok_or_else(|| anyhow::anyhow!("labels.txt is signed"))?;
    let blob = reg.path().join("blobs/sha256").join(&labels.sha256);
    std::fs::write(&blob, "9\n8\n7\n6\n5\n4\n3\n2\n1\n0\n")?;
    let r = agent.agent.poll_registry().await?;
    let failed = r.failed.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; ");
    assert!(failed.contains("package file labels.txt has sha256"), "{failed}");
    let (s, body) = post_typed(&agent, "/v2/models/digits/infer", items[0].clone(), "image/png").await?;
    assert_eq!((s, body["model_version"].as_str()), (200, Some("1.0.0")), "{body}");
    assert_eq!(output(&body, "digit"), &want[0]);
    let list = model_list(&agent.config_path())?;
    assert!(list.contains("package file labels.txt"), "{list}");

    // The installed labels file changed on disk: refused at the next start.
    let state = agent.stop_keep_state().await?;
    let stored = state.path().join("store/files").join(&first.sha256);
    let mut bytes = std::fs::read(&stored)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&stored, bytes)?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let agent =
        TestAgent::start_with_state(state, &[], &registry_toml(&format!("http://{dead}/"), &reg.root_json(), ""))
            .await?;
    let (s, body) = agent.get("/v2/models/digits/ready").await?;
    assert_ne!(s, 200, "{body}");
    let list = model_list(&agent.config_path())?;
    assert!(list.contains("package file"), "{list}");
    agent.stop().await
}

#[test]
fn a_package_whose_golden_vectors_fail_is_refused_at_publication() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    let dir = tempfile::tempdir()?;
    for f in ["model.onnx", "golden.json", "labels.txt"] {
        std::fs::copy(demo("digits-png").join(f), dir.path().join(f))?;
    }
    // Labels in the wrong order: the answers no longer match what the publisher's own golden
    // vectors say.
    std::fs::write(dir.path().join("labels.txt"), "1\n0\n2\n3\n4\n5\n6\n7\n8\n9\n")?;
    std::fs::copy(demo("digits-png").join("package.json"), dir.path().join("package.json"))?;
    let err = reg.publish_dir(dir.path(), "digits", "1.0.0").expect_err("refused");
    assert!(err.to_string().contains("package golden vectors not reproduced"), "{err}");
    assert!(!reg.index()?.models.contains_key("digits"), "nothing published");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_copy_of_a_package_request_goes_through_the_candidate_s_steps() -> anyhow::Result<()> {
    let reg = TestRegistry::new()?;
    reg.publish_dir(&demo("digits-png"), "digits", "1.0.0")?;
    let next = tempfile::tempdir()?;
    for f in ["model.onnx", "golden.json", "package.json", "labels.txt"] {
        std::fs::copy(demo("digits-png").join(f), next.path().join(f))?;
    }
    reg.publish_dir(next.path(), "digits", "1.1.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let settings = "[models.digits]\nversion_policy = \"pinned\"\nversions = [\"1.0.0\", \"1.1.0\"]\n\n\
                    [models.digits.shadow]\nversion = \"1.0.0\"\nshare = 1.0\noutput = \"probabilities\"\n";
    let agent = TestAgent::start(&[], &registry_toml(&server.url(), &reg.root_json(), settings)).await?;
    let (items, want) = golden_case(&demo("digits-png"), 0)?;
    for _ in 0..5 {
        let (s, body) = post_typed(&agent, "/v2/models/digits/infer", items[0].clone(), "image/png").await?;
        assert_eq!((s, body["model_version"].as_str()), (200, Some("1.1.0")), "{body}");
        assert_eq!(output(&body, "digit"), &want[0]);
    }
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, r) = agent.get("/admin/experiments/digits").await?;
        let n = |k: &str| r["shadow"][k].as_u64().unwrap_or(0);
        if n("sampled") > 0 && n("compared") + n("dropped_busy") + n("failed") == n("sampled") {
            assert_eq!(n("failed"), 0, "{r}");
            assert!(n("compared") > 0, "{r}");
            assert_eq!(r["shadow"]["max_abs_diff"].as_f64(), Some(0.0), "the same model, the same steps: {r}");
            break;
        }
        assert!(std::time::Instant::now() < end, "shadow copies never settled: {r}");
        tokio::task::yield_now().await;
    }
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_step_file_of_a_local_package_is_checked_again_at_reload() -> anyhow::Result<()> {
    let models = tempfile::tempdir()?;
    let dir = models.path().join("digits-png");
    std::fs::create_dir_all(&dir)?;
    for f in ["model.onnx", "golden.json", "package.json", "labels.txt"] {
        std::fs::copy(demo("digits-png").join(f), dir.join(f))?;
    }
    let agent = TestAgent::start(&[models.path().to_path_buf()], "").await?;
    let (items, want) = golden_case(&demo("digits-png"), 0)?;
    // Labels out of order, package.json untouched: the package's golden vectors catch it at the
    // reload, and the version that was proven serves on.
    std::fs::write(dir.join("labels.txt"), "1\n0\n2\n3\n4\n5\n6\n7\n8\n9\n")?;
    let cfg = agent.agent.config();
    agent.agent.reload((*cfg).clone()).await;
    let (_, index) = agent.post("/v2/repository/index", &json!({})).await?;
    assert!(index.to_string().contains("package golden vectors not reproduced"), "{index}");
    let (s, body) = post_typed(&agent, "/v2/models/digits-png/infer", items[0].clone(), "image/png").await?;
    assert_eq!(s, 200, "{body}");
    assert_eq!(output(&body, "digit"), &want[0]);
    agent.stop().await
}
