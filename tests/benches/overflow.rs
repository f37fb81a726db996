//! Overflow under load: offered load beyond one box's capacity, with overflow off and on, in
//! the same run. The branch box (an `outpost` process) is pinned to CPU 0, the overflow target
//! to CPU 1 (`taskset`), so the target adds capacity; the load generator runs in this process,
//! pinned with the target by `scripts/bench-overflow.sh`. Open loop: requests are sent on a
//! fixed schedule and latency counts from the scheduled time (no coordinated omission).
//! Bounded: `--seconds` × `--rate` requests, each with a 5 s client timeout.
//!
//!     cargo bench -p outpost-tests --bench overflow -- [--rate 180] [--seconds 10]
//!         [--peer-url http://127.0.0.1:PORT --peer-model NAME]   (a V2 peer already running)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outpost_tests::registry::TestRegistry;
use outpost_tests::*;
use serde_json::Value;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// An agent as its own process, pinned to `cpu`.
fn spawn_pinned(cpu: &str, config: &Path) -> Result<(ChildAgent, String)> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"));
    let taskset = Command::new("taskset").arg("-V").output().is_ok();
    let mut child = if taskset {
        let args = ["-c", cpu, bin.to_str().context("path")?, "run", "--config", config.to_str().context("path")?];
        ChildAgent::spawn_env(Path::new("taskset"), &args, &[("RUST_LOG", "warn,outpost=info")])?
    } else {
        eprintln!("taskset not found: processes are not pinned");
        ChildAgent::spawn(&bin, &["run", "--config", config.to_str().context("path")?])?
    };
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(120))?;
    Ok((child, addr))
}

struct Outcome {
    offered: f64,
    answered: f64,
    p50: f64,
    p99: f64,
    errors: f64,
    upstream: f64,
}

/// Sends `rate` requests/s for `seconds` to `url`; latency from each request's scheduled time.
async fn load(url: &str, body: &Value, rate: f64, seconds: f64) -> Result<Outcome> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).pool_max_idle_per_host(512).build()?;
    let n = (rate * seconds) as usize;
    let body = serde_json::to_vec(body)?;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let (client, url, body) = (client.clone(), url.to_owned(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = client.post(&url).body(body).send().await;
            let ok_route = match r {
                Ok(resp) if resp.status() == 200 => {
                    let v: Value = resp.json().await.unwrap_or(Value::Null);
                    Some(v["parameters"]["route"] == "overflow")
                }
                _ => None,
            };
            (at.elapsed().as_secs_f64() * 1e3, ok_route)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let (mut errors, mut upstream) = (0usize, 0usize);
    for t in tasks {
        let (ms, ok) = t.await?;
        match ok {
            Some(up) => {
                lat.push(ms);
                upstream += usize::from(up);
            }
            None => errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() - 1) as f64 * q) as usize] };
    Ok(Outcome {
        offered: rate,
        answered: lat.len() as f64 / elapsed,
        p50: p(0.5),
        p99: p(0.99),
        errors: errors as f64 * 100.0 / n as f64,
        upstream: upstream as f64 * 100.0 / n as f64,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rate: f64 = arg(&args, "--rate", 180.0);
    let seconds: f64 = arg(&args, "--seconds", 10.0);
    let slo_ms: u64 = arg(&args, "--slo-ms", 100);
    let peer_url = Some(arg(&args, "--peer-url", String::new())).filter(|s| !s.is_empty());
    let peer_model: String = arg(&args, "--peer-model", "minilm".to_owned());
    ensure!(
        minilm_dir().join("minilm").join("model.onnx").is_file(),
        "MiniLM is not built: scripts/gen-models.sh --minilm"
    );
    outpost::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        // The branch box installs MiniLM from a signed registry whose manifest lets it leave.
        let reg = TestRegistry::new()?;
        reg.publish_dir(&minilm_dir().join("minilm"), "minilm", "1.0.0")?;
        let dir = tempfile::tempdir()?;
        let local = dir.path().join("models");
        std::fs::create_dir_all(&local)?;
        std::os::unix::fs::symlink(minilm_dir().join("minilm"), local.join("minilm"))?;

        // The overflow target: an Outpost on CPU 1 serving the same model.
        let target_cfg = dir.path().join("target.toml");
        std::fs::write(&target_cfg, config_text(&dir.path().join("target-state"), std::slice::from_ref(&local), ""))?;
        let (_target, target_addr) = spawn_pinned("1", &target_cfg)?;
        let golden = golden_for(&minilm_dir().join("minilm"))?;
        let body = golden.request(0);

        let models = "[models.minilm]\ninstances = 1\nmax_queue = 256\n";
        let mut rows = Vec::new();
        let mut runs: Vec<(String, Option<String>)> = vec![
            ("overflow off".into(), None),
            ("overflow on → Outpost target".into(), Some(format!("http://{target_addr}"))),
        ];
        if let Some(p) = &peer_url {
            runs.push((format!("overflow on → V2 peer ({p})"), Some(p.clone())));
        }
        for (label, target) in runs {
            let overflow = match &target {
                Some(url) => {
                    let remote = if Some(url) == peer_url.as_ref() { peer_model.clone() } else { "minilm".into() };
                    format!(
                        "[overflow]\nurl = {url:?}\nallow_http = true\nslo_p99 = \"{slo_ms}ms\"\ntimeout = \"2s\"\nbinary = false\n\n[models.minilm]\ninstances = 1\nmax_queue = 256\noverflow_model = {remote:?}\n"
                    )
                }
                None => models.to_owned(),
            };
            let state = dir.path().join(format!("edge-{}", rows.len()));
            let text = format!(
                "[node]\nsite = \"bench\"\nname = \"edge\"\nstate_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"3s\"\n\n{}\n{overflow}\n",
                state.display().to_string(),
                registry_toml(&reg.file_url(), &reg.root_json(), "")
            );
            let edge_cfg = dir.path().join(format!("edge-{}.toml", rows.len()));
            std::fs::write(&edge_cfg, text)?;
            let (mut edge, edge_addr) = spawn_pinned("0", &edge_cfg)?;
            let url = format!("http://{edge_addr}/v2/models/minilm/infer");
            // Warm-up at a quarter of the rate (the box learns its run time), then the measurement.
            load(&url, &body, rate / 4.0, 2.0).await?;
            let o = load(&url, &body, rate, seconds).await?;
            eprintln!(
                "{label}: offered {:.0}/s answered {:.1}/s p50 {:.1} ms p99 {:.1} ms errors {:.1}% upstream {:.1}%",
                o.offered, o.answered, o.p50, o.p99, o.errors, o.upstream
            );
            rows.push((label, o));
            edge.signal("TERM")?;
            let _ = edge.wait_status(Duration::from_secs(30));
        }
        println!("\nMiniLM-L6 fp32 (one 14-token sentence), open loop, {seconds} s per run, objective {slo_ms} ms\n");
        println!("| run | offered req/s | answered req/s | p50 ms | p99 ms | errors % | answered upstream % |");
        println!("|---|---|---|---|---|---|---|");
        for (label, o) in rows {
            println!(
                "| {label} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                o.offered, o.answered, o.p50, o.p99, o.errors, o.upstream
            );
        }
        Ok(())
    })
}
