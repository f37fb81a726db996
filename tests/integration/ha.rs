//! Two boxes, one site: keepalived moves the site address to the other box when the active
//! agent dies and its box's cable is cut, requests resume, and each box records its role.
//! Runs in network namespaces the test makes and removes (198.18.0.0/24 only); needs root and
//! skips with a message without it (CI runs as root).

use std::time::Duration;

use anyhow::{ensure, Result};
use outpost_tests::site::{is_root, now_ms, outage, Site, SiteOptions};
use outpost_tests::*;
use serde_json::Value;

use crate::outpost_bin;

/// The `ha` section of box `i`'s status, read inside its namespace.
fn role(site: &Site, i: usize) -> Result<Value> {
    let out = site.outpost_in(i, &["status", "--json"])?;
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(status["ha"].clone())
}

/// Waits (bounded) until box `i`'s agent shows `want` as its role.
fn wait_role(site: &Site, i: usize, want: &str) -> Result<()> {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = role(site, i)?;
        if r["role"] == want {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < end, "box {i} shows role {r}, not {want}\n{}", site.keepalived_log(i));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ha_records(site: &Site, i: usize) -> Result<Vec<String>> {
    let out = site.outpost_in(i, &["audit", "export"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["body"]["action"] == "ha_role")
        .map(|v| v["body"]["outcome"].as_str().unwrap_or_default().to_owned())
        .collect())
}

#[test]
fn the_site_address_moves_when_the_active_agent_dies_and_its_cable_is_cut() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the failover test makes network namespaces, which needs root");
        return Ok(());
    }
    let models = mlp_only()?;
    let mut site = Site::start(&outpost_bin(), models.path(), &SiteOptions::default())?;
    wait_role(&site, 0, "MASTER")?;
    wait_role(&site, 1, "BACKUP")?;
    let body = golden_for(&root().join("models/mlp"))?.request(0);
    ensure!(site.probe(&body, Duration::from_secs(30))?, "the site address does not answer");

    // A bounded load on the site address; box a's agent killed, then its cable cut.
    let load = site.load_until_recovered(&body, Duration::from_millis(20), 50, Duration::from_secs(90))?;
    let killed_at = now_ms();
    site.kill_agent(0)?;
    site.cable(0, false)?;
    site.wait_holder(1, Duration::from_secs(30))?;
    let results = load.finish()?;
    let (ms, failed) = outage(&results, killed_at);
    eprintln!("failover: {ms} ms until requests resumed, {failed} of {} requests failed", results.len());
    ensure!(ms < 20_000, "requests resumed only after {ms} ms");
    ensure!(results.iter().any(|(t, ok)| *t > killed_at + ms && *ok), "no answer after the failover");

    // Box b shows and recorded its new role.
    wait_role(&site, 1, "MASTER")?;
    ensure!(ha_records(&site, 1)?.iter().any(|o| o.starts_with("MASTER")), "box b recorded no MASTER role");

    // Box a back (cable, then agent): with preemption (the recipe's default) it takes the
    // address back, and its agent records the FAULT reported while it was down.
    site.cable(0, true)?;
    site.start_agent(0)?;
    site.wait_holder(0, Duration::from_secs(60))?;
    wait_role(&site, 0, "MASTER")?;
    let recorded = ha_records(&site, 0)?;
    ensure!(recorded.iter().any(|o| o.starts_with("FAULT")), "box a's records: {recorded:?}");
    ensure!(site.probe(&body, Duration::from_secs(30))?, "the site address does not answer after the return");
    Ok(())
}

#[test]
fn without_preemption_the_returning_box_stays_backup() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the failover test makes network namespaces, which needs root");
        return Ok(());
    }
    let models = mlp_only()?;
    let mut site =
        Site::start(&outpost_bin(), models.path(), &SiteOptions { nopreempt: true, ..SiteOptions::default() })?;
    site.kill_agent(0)?;
    site.wait_holder(1, Duration::from_secs(30))?;
    site.start_agent(0)?;
    wait_role(&site, 0, "BACKUP")?;
    ensure!(site.holds(1) && !site.holds(0), "the address moved back to box a despite nopreempt");
    Ok(())
}

/// The shipped recipe is a valid keepalived configuration.
#[test]
fn the_shipped_keepalived_recipe_passes_keepalived_config_test() -> Result<()> {
    let Ok(keepalived) = outpost_tests::site::keepalived_bin() else {
        anyhow::ensure!(!full_suite(), "keepalived is missing: scripts/setup-test.sh installs it");
        eprintln!("skipped: keepalived is not installed");
        return Ok(());
    };
    // As installed: the recipe names /usr/bin/outpost, here the test build.
    let recipe = std::fs::read_to_string(root().join("packaging/keepalived/keepalived.conf"))?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("keepalived.conf");
    std::fs::write(&conf, recipe.replace("/usr/bin/outpost", &outpost_bin().display().to_string()))?;
    let out = std::process::Command::new(keepalived).args(["--config-test", "--use-file"]).arg(&conf).output()?;
    ensure!(out.stderr.is_empty(), "keepalived --config-test: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "keepalived --config-test: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
