//! Shadow traffic's cost to live requests: the MLP served with a shadow candidate taking a
//! copy of every request (share 1.0) against the same agent setup without one, same run.
//! Two `outpost` processes (pinned versions 1.0.0 and 1.1.0 from a signed test registry;
//! 1.1.0 answers, 1.0.0 shadows) pinned to CPU 0, the idle one asleep; this load generator
//! (one tokio thread) is pinned to CPU 1 by `scripts/bench-shadow.sh`. Closed loop over
//! HTTP/1.1 keep-alive (V2 JSON), rounds alternating between the two agents; the median
//! round and the range are reported, with the shadow's own counts.
//!
//!     cargo bench -p outpost-tests --bench shadow -- [--seconds 5] [--rounds 3]
//!         [--concurrency 1,8]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use outpost_tests::registry::{StaticServer, TestRegistry};
use outpost_tests::*;

/// Most requests one round sends (a bound beside the time).
const MAX_REQUESTS: usize = 2_000_000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn spawn_agent(config: &Path) -> Result<(ChildAgent, String)> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"));
    let args = ["-c", "0", bin.to_str().context("path")?, "run", "--config", config.to_str().context("path")?];
    let mut child = ChildAgent::spawn_env(Path::new("taskset"), &args, &[("RUST_LOG", "warn,outpost=info")])?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(120))?;
    Ok((child, format!("http://{addr}")))
}

struct Round {
    rps: f64,
    p50: f64,
    p99: f64,
}

async fn round(http: &reqwest::Client, url: &str, body: &bytes::Bytes, clients: usize, seconds: f64) -> Round {
    let (rps, lat) = closed_loop(http, url, body, clients, seconds, MAX_REQUESTS).await;
    Round { rps, p50: quantile(&lat, 0.5), p99: quantile(&lat, 0.99) }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = arg(&args, "--seconds").and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let rounds: usize = arg(&args, "--rounds").and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let conc: Vec<usize> =
        arg(&args, "--concurrency").unwrap_or_else(|| "1,8".into()).split(',').filter_map(|c| c.parse().ok()).collect();
    outpost::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let reg = TestRegistry::new()?;
        reg.publish("mlp", "mlp", "1.0.0")?;
        reg.publish("mlp-int8-qdq", "mlp", "1.1.0")?;
        let server = StaticServer::start(reg.path()).await?;
        let pinned = "[audit]\nenabled = false\n\n[models.mlp]\nversion_policy = \"pinned\"\n\
                      versions = [\"1.0.0\", \"1.1.0\"]\nmax_batch = 8\nmax_queue_delay = \"0s\"\n";
        let shadowed = format!("{pinned}\n[models.mlp.shadow]\nversion = \"1.0.0\"\nshare = 1.0\n");
        let mut agents = Vec::new();
        let mut states = Vec::new();
        for (label, extra) in [("no shadow", pinned.to_owned()), ("shadow, share 1.0", shadowed)] {
            let state = tempfile::tempdir()?;
            let config = state.path().join("outpost.toml");
            std::fs::write(
                &config,
                config_text(state.path(), &[], &registry_toml(&server.url(), &reg.root_json(), &extra)),
            )?;
            let (child, base) = spawn_agent(&config)?;
            agents.push((label, child, base));
            states.push(state);
        }
        let golden = golden_for(&root().join("models/mlp-int8-qdq"))?;
        let body = bytes::Bytes::from(serde_json::to_vec(&golden.request(0))?);
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).tcp_nodelay(true).build()?;
        println!(
            "| clients | agent | req/s | req/s range | p50 ms | p99 ms | shadow compared | shadow dropped (busy) |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for &c in &conc {
            let mut results: Vec<Vec<Round>> = agents.iter().map(|_| Vec::new()).collect();
            for r in 0..rounds {
                for k in 0..agents.len() {
                    let i = (k + r) % agents.len();
                    let url = format!("{}/v2/models/mlp/infer", agents[i].2);
                    // Warm-up: connections open.
                    for _ in 0..20 {
                        let _ = http.post(&url).body(body.clone()).send().await;
                    }
                    results[i].push(round(&http, &url, &body, c, seconds).await);
                }
            }
            for ((label, _, base), mut rs) in agents.iter().zip(results) {
                rs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                let (low, high) = (rs[0].rps, rs[rs.len() - 1].rps);
                let m = &rs[rs.len() / 2];
                let report: serde_json::Value =
                    http.get(format!("{base}/admin/experiments/mlp")).send().await?.json().await.unwrap_or_default();
                let sh = &report["shadow"];
                println!(
                    "| {c} | {label} | {:.0} | {low:.0}–{high:.0} | {:.3} | {:.3} | {} | {} |",
                    m.rps,
                    m.p50,
                    m.p99,
                    sh["compared"].as_u64().map_or("-".into(), |n| n.to_string()),
                    sh["dropped_busy"].as_u64().map_or("-".into(), |n| n.to_string()),
                );
            }
        }
        for (_, mut child, _) in agents {
            child.signal("TERM")?;
            child.wait_exit(Duration::from_secs(30))?;
        }
        Ok(())
    })
}
