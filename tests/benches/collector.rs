//! The fleet collector on this machine, against a real PostgreSQL (a cluster started here,
//! fsync on, as in production):
//! - audit records stored per second, one collector and two on one database, same run;
//! - heartbeats of `--nodes` simulated nodes at one a second each: handling time p50/p99;
//! - audit lag from an agent's answer to its record's row in PostgreSQL, p50/p99, at the
//!   default `upstream.flush_interval` (1 s) and at 100 ms.
//!
//! ```text
//! cargo bench -p outpost-tests --bench collector -- [--records 200000] [--nodes 1000] [--seconds 10]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use outpost_tests::collector::Collector;
use outpost_tests::postgres::Postgres;
use outpost_tests::*;
use serde_json::json;

const BATCH: usize = 500;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// `n` simulated nodes `sim-<i>` with tokens `tok-<i>`, inserted directly.
fn nodes(pg: &Postgres, n: usize) -> Result<()> {
    pg.psql(&format!(
        "INSERT INTO nodes (node, token_sha256, enrolled_ms) SELECT 'sim-' || i, \
         encode(sha256(('tok-' || i)::bytea), 'hex'), 0 FROM generate_series(1, {n}) i ON CONFLICT DO NOTHING"
    ))?;
    Ok(())
}

/// `batches` zstd batches of one node's chain, `BATCH` records each, linked from genesis.
fn chain_batches(batches: usize) -> Vec<Vec<u8>> {
    let mut prev = outpost_proto::audit::GENESIS.to_owned();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let mut seq = 0u64;
    (0..batches)
        .map(|_| {
            let mut text = String::new();
            for _ in 0..BATCH {
                seq += 1;
                let body = json!({"kind": "inference", "model": "mlp", "version": "1", "request_id": format!("r{seq}"),
                    "principal": "pos", "outcome": "ok", "latency_us": 41, "inputs_sha256": "ab".repeat(32)});
                let t = now + seq as i64;
                let hash = outpost_proto::audit::Record::compute_hash(seq, t, &prev, &body);
                text.push_str(&json!({"seq": seq, "time_ms": t, "prev": prev, "hash": hash, "body": body}).to_string());
                text.push('\n');
                prev = hash;
            }
            zstd::bulk::compress(text.as_bytes(), 3).unwrap_or_default()
        })
        .collect()
}

