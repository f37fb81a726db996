//! Audit log figures for BENCHMARKS.md (JSON lines): on-disk size vs logical size over 1M
//! records with sync-and-delete cycles (`--records`, 0 skips it), then HTTP throughput on the
//! MLP with the audit log on vs off at concurrency 8 and 64.
//!
//! ```text
//! cargo bench -p outpost --bench audit -- [--records 1000000] [--seconds 5] [--rounds 2]
//!     [--audit on|off] [--concurrency 8,64] [--commit-delay 0s]
//! ```
//!
//! `--audit` and `--concurrency` pick points of the throughput part (e.g. to profile one);
//! `--commit-delay` sets `audit.group_commit_max_delay`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::audit::{Audit, AuditConfig};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            total += if m.is_dir() { dir_size(&e.path()) } else { m.len() };
        }
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let records: u64 = arg(&args, "--records").and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let seconds: u64 = arg(&args, "--seconds").and_then(|s| s.parse().ok()).unwrap_or(5);
    let rounds: usize = arg(&args, "--rounds").and_then(|s| s.parse().ok()).unwrap_or(2);
    let audit: Vec<bool> = match arg(&args, "--audit").as_deref() {
        Some("on") => vec![true],
        Some("off") => vec![false],
        _ => vec![true, false],
    };
    let concurrency: Vec<usize> = arg(&args, "--concurrency")
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![8, 64]);
    // `audit.group_commit_max_delay` for the throughput part.
    let delay = arg(&args, "--commit-delay").unwrap_or_else(|| "0s".into());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if records > 0 {
        rt.block_on(disk_amplification(records));
    }
    let points: Vec<(bool, usize)> =
        (0..rounds).flat_map(|_| audit.iter().flat_map(|&a| concurrency.iter().map(move |&c| (a, c)))).collect();
    rt.block_on(throughput(seconds, &points, &delay));
}

async fn disk_amplification(records: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit =
        Audit::open(dir.path(), &AuditConfig { quota_bytes: u64::MAX, ..AuditConfig::default() }, None).expect("audit");
    let body = serde_json::json!({
        "kind": "inference", "request_id": "1764370000000-12345", "principal": "pos-terminal-3",
        "transport": "http", "model": "mlp", "version": "1.0.0", "route": "local", "status": "ok",
        "latency_us": 412, "input_digest": "5d41402abc4b2a76b9719d911017c592a2b6c0f6f1e0a1e7f5d8c3c1b4e4f0a9",
        "parameters": {}
    });
    let cycles = 10;
    let per_cycle = records / cycles;
    let started = Instant::now();
    let mut peak_disk = 0u64;
    let mut logical_total = 0u64;
    for cycle in 0..cycles {
        let mut pending = Vec::with_capacity(1000);
        for _ in 0..per_cycle {
            pending.push(audit.append(body.clone()));
            if pending.len() == 1000 {
                for r in futures::future::join_all(pending.drain(..)).await {
                    r.expect("append");
                }
            }
        }
        for r in futures::future::join_all(pending.drain(..)).await {
            r.expect("append");
        }
        logical_total = logical_total.max(audit.retained_bytes());
        peak_disk = peak_disk.max(dir_size(dir.path()));
        // Sync-and-delete: everything but the last cycle's records went upstream and is pruned.
        let head = audit.head_seq();
        audit.mark_sent(head.saturating_sub(per_cycle / 10)).expect("mark");
        audit.prune(i64::MAX).expect("prune");
        let disk = dir_size(dir.path());
        peak_disk = peak_disk.max(disk);
        println!(
            "{{\"bench\":\"audit_disk\",\"cycle\":{cycle},\"appended\":{},\"retained_bytes\":{},\"disk_bytes\":{disk}}}",
            (cycle + 1) * per_cycle,
            audit.retained_bytes()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let appended = cycles * per_cycle;
    // Logical size: what 1M records weigh as stored values.
    let logical_all =
        appended * (audit.retained_bytes().max(1) / (audit.head_seq() - audit.sent_seq().unwrap_or(0)).max(1));
    println!(
        "{{\"bench\":\"audit_summary\",\"records\":{appended},\"records_per_s\":{:.0},\"fsyncs\":{},\"logical_bytes_all\":{logical_all},\"peak_retained_bytes\":{logical_total},\"peak_disk_bytes\":{peak_disk},\"final_disk_bytes\":{},\"final_retained_bytes\":{}}}",
        appended as f64 / secs,
        audit.fsyncs(),
        dir_size(dir.path()),
        audit.retained_bytes()
    );
}

async fn throughput(seconds: u64, points: &[(bool, usize)], delay: &str) {
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mlp/golden.json")).expect("golden"),
    )
    .expect("json");
    let body = serde_json::to_vec(&serde_json::json!({ "inputs": golden["cases"][0]["inputs"] })).expect("body");
    for &(audit_on, concurrency) in points {
        let state = tempfile::tempdir().expect("state");
        let models = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");
        let text = format!(
            "[node]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[local_models]\ndirs = [{:?}]\n[audit]\nenabled = {audit_on}\ngroup_commit_max_delay = {delay:?}\n[models.mlp]\nmax_queue = 1024\n",
            state.path().display().to_string(),
            models
        );
        let path = state.path().join("bench.toml");
        std::fs::write(&path, text).expect("config");
        let agent = outpost::start(outpost::config::Config::load(&path).expect("config")).await.expect("agent");
        agent.started().await;
        let url = format!("http://{}/v2/models/mlp/infer", agent.addr());
        let client = reqwest::Client::new();
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, body, stop, count, errors) =
                (client.clone(), url.clone(), body.clone(), stop.clone(), count.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match client.post(&url).body(body.clone()).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            count.fetch_add(1, Ordering::Relaxed);
                            lat.push(t.elapsed());
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        let elapsed = started.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| lat.get(((lat.len().max(1) - 1) as f64 * q) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let fsyncs = agent.audit().map_or(0, |a| a.fsyncs());
        println!(
            "{{\"bench\":\"http_audit\",\"audit\":{audit_on},\"concurrency\":{concurrency},\"req_per_s\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"errors\":{},\"fsyncs\":{fsyncs}}}",
            count.load(Ordering::Relaxed) as f64 / elapsed,
            p(0.5),
            p(0.99),
            errors.load(Ordering::Relaxed)
        );
        agent.shutdown().await.expect("shutdown");
    }
}
