//! Engine and HTTP latency of one model, printed as JSON lines for scripts/bench-engine.sh.
//!
//!     cargo bench -p outpost --bench engine -- --model models/mlp --iters 2000 [--http]
//!
//! Inputs are the model's first golden case (batch 1) and that case tiled to batch 8, the
//! same inputs scripts/bench-ort.py gives ONNX Runtime.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost::config::ModelConfig;
use outpost::engine::Golden;
use outpost::protocol::{Tensor, TensorData};

fn tile(t: &Tensor, times: usize) -> Tensor {
    let mut shape = t.shape.clone();
    shape[0] *= times;
    macro_rules! rep {
        ($v:expr, $variant:ident) => {
            TensorData::$variant($v.iter().cloned().cycle().take($v.len() * times).collect())
        };
    }
    let data = match &t.data {
        TensorData::F32(v) => rep!(v, F32),
        TensorData::I64(v) => rep!(v, I64),
        TensorData::F64(v) => rep!(v, F64),
        TensorData::I32(v) => rep!(v, I32),
        other => panic!("bench: unsupported input type {:?}", other.datatype()),
    };
    Tensor { name: t.name.clone(), shape, data }
}

fn stats(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p = |q: f64| us(samples[((samples.len() as f64 - 1.0) * q).round() as usize]);
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    (p(0.5), p(0.99), mean)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(model_dir) = arg(&args, "--model").map(PathBuf::from) else {
        eprintln!("usage: engine --model DIR [--iters N] [--http]");
        return;
    };
    let iters: usize = arg(&args, "--iters").and_then(|s| s.parse().ok()).unwrap_or(1000);
    let name = model_dir.file_name().and_then(|s| s.to_str()).unwrap_or("model").to_owned();
    let onnx = std::fs::read(model_dir.join("model.onnx")).expect("model.onnx");
    let golden_bytes = std::fs::read(model_dir.join("golden.json")).expect("golden.json");
    let golden = Golden::parse(&golden_bytes).expect("golden");
    let prepared =
        outpost::lifecycle::prepare(&onnx, Some(&golden_bytes), &ModelConfig::default()).expect("model loads");
    let model = prepared.model;
    let base = &golden.cases[0].inputs;
    for batch in [1usize, 8] {
        let inputs: Vec<Tensor> = base.iter().map(|t| tile(t, batch)).collect();
        let inputs = model.validate(inputs).expect("valid inputs");
        for _ in 0..iters.min(50) {
            model.run(inputs.clone()).expect("run");
        }
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let i = inputs.clone();
            let t = Instant::now();
            std::hint::black_box(model.run(i).expect("run"));
            samples.push(t.elapsed());
        }
        let (p50, p99, mean) = stats(samples);
        println!(
            "{{\"runtime\":\"tract\",\"kind\":\"engine\",\"model\":\"{name}\",\"batch\":{batch},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"mean_us\":{mean:.1},\"iters\":{iters}}}"
        );
    }
    if args.iter().any(|a| a == "--http") {
        http_bench(&model_dir, &name, iters);
    }
}

/// End-to-end HTTP+JSON latency at concurrency 1 against the real agent on loopback.
fn http_bench(model_dir: &std::path::Path, name: &str, iters: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let state = std::env::temp_dir().join(format!("outpost-bench-{}", std::process::id()));
        std::fs::create_dir_all(&state).expect("state dir");
        let dir = model_dir.parent().expect("models dir");
        let text = format!(
            // The audit log off: this measures HTTP and JSON; the audit log's own cost (one
            // fdatasync per commit in each answer's path) is measured by the audit and serving
            // benchmarks.
            "[node]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[local_models]\ndirs = [{:?}]\n[audit]\nenabled = false\n",
            state.display().to_string(),
            dir.display().to_string()
        );
        let cfg_path = state.join("bench.toml");
        std::fs::write(&cfg_path, text).expect("config");
        let config = outpost::config::Config::load(&cfg_path).expect("config");
        let agent = outpost::start(config).await.expect("agent");
        agent.started().await;
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model_dir.join("golden.json")).expect("golden")).expect("json");
        let body = serde_json::to_vec(&serde_json::json!({ "inputs": raw["cases"][0]["inputs"] })).expect("body");
        let url = format!("http://{}/v2/models/{name}/infer", agent.addr());
        let client = reqwest::Client::new();
        for _ in 0..iters.min(50) {
            client.post(&url).body(body.clone()).send().await.expect("send").bytes().await.expect("body");
        }
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            let r = client.post(&url).body(body.clone()).send().await.expect("send");
            assert_eq!(r.status().as_u16(), 200);
            r.bytes().await.expect("body");
            samples.push(t.elapsed());
        }
        let (p50, p99, mean) = stats(samples);
        println!(
            "{{\"runtime\":\"tract\",\"kind\":\"http\",\"model\":\"{name}\",\"batch\":1,\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"mean_us\":{mean:.1},\"iters\":{iters}}}"
        );
        agent.shutdown().await.expect("shutdown");
        let _ = std::fs::remove_dir_all(&state);
    });
}
