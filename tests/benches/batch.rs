//! Batch jobs: rows per second of a job on the MLP, and what a running job costs live
//! requests: live MLP latency with a job running against without one, same agent, same run.
//! One `outpost` process (audit log on, the defaults) pinned to CPU 0; this load generator (one
//! tokio thread) on CPU 1 by `scripts/bench-batch.sh`. Rounds alternate: live alone, live with
//! a job running, the job alone; medians reported.
//!
//!     cargo bench -p outpost-tests --bench batch -- [--seconds 5] [--rounds 3] [--clients 1]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_tests::*;
use serde_json::Value;

/// Most live requests one round sends (a bound beside the time).
const MAX_REQUESTS: usize = 1_000_000;
/// Rows of each job (more than a round answers).
const JOB_ROWS: usize = 400_000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

async fn live(http: &reqwest::Client, url: &str, body: &bytes::Bytes, clients: usize, seconds: f64) -> (f64, f64, f64) {
    let (rps, lat) = closed_loop(http, url, body, clients, seconds, MAX_REQUESTS).await;
    (rps, quantile(&lat, 0.5), quantile(&lat, 0.99))
}

async fn job_done(http: &reqwest::Client, base: &str, id: &str) -> Result<u64> {
    let v: Value = http.get(format!("{base}/v2/jobs/{id}")).send().await?.json().await?;
    Ok(v["done"].as_u64().unwrap_or(0))
}

async fn submit(http: &reqwest::Client, base: &str, rows: &Path) -> Result<String> {
    let body = tokio::fs::read(rows).await?;
    let v: Value = http.post(format!("{base}/v2/jobs?model=mlp")).body(body).send().await?.json().await?;
    v["id"].as_str().map(str::to_owned).context("no job id")
}

async fn cancel(http: &reqwest::Client, base: &str, id: &str) -> Result<()> {
    http.post(format!("{base}/v2/jobs/{id}/cancel")).send().await?;
    // Until the runner has stopped it (bounded).
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let v: Value = http.get(format!("{base}/v2/jobs/{id}")).send().await?.json().await?;
        if v["state"] == "cancelled" || v["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds").and_then(|s| s.parse::<f64>().ok()).unwrap_or(5.0).clamp(1.0, 120.0);
    let rounds: usize = arg(&args, "--rounds").and_then(|s| s.parse().ok()).unwrap_or(3).clamp(1, 20);
    let clients: usize = arg(&args, "--clients").and_then(|s| s.parse().ok()).unwrap_or(1).clamp(1, 64);
    outpost::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let models = mlp_only()?;
        let state = tempfile::tempdir()?;
        let config = state.path().join("outpost.toml");
        std::fs::write(&config, config_text(state.path(), &[models.path().to_owned()], ""))?;
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"));
        let args = ["-c", "0", bin.to_str().context("path")?, "run", "--config", config.to_str().context("path")?];
        let mut agent = ChildAgent::spawn_env(Path::new("taskset"), &args, &[("RUST_LOG", "warn,outpost=info")])?;
        let base = format!("http://{}", agent.wait_listening()?);
        agent.wait_for("initial model load finished", Duration::from_secs(120))?;
        let golden = golden_for(&root().join("models/mlp"))?;
        let body = bytes::Bytes::from(serde_json::to_vec(&golden.request(0))?);
        let rows = state.path().join("rows.ndjson");
        let line = format!("{}\n", golden.request(1));
        std::fs::write(&rows, line.repeat(JOB_ROWS))?;
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).tcp_nodelay(true).build()?;
        let url = format!("{base}/v2/models/mlp/infer");
        let (mut alone, mut with_job, mut job_alone, mut job_beside) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            alone.push(live(&http, &url, &body, clients, seconds).await);
            let id = submit(&http, &base, &rows).await?;
            let (t, d0) = (Instant::now(), job_done(&http, &base, &id).await?);
            with_job.push(live(&http, &url, &body, clients, seconds).await);
            job_beside.push((job_done(&http, &base, &id).await? - d0) as f64 / t.elapsed().as_secs_f64());
            let (t, d0) = (Instant::now(), job_done(&http, &base, &id).await?);
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            job_alone.push((job_done(&http, &base, &id).await? - d0) as f64 / t.elapsed().as_secs_f64());
            cancel(&http, &base, &id).await?;
        }
        let col =
            |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
        println!(
            "| live MLP ({clients} client{}) | req/s | p50 ms | p99 ms | job rows/s meanwhile |",
            if clients == 1 { "" } else { "s" }
        );
        println!("|---|---|---|---|---|");
        println!(
            "| no job | {:.0} | {:.2} | {:.2} | - |",
            col(&alone, |r| r.0),
            col(&alone, |r| r.1),
            col(&alone, |r| r.2)
        );
        println!(
            "| a job running | {:.0} | {:.2} | {:.2} | {:.0} |",
            col(&with_job, |r| r.0),
            col(&with_job, |r| r.1),
            col(&with_job, |r| r.2),
            median(&mut job_beside)
        );
        println!("| the job alone | - | - | - | {:.0} |", median(&mut job_alone));
        agent.signal("TERM")?;
        let _ = agent.wait_exit(Duration::from_secs(30));
        Ok(())
    })
}
