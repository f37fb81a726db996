//! Two boxes, one site: keepalived moves the site address to the other box when the active
//! agent dies and its box's cable is cut, requests resume, and each box records its role.
//! Runs in network namespaces the test makes and removes (198.18.0.0/24 only); needs root and
//! skips with a message without it (CI runs as root).

use std::time::Duration;

use anyhow::{ensure, Result};
use outpost_tests::site::{is_root, now_ms, outage, Site, SiteOptions};
use outpost_tests::*;
use serde_json::{json, Value};

use crate::{model_list, outpost_bin};

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

/// Polls `cond` on an agent's status (bounded).
async fn wait_status(agent: &TestAgent, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = agent.get("/admin/status").await?;
        if cond(&status) {
            return Ok(status);
        }
        ensure!(std::time::Instant::now() < end, "{what}: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_rejected_on_one_box_is_never_promoted_on_the_other() -> Result<()> {
    use crate::lifecycle::{drive_canary, fixture, CANARY};
    use outpost_tests::broker::{Broker, BrokerOptions};
    use outpost_tests::registry::{StaticServer, TestRegistry};

    let broker = Broker::start(BrokerOptions::default())?;
    let reg = TestRegistry::new()?;
    reg.publish("mlp", "mlp", "2.0.0")?;
    let server = StaticServer::start(reg.path()).await?;
    let (state_a, state_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    for s in [&state_a, &state_b] {
        outpost::registry::KeyPair::generate()?.save(&s.path().join("node"), None)?;
    }
    let text = |me: &tempfile::TempDir, name: &str, peer: &tempfile::TempDir| {
        let extra = format!(
            "{}\n{}\n[ha]\npeer_keys = [{:?}]\n",
            registry_toml(&server.url(), &reg.root_json(), CANARY),
            outpost_tests::mqtt::mqtt_toml(&broker.url(), ""),
            peer.path().join("node.pub").display().to_string()
        );
        config_text(me.path(), &[], &extra).replace("name = \"test-node\"", &format!("name = \"{name}\""))
    };
    let (text_a, text_b) = (text(&state_a, "box-a", &state_b), text(&state_b, "box-b", &state_a));
    let a = TestAgent::start_text(state_a, &text_a, "http", http_client()).await?;

    // Box a runs 3.0.0 as a canary and rolls it back (it fails some requests).
    reg.publish_dir(&fixture("mlp-flaky"), "mlp", "3.0.0")?;
    let report = a.agent.poll_registry().await?;
    ensure!(report.canaries == [("mlp".to_owned(), "3.0.0".to_owned())], "{report:?}");
    drive_canary(&a, &[0, 1], 400).await?;
    ensure!(a.agent.service().repository.canary_version("mlp").is_none(), "box a did not roll 3.0.0 back");
    wait_status(&a, "box a shares its verdict", |s| s["verdicts"]["published"] == 1).await?;

    // Box b starts after the verdict: it gets it (retained), and never installs 3.0.0.
    let b = TestAgent::start_text(state_b, &text_b, "http", http_client()).await?;
    let status = wait_status(&b, "box b gets the verdict", |s| s["verdicts"]["received"].as_u64() >= Some(1)).await?;
    ensure!(status["verdicts"]["last_from"] == "box-a", "{status}");
    let metrics = b.http.get(b.url("/metrics")).send().await?.text().await?;
    ensure!(metrics.contains("outpost_ha_verdict_last_sync_timestamp_seconds "), "no verdict sync metric");
    let report = b.agent.poll_registry().await?;
    ensure!(
        report.canaries.is_empty() && report.installed.is_empty(),
        "box b installed a rejected version: {report:?}"
    );
    ensure!(
        b.agent.service().repository.versions("mlp") == ["2.0.0"],
        "box b serves {:?}",
        b.agent.service().repository.versions("mlp")
    );
    let list = model_list(&b.config_path())?;
    ensure!(list.contains("3.0.0") && list.contains("rejected by the site's other box box-a"), "{list}");

    // Both running: 3.1.0 starts as a canary on both; box a rolls it back (too slow), and box
    // b takes its own canary back without deciding anything itself.
    reg.publish_dir(&fixture("mlp-slow"), "mlp", "3.1.0")?;
    for agent in [&a, &b] {
        let report = agent.agent.poll_registry().await?;
        ensure!(report.canaries == [("mlp".to_owned(), "3.1.0".to_owned())], "{report:?}");
    }
    drive_canary(&a, &[0], 400).await?;
    ensure!(a.agent.service().repository.canary_version("mlp").is_none(), "box a did not roll 3.1.0 back");
    wait_status(&b, "box b takes 3.1.0 back", |s| s["verdicts"]["received"].as_u64() >= Some(2)).await?;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while b.agent.service().repository.canary_version("mlp").is_some() {
        ensure!(std::time::Instant::now() < end, "box b still runs the canary box a rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        b.agent.service().repository.versions("mlp") == ["2.0.0"],
        "{:?}",
        b.agent.service().repository.versions("mlp")
    );
    b.agent.poll_registry().await?;
    ensure!(b.agent.service().repository.versions("mlp") == ["2.0.0"], "box b reinstalled a rejected version");

    // A verdict signed by a key outside the site is ignored: 2.0.0 keeps serving on box b.
    let sha = reg.index()?.models["mlp"]
        .iter()
        .find(|e| e.version == "2.0.0")
        .map(|e| e.manifest.sha256.clone())
        .unwrap_or_default();
    let payload = json!({
        "_type": "verdict", "site": "test-site", "node": "box-a", "model": "mlp", "version": "2.0.0",
        "manifest_sha256": sha, "reason": "forged", "at": 0,
    });
    let stranger = outpost::registry::KeyPair::generate()?;
    let forged = outpost::registry::dsse::Envelope::sign(
        outpost::verdicts::VERDICT_TYPE,
        &serde_json::to_vec(&payload)?,
        &[&stranger],
    )
    .to_bytes();
    let port = broker.url().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let requester = outpost_tests::mqtt::Requester::connect(port, "forger", None, None).await?;
    requester.send_raw(&format!("outpost/test-site/verdicts/mlp/{sha}"), "x", forged).await?;
    wait_status(&b, "box b ignores the forged verdict", |s| s["verdicts"]["ignored"].as_u64() >= Some(1)).await?;
    ensure!(b.agent.service().repository.versions("mlp") == ["2.0.0"], "a forged verdict took 2.0.0 down");
    let golden = golden_for(&root().join("models/mlp"))?;
    let (code, answer) = b.post("/v2/models/mlp/infer", &golden.request(0)).await?;
    ensure!(code == 200 && answer["model_version"] == "2.0.0", "{answer}");
    a.stop().await?;
    b.stop().await
}
