//! Engine and HTTP latency of one model, printed as JSON lines for scripts/bench-engine.sh.
//!
//!     cargo bench -p outpost --bench engine -- --model models/mlp --iters 2000 [--threads N] [--http]
//!
//! Inputs are the model's first golden case (batch 1) and that case tiled to batch 8, the
//! same inputs scripts/bench-ort.py gives ONNX Runtime. `--threads` splits each run over N
//! threads (`intra_op_threads`), as the agent does for a large model with nothing else queued.
//!
//! `--panels N` sets the size (in matrix panels) below which a split run does not share a
//! product between its threads (the agent's default: 32).
//!
//! `--plans symbolic|concrete` overrides the loader's choice for a large model with dynamic
//! dimensions (one symbolic plan for every shape, or one optimized plan per concrete shape), to
//! compare the two on the same inputs.
//!
//! `--gap-us N` leaves the core idle N µs before each timed run, as a server answering one
//! request at a time does between them (`scripts/bench-ort.py --gap-us` does the same).
//!
//! `--http` also measures, at concurrency 1 over one kept-alive loopback connection with a
//! minimal blocking client: the infer round trip (the audit log off), and the
//! `/v2/health/ready` round trip, which is the transport's own share (TCP on loopback, HTTP/1.1
//! framing, a wake-up of the server's thread). The HTTP+JSON overhead is infer minus engine;
//! less the health round trip, it is what the server's routing, JSON and queueing add.

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
    let threads: usize = arg(&args, "--threads").and_then(|s| s.parse().ok()).unwrap_or(1);
    let gap_us: u64 = arg(&args, "--gap-us").and_then(|s| s.parse().ok()).unwrap_or(0).min(1_000_000);
    let gap = Duration::from_micros(gap_us);
    if let Some(p) = arg(&args, "--panels").and_then(|s| s.parse().ok()) {
        outpost::engine::model::set_split_min_panels(p);
    }
    let name = model_dir.file_name().and_then(|s| s.to_str()).unwrap_or("model").to_owned();
    let onnx = std::fs::read(model_dir.join("model.onnx")).expect("model.onnx");
    let golden_bytes = std::fs::read(model_dir.join("golden.json")).expect("golden.json");
    let golden = Golden::parse(&golden_bytes).expect("golden");
    let prepared =
        outpost::engine::prepare(&onnx, Some(&golden_bytes), &ModelConfig::default().prepare_options(onnx.len()))
            .expect("model loads");
    let model = prepared.model;
    match arg(&args, "--plans").as_deref() {
        Some("symbolic") => assert!(model.set_symbolic(true).expect("symbolic plan"), "no dynamic dimension"),
        Some("concrete") => {
            model.set_symbolic(false).expect("concrete plans");
        }
        Some(other) => panic!("--plans symbolic|concrete, not {other}"),
        None => {}
    }
    let plans = if model.symbolic() { "symbolic" } else { "concrete" };
    let base = &golden.cases[0].inputs;
    for batch in [1usize, 8] {
        let inputs: Vec<Tensor> = base.iter().map(|t| tile(t, batch)).collect();
        let inputs = model.validate(inputs).expect("valid inputs");
        for _ in 0..iters.min(50) {
            model.run_on(inputs.clone(), threads).expect("run");
        }
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let i = inputs.clone();
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
            let t = Instant::now();
            std::hint::black_box(model.run_on(i, threads).expect("run"));
            samples.push(t.elapsed());
        }
        let (p50, p99, mean) = stats(samples);
        println!(
            "{{\"runtime\":\"tract\",\"kind\":\"engine\",\"model\":\"{name}\",\"batch\":{batch},\"threads\":{threads},\"plans\":\"{plans}\",\"gap_us\":{gap_us},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"mean_us\":{mean:.1},\"iters\":{iters}}}"
        );
    }
    if args.iter().any(|a| a == "--http") {
        http_bench(&model_dir, &name, iters);
    }
}

/// A minimal HTTP/1.1 client on one kept-alive connection, so the client's own cost stays small
/// next to what is measured.
struct Conn {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: std::net::SocketAddr) -> Conn {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Conn { stream, buf: Vec::with_capacity(64 << 10) }
    }

    /// One request; returns the status. The body is read and dropped.
    fn call(&mut self, method: &str, path: &str, body: &[u8]) -> u16 {
        use std::io::{Read, Write};
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.stream.write_all(&req).expect("write");
        self.buf.clear();
        let mut chunk = [0u8; 16 << 10];
        let (header_end, status, length) = loop {
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status = text.get(9..12).and_then(|s| s.parse().ok()).expect("status line");
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .expect("content-length");
                break (end + 4, status, length);
            }
        };
        while self.buf.len() < header_end + length {
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        status
    }
}

fn time_calls(conn: &mut Conn, method: &str, path: &str, body: &[u8], iters: usize) -> Vec<Duration> {
    for _ in 0..iters.min(50) {
        assert_eq!(conn.call(method, path, body), 200, "{path}");
    }
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(conn.call(method, path, body), 200, "{path}");
            t.elapsed()
        })
        .collect()
}

/// HTTP+JSON latency at concurrency 1 against the real agent on loopback.
fn http_bench(model_dir: &std::path::Path, name: &str, iters: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
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
    let agent = rt.block_on(async {
        let agent = outpost::start(config).await.expect("agent");
        agent.started().await;
        agent
    });
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("golden.json")).expect("golden")).expect("json");
    let body = serde_json::to_vec(&serde_json::json!({ "inputs": raw["cases"][0]["inputs"] })).expect("body");
    let mut conn = Conn::open(agent.addr());
    let path = format!("/v2/models/{name}/infer");
    // Alternating blocks, so both see the same machine.
    let (mut infer, mut health) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        infer.extend(time_calls(&mut conn, "POST", &path, &body, iters / 5));
        health.extend(time_calls(&mut conn, "GET", "/v2/health/ready", b"", iters / 5));
    }
    for (kind, samples) in [("http", infer), ("health", health)] {
        let (p50, p99, mean) = stats(samples);
        println!(
            "{{\"runtime\":\"tract\",\"kind\":\"{kind}\",\"model\":\"{name}\",\"batch\":1,\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"mean_us\":{mean:.1},\"iters\":{iters}}}"
        );
    }
    drop(conn);
    rt.block_on(async { agent.shutdown().await.expect("shutdown") });
    let _ = std::fs::remove_dir_all(&state);
}
