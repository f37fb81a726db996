//! Two-box failover: how long LAN clients wait, and how many of their requests fail, when the
//! active box's agent is killed (kill -9), and when its cable is cut at the same moment (the
//! box is gone), at several VRRP advertisement intervals. The pair
//! runs in network namespaces (`outpost_tests::site`, the shipped keepalived recipe); a client
//! sends one MLP request every 20 ms (0.5 s timeout) to the site address. Each kill: the load
//! runs until 50 requests in a row are answered after a failure; then the agent restarts and
//! the preferred box takes the address back before the next kill. Needs root.
//!
//!     cargo bench -p outpost-tests --bench failover -- [--kills 10] [--intervals 1,2,3]

use std::time::Duration;

use anyhow::{ensure, Result};
use outpost_tests::site::{is_root, now_ms, outage, Site, SiteOptions};
use outpost_tests::*;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !is_root() {
        eprintln!("the failover bench makes network namespaces: run it as root");
        return Ok(());
    }
    let kills: usize = arg(&args, "--kills").and_then(|v| v.parse().ok()).unwrap_or(10).clamp(1, 100);
    let intervals: Vec<u32> = arg(&args, "--intervals")
        .unwrap_or_else(|| "1,2,3".into())
        .split(',')
        .filter_map(|v| v.parse().ok())
        .filter(|v| (1..=10).contains(v))
        .collect();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_outpost-under-test"));
    let models = mlp_only()?;
    let body = golden_for(&root().join("models/mlp"))?.request(0);
    println!("| what fails | advert_int | kills | failover p50 (ms) | max (ms) | failed requests p50 | max | requests sent |");
    println!("|---|---|---|---|---|---|---|---|");
    for (what, cut) in [("agent kill -9", false), ("agent kill -9 + cable cut", true)] {
        for &advert_int in &intervals {
            let mut site = Site::start(&bin, models.path(), &SiteOptions { advert_int, nopreempt: false })?;
            let (mut times, mut failures, mut sent) = (Vec::new(), Vec::new(), 0);
            for _ in 0..kills {
                ensure!(site.probe(&body, Duration::from_secs(60))?, "the site address does not answer");
                let load = site.load_until_recovered(&body, Duration::from_millis(20), 50, Duration::from_secs(120))?;
                let killed = now_ms();
                site.kill_agent(0)?;
                if cut {
                    site.cable(0, false)?;
                }
                // Box a, cut off, still believes it holds the address: only b is watched.
                let end = std::time::Instant::now() + Duration::from_secs(60);
                while !site.holds(1) {
                    ensure!(std::time::Instant::now() < end, "box b never took the address");
                    std::thread::sleep(Duration::from_millis(20));
                }
                let results = load.finish()?;
                let (ms, failed) = outage(&results, killed);
                times.push(ms);
                failures.push(failed as i64);
                sent += results.len();
                if cut {
                    site.cable(0, true)?;
                }
                site.start_agent(0)?;
                site.wait_holder(0, Duration::from_secs(60))?;
            }
            times.sort_unstable();
            failures.sort_unstable();
            println!(
                "| {what} | {advert_int} s | {kills} | {} | {} | {} | {} | {sent} |",
                percentile(&times, 0.5),
                times.last().copied().unwrap_or(0),
                percentile(&failures, 0.5),
                failures.last().copied().unwrap_or(0),
            );
        }
    }
    Ok(())
}