/// Stores `records` across 8 nodes through `urls` (node i to collector i mod n); records/s.
async fn store_rate(pg: &Postgres, urls: &[String], records: usize, first_node: usize) -> Result<f64> {
    let per_node = (records / 8 / BATCH).max(1);
    let http = http_client();
    let mut tasks = Vec::new();
    let chains: Vec<Vec<Vec<u8>>> = (0..8).map(|_| chain_batches(per_node)).collect();
    let started = Instant::now();
    for (i, batches) in chains.into_iter().enumerate() {
        let url = format!("{}/v1/audit", urls[i % urls.len()]);
        let http = http.clone();
        let node = first_node + i;
        tasks.push(tokio::spawn(async move {
            for b in batches {
                let r = http
                    .post(&url)
                    .bearer_auth(format!("tok-{node}"))
                    .header("Content-Encoding", "zstd")
                    .body(b)
                    .send()
                    .await?;
                ensure!(r.status().is_success(), "HTTP {}", r.status());
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let stored: usize = pg
        .psql(&format!(
            "SELECT count(*) FROM audit_records WHERE node IN ({})",
            (first_node..first_node + 8).map(|i| format!("'sim-{i}'")).collect::<Vec<_>>().join(",")
        ))?
        .parse()?;
    ensure!(stored == per_node * BATCH * 8, "stored {stored}");
    Ok(stored as f64 / secs)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let records = arg("--records", 200_000) as usize;
    let n_nodes = arg("--nodes", 1000) as usize;
    let seconds = arg("--seconds", 10);
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_outpost-collector-under-test"));
    let pg = Postgres::start()?;
    let c1 = Collector::start(&bin, &pg.dsn())?;
    let c2 = Collector::start(&bin, &pg.dsn())?;
    nodes(&pg, n_nodes.max(1008))?;
    // A warm-up pass creates the day partition and the connections.
    store_rate(&pg, std::slice::from_ref(&c1.url), 8 * BATCH, 1000).await.ok();
    println!("| collectors | records stored | records/s |\n|---|---|---|");
    let one = store_rate(&pg, std::slice::from_ref(&c1.url), records, 1).await?;
    println!("| 1 | {records} | {one:.0} |");
    let two = store_rate(&pg, &[c1.url.clone(), c2.url.clone()], records, 9).await?;
    println!("| 2 | {records} | {two:.0} |");

    // Heartbeats: every node once a second, spread over the second.
    let http = http_client();
    let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 1..=n_nodes {
        let (http, lat, errors, url) = (http.clone(), lat.clone(), errors.clone(), format!("{}/v1/heartbeat", c1.url));
        tasks.push(tokio::spawn(async move {
            let offset = Duration::from_micros((i as u64 * 1_000_000 / n_nodes as u64) % 1_000_000);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(1));
            let body = json!({"models": [{"name": "mlp", "version": "3", "state": "READY", "plan": "as-published"}],
                "alarms": [], "audit": {"head_seq": 0, "sent_seq": 0, "backlog_records": 0}})
            .to_string();
            for _ in 0..seconds {
                tick.tick().await;
                let t = Instant::now();
                let r = http.post(&url).bearer_auth(format!("tok-{i}")).body(body.clone()).send().await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        if let Ok(mut l) = lat.lock() {
                            l.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    let n = l.len();
    println!(
        "\nheartbeats: {n_nodes} nodes × {seconds} s: {n} answered ({:.0}/s), {} errors; handling ms p50 {:.2}, p99 {:.2}, max {:.2}",
        n as f64 / wall,
        errors.load(std::sync::atomic::Ordering::Relaxed),
        pct(&mut l, 0.5),
        pct(&mut l, 0.99),
        pct(&mut l, 1.0)
    );

    // Audit lag: an agent's answer to its record's row.
    println!("\n| flush_interval | requests | lag p50 ms | lag p99 ms |\n|---|---|---|---|");
    for (k, flush) in ["1s", "100ms"].iter().enumerate() {
        let node = format!("lag-{k}");
        let token = outpost_tests::collector::enroll(&bin, &pg.dsn(), &node, None)?;
        let state = tempfile::tempdir()?;
        std::fs::write(state.path().join("upstream.token"), &token)?;
        let extra = format!(
            "[upstream]\nurl = \"{}\"\nallow_http = true\ntoken_file = {:?}\nflush_interval = \"{flush}\"\n",
            c1.url,
            state.path().join("upstream.token").display().to_string()
        );
        let text = config_text(state.path(), &[root().join("models")], &extra)
            .replace("name = \"test-node\"", &format!("name = \"{node}\""));
        let agent = TestAgent::start_text(state, &text, "http", http_client()).await?;
        let golden = golden_for(&root().join("models/mlp"))?;
        let mut answered = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for i in 0..200 {
            tick.tick().await;
            let mut body = golden.request(i % 3);
            body["id"] = json!(format!("{node}-{i}"));
            let (s, _) = agent.post("/v2/models/mlp/infer", &body).await?;
            ensure!(s == 200);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            answered.push(now);
        }
        let end = Instant::now() + Duration::from_secs(60);
        let rows = loop {
            let out = pg.psql(&format!(
                "SELECT body::jsonb->>'request_id', received_ms FROM audit_records WHERE node = '{node}' \
                 AND body::jsonb->>'kind' = 'inference'"
            ))?;
            let rows: Vec<(usize, i64)> = out
                .lines()
                .filter_map(|l| {
                    let (id, ms) = l.split_once('|')?;
                    Some((id.rsplit('-').next()?.parse().ok()?, ms.parse().ok()?))
                })
                .collect();
            if rows.len() >= 200 || Instant::now() > end {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut lags: Vec<f64> = rows.iter().map(|(i, ms)| (ms - answered[*i]) as f64).collect();
        println!("| {flush} | {} | {:.0} | {:.0} |", lags.len(), pct(&mut lags, 0.5), pct(&mut lags, 0.99));
        agent.stop().await?;
    }
    drop((c1, c2));
    Ok(())
}
