//! The fleet side: real agents shipping to real `outpost-collector` processes on one real
//! PostgreSQL cluster (started by each test with `initdb` on a free loopback port).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use outpost_tests::collector::{self, Collector};
use outpost_tests::postgres::Postgres;
use outpost_tests::{config_text, golden_for, http_client, root, TestAgent};
use serde_json::{json, Value};

use crate::collector_bin;

/// Starts an agent named `node` shipping to `urls` with `token`.
async fn agent(node: &str, urls: &[&str], token: &str, extra: &str) -> Result<TestAgent> {
    agent_in(tempfile::tempdir()?, node, urls, token, extra).await
}

async fn agent_in(state: tempfile::TempDir, node: &str, urls: &[&str], token: &str, extra: &str) -> Result<TestAgent> {
    let token_file = state.path().join("upstream.token");
    std::fs::write(&token_file, token)?;
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let upstream = format!(
        "[upstream]\nurls = [{}]\nallow_http = true\ntoken_file = {:?}\nflush_interval = \"50ms\"\n\
         heartbeat_interval = \"100ms\"\ntimeout = \"5s\"\n{extra}",
        urls.join(", "),
        token_file.display().to_string()
    );
    let text = config_text(state.path(), &[root().join("models")], &upstream)
        .replace("name = \"test-node\"", &format!("name = \"{node}\""));
    TestAgent::start_text(state, &text, "http", http_client()).await
}

/// Waits (bounded) until the collector's stored head of `node` is the agent's own head.
async fn wait_synced(pg: &Postgres, node: &str, agent: &TestAgent) -> Result<u64> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let head = agent.agent.audit().map(|a| a.head_seq()).unwrap_or(0);
        let stored: u64 =
            pg.psql(&format!("SELECT coalesce(max(head_seq), 0) FROM chains WHERE node = '{node}'"))?.parse()?;
        if stored == head && head > 0 {
            return Ok(head);
        }
        if Instant::now() > end {
            bail!("{node}: the collector holds up to {stored}, the agent's head is {head}");
        }
        agent.agent.wake_outbox();
        // Condition polling of the database (bounded above), not a synchronising sleep.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The alarm kinds raised for `node`.
fn alarm_kinds(pg: &Postgres, node: &str) -> Result<Vec<String>> {
    let out = pg.psql(&format!("SELECT kind FROM chain_alarms WHERE node = '{node}' ORDER BY id"))?;
    Ok(out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// Inference requests through `agent` with ids `<node>-<i>`; returns the ids answered 200.
async fn infer(agent: &TestAgent, node: &str, range: std::ops::Range<usize>) -> Result<Vec<String>> {
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut ok = Vec::new();
    for i in range {
        let mut body = golden.request(i % 3);
        let id = format!("{node}-{i}");
        body["id"] = json!(id);
        if agent.post("/v2/models/mlp/infer", &body).await?.0 == 200 {
            ok.push(id);
        }
    }
    Ok(ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_two_collectors_and_a_kill_9_store_every_answered_record_once_in_order() -> Result<()> {
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let mut c1 = Collector::start(&bin, &pg.dsn())?;
    let c2 = Collector::start(&bin, &pg.dsn())?;
    let nodes = ["till-1", "till-2", "till-3"];
    let mut agents = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let token = collector::enroll(&bin, &pg.dsn(), node, None)?;
        // Two agents try the first collector first, one the second.
        let urls = if i < 2 { [c1.url.as_str(), c2.url.as_str()] } else { [c2.url.as_str(), c1.url.as_str()] };
        agents.push(agent(node, &urls, &token, "").await?);
    }
    let agents = std::sync::Arc::new(agents);
    // Traffic on every agent while the first collector is killed mid-stream.
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let agents = agents.clone();
        let node = node.to_string();
        tasks.push(tokio::spawn(async move { infer(&agents[i], &node, 0..150).await }));
    }
    let end = Instant::now() + Duration::from_secs(60);
    while pg.psql("SELECT count(*) FROM audit_records")?.parse::<u64>()? < 60 {
        ensure!(Instant::now() < end, "no records reached the collectors");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c1.kill_9()?;
    let mut answered: HashMap<String, Vec<String>> = HashMap::new();
    for (task, node) in tasks.into_iter().zip(nodes) {
        answered.insert(node.to_owned(), task.await??);
    }
    for (agent, node) in agents.iter().zip(nodes) {
        let head = wait_synced(&pg, node, agent).await?;
        let stats = pg.psql(&format!(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM audit_records WHERE node = '{node}'"
        ))?;
        let v: Vec<u64> = stats.split('|').map(|x| x.parse().unwrap_or(0)).collect();
        assert_eq!(v[0], v[1], "{node}: a seq stored twice ({stats})");
        assert_eq!((v[2], v[3]), (1, head), "{node}: stored 1..={head} ({stats})");
        assert_eq!(v[0], head, "{node}: no gap ({stats})");
        let ids = pg.psql(&format!(
            "SELECT body::jsonb->>'request_id' FROM audit_records WHERE node = '{node}' \
             AND body::jsonb->>'kind' = 'inference' ORDER BY seq"
        ))?;
        let stored: Vec<&str> = ids.lines().collect();
        for id in &answered[node] {
            let n = stored.iter().filter(|s| *s == id).count();
            assert_eq!(n, 1, "{node}: answered request {id} stored {n} times");
        }
        // In order: the answered ids of one client appear in the order it sent them.
        let order: Vec<&str> = stored.iter().copied().filter(|s| answered[node].iter().any(|a| a == s)).collect();
        assert_eq!(order, answered[node].iter().map(String::as_str).collect::<Vec<_>>(), "{node}: order");
        assert!(alarm_kinds(&pg, node)?.is_empty(), "{node}: a clean chain raises no alarm");
    }
    assert!(answered.values().all(|a| a.len() == 150), "every request answered");
    // `verify` re-checks what is stored: intact, then broken by an edit in the database.
    let out = collector::cli(&bin, &pg.dsn(), &["verify", "till-1"])?;
    assert!(out.contains("chain intact"), "{out}");
    pg.psql("UPDATE audit_records SET body = '{\"kind\":\"edited\"}' WHERE node = 'till-1' AND seq = 3")?;
    let out = std::process::Command::new(&bin).args(["verify", "till-1", "--database", &pg.dsn()]).output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("record 3"), "{}", String::from_utf8_lossy(&out.stdout));
    // Both collectors answered for the fleet; the survivor shows all three nodes.
    let reader = collector::reader(&bin, &pg.dsn(), "ops")?;
    let fleet: Value =
        http_client().get(format!("{}/v1/fleet", c2.url)).bearer_auth(&reader).send().await?.json().await?;
    let rows = fleet["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 3, "{fleet}");
    for r in &rows {
        assert_eq!(r["chain"], "ok", "{r}");
        assert_eq!(r["agent_version"], env!("CARGO_PKG_VERSION"), "{r}");
        assert!(
            r["models"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "mlp" && m["state"] == "READY")),
            "{r}"
        );
    }
    for a in std::sync::Arc::into_inner(agents).into_iter().flatten() {
        a.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_write_as_another_and_unknown_nodes_are_refused_and_counted() -> Result<()> {
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let c = Collector::start(&bin, &pg.dsn())?;
    let a = collector::enroll(&bin, &pg.dsn(), "till-a", None)?;
    collector::enroll(&bin, &pg.dsn(), "till-b", None)?;
    let http = http_client();
    let batch = |lines: &[Value]| -> Result<Vec<u8>> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        Ok(zstd::bulk::compress(text.as_bytes(), 3)?)
    };
    let record = |seq: u64, prev: &str, body: Value| {
        let hash = outpost_proto::audit::Record::compute_hash(seq, 1_000 + seq as i64, prev, &body);
        json!({"seq": seq, "time_ms": 1_000 + seq as i64, "prev": prev, "hash": hash, "body": body})
    };
    let genesis = outpost_proto::audit::GENESIS;
    let post = |token: &str, node: &str, body: Vec<u8>| {
        http.post(format!("{}/v1/audit", c.url))
            .bearer_auth(token)
            .header("X-Outpost-Node", node)
            .header("Content-Encoding", "zstd")
            .body(body)
            .send()
    };
    // Its own records: stored.
    let r1 = record(1, genesis, json!({"kind": "inference", "n": 1}));
    assert_eq!(post(&a, "till-a", batch(std::slice::from_ref(&r1))?).await?.status().as_u16(), 200);
    // As another node: refused, nothing stored for either.
    let r2 = record(2, r1["hash"].as_str().unwrap_or_default(), json!({"kind": "inference", "n": 2}));
    let resp = post(&a, "till-b", batch(std::slice::from_ref(&r2))?).await?;
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.text().await?.contains("may not write as 'till-b'"));
    // Another node's signed checkpoint inside its own batch: refused.
    let key = outpost_proto::registry::KeyPair::generate()?;
    let cp = outpost_proto::audit::Checkpoint::sign(&key, "till-b", 1, genesis, 5);
    assert_eq!(
        post(&a, "till-a", batch(&[record(2, r1["hash"].as_str().unwrap_or_default(), cp.body())])?)
            .await?
            .status()
            .as_u16(),
        403
    );
    // Unknown and missing tokens: 401.
    assert_eq!(post(&"f".repeat(64), "till-a", batch(std::slice::from_ref(&r2))?).await?.status().as_u16(), 401);
    let resp = http.post(format!("{}/v1/heartbeat", c.url)).body("{}").send().await?;
    assert_eq!(resp.status().as_u16(), 401);
    // A node's token does not read the fleet.
    assert_eq!(http.get(format!("{}/v1/fleet", c.url)).bearer_auth(&a).send().await?.status().as_u16(), 401);
    assert_eq!(pg.psql("SELECT string_agg(node || ':' || seq, ',') FROM audit_records")?, "till-a:1");
    // Hostile bodies: not zstd, a bomb past the cap, not JSON. Each a clear 4xx.
    assert_eq!(post(&a, "till-a", b"not zstd".to_vec()).await?.status().as_u16(), 400);
    let bomb = zstd::bulk::compress(&vec![b'\n'; 80 << 20], 19)?;
    assert_eq!(post(&a, "till-a", bomb).await?.status().as_u16(), 413);
    let resp = http.post(format!("{}/v1/heartbeat", c.url)).bearer_auth(&a).body("[1,2]").send().await?;
    assert_eq!(resp.status().as_u16(), 400);
    // The refusals are counted.
    let reader = collector::reader(&bin, &pg.dsn(), "ops")?;
    let text = http.get(format!("{}/metrics", c.url)).bearer_auth(&reader).send().await?.text().await?;
    let count = |kind: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with("outpost_collector_auth_failures_total") && l.contains(&format!("kind=\"{kind}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("other_node"), 1.0, "{text}");
    assert!(count("unknown") >= 2.0 && count("missing") >= 1.0, "{text}");
    // The database gone: 503 with Retry-After (the agent keeps the batch), never a 500.
    drop(pg);
    let resp = post(&a, "till-a", batch(std::slice::from_ref(&r2))?).await?;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    Ok(())
}

/// Rewrites `recs` from index `from` on: new hashes, links kept consistent (what someone with
/// the log but not the node key can do).
fn rechain(recs: &mut [outpost::audit::Record], from: usize) {
    for i in from..recs.len() {
        if i > 0 {
            recs[i].prev = recs[i - 1].hash.clone();
        }
        let r = &recs[i];
        recs[i].hash = outpost_proto::audit::Record::compute_hash(r.seq, r.time_ms, &r.prev, &r.body);
    }
}

fn all_records(state: &Path) -> Result<Vec<(PathBuf, Vec<outpost::audit::Record>)>> {
    crate::audit::segments(state)?
        .into_iter()
        .map(|s| Ok((s.clone(), crate::audit::parse_lines(&crate::audit::stored_text(&s)?)?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_and_a_rewritten_record_raise_the_collectors_chain_alarm() -> Result<()> {
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let c = Collector::start(&bin, &pg.dsn())?;
    let reader = collector::reader(&bin, &pg.dsn(), "ops")?;

    // A tail cut after it was witnessed: the node's head goes back (its heartbeat says so) and
    // what it writes next does not link to the witnessed chain.
    let token = collector::enroll(&bin, &pg.dsn(), "till-t", None)?;
    let a = agent("till-t", &[&c.url], &token, "").await?;
    infer(&a, "till-t", 0..12).await?;
    let head = wait_synced(&pg, "till-t", &a).await?;
    let state = a.stop_keep_state().await?;
    let mut segs = all_records(state.path())?;
    let (seg, recs) = segs.pop().ok_or_else(|| anyhow::anyhow!("no segment"))?;
    ensure!(recs.len() > 6, "records in the last segment: {}", recs.len());
    crate::audit::write_records(&seg, &recs[..recs.len() - 5])?;
    let a = agent_in(state, "till-t", &[&c.url], &token, "").await?;
    infer(&a, "till-t", 100..110).await?;
    let end = Instant::now() + Duration::from_secs(60);
    let raised = |kinds: &[String]| ["tail_cut", "broken_link"].iter().all(|k| kinds.iter().any(|x| x == k));
    while !raised(&alarm_kinds(&pg, "till-t")?) {
        ensure!(Instant::now() < end, "no tail_cut and broken_link alarms: {:?}", alarm_kinds(&pg, "till-t")?);
        a.agent.wake_outbox();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(head > 5);
    a.stop().await?;

    // A record rewritten while the node was offline, its hash and every later one recomputed:
    // the signed checkpoint after it contradicts the chain the collector receives.
    let token = collector::enroll(&bin, &pg.dsn(), "till-r", None)?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let offline = format!("http://{closed}");
    let r = agent("till-r", &[&offline], &token, "[audit]\ncheckpoint_every = 5\n").await?;
    infer(&r, "till-r", 0..12).await?;
    let state = r.stop_keep_state().await?;
    let mut segs = all_records(state.path())?;
    let (seg, mut recs) = segs.pop().ok_or_else(|| anyhow::anyhow!("no segment"))?;
    let cp =
        recs.iter().position(|r| r.body["kind"] == "checkpoint").ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
    ensure!(cp >= 2, "a record before the first checkpoint");
    let victim = cp - 2;
    recs[victim].body["tampered"] = json!(true);
    rechain(&mut recs, victim);
    crate::audit::write_records(&seg, &recs)?;
    let r = agent_in(state, "till-r", &[&c.url], &token, "[audit]\ncheckpoint_every = 5\n").await?;
    let end = Instant::now() + Duration::from_secs(60);
    while !alarm_kinds(&pg, "till-r")?.iter().any(|k| k == "checkpoint_contradicts") {
        ensure!(Instant::now() < end, "no checkpoint alarm; alarms: {:?}", alarm_kinds(&pg, "till-r")?);
        r.agent.wake_outbox();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.stop().await?;

    // The fleet view, the metrics and the log say so.
    let http = http_client();
    let fleet: Value = http.get(format!("{}/v1/fleet", c.url)).bearer_auth(&reader).send().await?.json().await?;
    for node in ["till-t", "till-r"] {
        let row = fleet["nodes"].as_array().and_then(|n| n.iter().find(|r| r["node"] == node)).cloned();
        assert_eq!(row.as_ref().map(|r| r["chain"].clone()), Some(json!("alarm")), "{fleet}");
    }
    let text = http.get(format!("{}/metrics", c.url)).bearer_auth(&reader).send().await?.text().await?;
    assert!(
        text.lines().any(|l| l.starts_with("outpost_fleet_chain_alarms{node=\"till-r\"}") && !l.ends_with(" 0")),
        "{text}"
    );
    // `verify` re-checks what is stored, and finds both.
    for (node, says) in [("till-t", "prev is not the hash"), ("till-r", "signed checkpoint contradicts")] {
        let out = std::process::Command::new(&bin).args(["verify", node, "--database", &pg.dsn()]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains(says), "{node}: {text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_partitioned_by_day_and_retention_drops_whole_days() -> Result<()> {
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let c = Collector::start(&bin, &pg.dsn())?;
    let token = collector::enroll(&bin, &pg.dsn(), "till-p", None)?;
    // A node back after days offline: its records carry their own times, three days apart.
    let day = 86_400_000i64;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let mut prev = outpost_proto::audit::GENESIS.to_owned();
    let mut text = String::new();
    for (i, t) in [now - 3 * day, now - 2 * day, now].into_iter().enumerate() {
        let seq = i as u64 + 1;
        let body = json!({"kind": "inference", "n": seq});
        let hash = outpost_proto::audit::Record::compute_hash(seq, t, &prev, &body);
        text.push_str(&format!("{}\n", json!({"seq": seq, "time_ms": t, "prev": prev, "hash": hash, "body": body})));
        prev = hash;
    }
    let resp = http_client()
        .post(format!("{}/v1/audit", c.url))
        .bearer_auth(&token)
        .header("Content-Encoding", "zstd")
        .body(zstd::bulk::compress(text.as_bytes(), 3)?)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let parts =
        "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audit_records'";
    assert_eq!(pg.psql(parts)?, "3", "one partition per day");
    let config = tempfile::NamedTempFile::new()?;
    std::fs::write(config.path(), "retention_days = 1\n")?;
    let path = config.path().display().to_string();
    let out = collector::cli(&bin, &pg.dsn(), &["prune", "--config", &path])?;
    assert!(out.starts_with("2 day partitions"), "{out}");
    assert_eq!(pg.psql(parts)?, "1");
    assert_eq!(pg.psql("SELECT string_agg(seq::text, ',') FROM audit_records")?, "3");
    Ok(())
}

/// Debian's Chromium (`OUTPOST_CHROMIUM` overrides); `None` outside the full suite when absent.
pub(crate) fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("OUTPOST_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    if p.is_file() {
        return Some(p);
    }
    assert!(!outpost_tests::full_suite(), "OUTPOST_TEST_FULL=1 needs chromium (scripts/setup-test.sh installs it)");
    eprintln!("skipped: no chromium");
    None
}

/// Headless Chromium on `url`, as the machine's closed network needs it; `args` add the output.
pub(crate) fn chromium_run(bin: &Path, url: &str, args: &[&str]) -> Result<std::process::Output> {
    let profile = tempfile::tempdir()?;
    let out = std::process::Command::new(bin)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()?;
    ensure!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_renders_in_headless_chromium() -> Result<()> {
    let Some(browser) = chromium() else { return Ok(()) };
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let c = Collector::start(&bin, &pg.dsn())?;
    let token = collector::enroll(&bin, &pg.dsn(), "branch-7-till", None)?;
    collector::enroll(&bin, &pg.dsn(), "never-seen", None)?;
    let a = agent("branch-7-till", &[&c.url], &token, "").await?;
    infer(&a, "branch-7-till", 0..5).await?;
    wait_synced(&pg, "branch-7-till", &a).await?;
    let reader = collector::reader(&bin, &pg.dsn(), "ops")?;
    let page = format!("{}/fleet", c.url.replacen("http://", &format!("http://ops:{reader}@"), 1));
    let dom = String::from_utf8(chromium_run(&browser, &page, &["--dump-dom"])?.stdout)?;
    assert!(dom.contains("<h1>Outpost fleet</h1>"), "{dom}");
    assert!(dom.contains("2 nodes") && dom.contains("1 silent"), "{dom}");
    let row = dom.split("<tr").find(|r| r.contains("branch-7-till")).unwrap_or_default();
    assert!(row.contains("mlp@1") && row.contains("READY") && row.contains("ok, "), "{row}");
    assert!(row.contains(env!("CARGO_PKG_VERSION")), "{row}");
    let silent = dom.split("<tr").find(|r| r.contains("never-seen")).unwrap_or_default();
    assert!(silent.contains("never") && silent.contains("silent"), "{silent}");
    // Without the reader's token: the browser gets 401, not the fleet.
    let denied = String::from_utf8(chromium_run(&browser, &format!("{}/fleet", c.url), &["--dump-dom"])?.stdout)?;
    assert!(!denied.contains("branch-7-till"), "{denied}");
    // A screenshot renders (the README's comes from here: OUTPOST_FLEET_SCREENSHOT=path).
    let shot = tempfile::tempdir()?;
    let png = std::env::var("OUTPOST_FLEET_SCREENSHOT")
        .unwrap_or_else(|_| shot.path().join("fleet.png").display().to_string());
    chromium_run(&browser, &page, &[&format!("--screenshot={png}"), "--window-size=1200,420"])?;
    assert!(std::fs::read(&png)?.starts_with(b"\x89PNG"), "a PNG screenshot");
    a.stop().await?;
    Ok(())
}

/// The value of one series in the agent's own `/metrics` text.
async fn metric_value(agent: &TestAgent, series: &str) -> Result<f64> {
    let text = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("no {series} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reaches_a_real_prometheus_by_remote_write_backlog_included() -> Result<()> {
    let prom = outpost_tests::prometheus::Prometheus::start("1h")?;
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let c = Collector::start(&bin, &pg.dsn())?;
    let token = collector::enroll(&bin, &pg.dsn(), "till-m", None)?;
    // Offline for remote-write first: snapshots queue on the box.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let telemetry = |url: &str| format!("telemetry_interval = \"100ms\"\nremote_write_url = \"{url}\"\n");
    let a = agent("till-m", &[&c.url], &token, &telemetry(&format!("http://{closed}/api/v1/write"))).await?;
    assert_eq!(infer(&a, "till-m", 0..5).await?.len(), 5);
    // A snapshot taken after the five answers is queued. The backlog gauge is refreshed each
    // send round, so it may lag one snapshot: the second growth seen after the answers comes
    // from a snapshot taken after them.
    let mut queued = metric_value(&a, "outpost_telemetry_backlog_bytes").await.unwrap_or(0.0);
    let end = Instant::now() + Duration::from_secs(30);
    for _ in 0..2 {
        loop {
            let now = metric_value(&a, "outpost_telemetry_backlog_bytes").await.unwrap_or(0.0);
            if now > queued {
                queued = now;
                break;
            }
            ensure!(Instant::now() < end, "no telemetry queued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let state = a.stop_keep_state().await?;
    let back_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let a = agent_in(state, "till-m", &[&c.url], &token, &telemetry(&prom.write_url())).await?;
    infer(&a, "till-m", 5..8).await?;
    let series = "outpost_inference_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\"}";
    let promql =
        "outpost_inference_requests_total{model=\"mlp\",version=\"1\",outcome=\"ok\",node=\"till-m\",site=\"test-site\"}";
    // The newest sample equals what the agent's /metrics says now (no traffic since).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let want = metric_value(&a, series).await?;
        let got = prom.query(promql).await?;
        let have = got.first().and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok());
        if have == Some(want) && want == 3.0 {
            break;
        }
        if Instant::now() > end {
            let text = a.http.get(a.url("/metrics")).send().await?.text().await?;
            let alarms: Vec<&str> =
                text.lines().filter(|l| l.starts_with("outpost_alarm") || l.contains("telemetry")).collect();
            bail!("prometheus has {got:?}, the agent's /metrics {want}; {alarms:?}");
        }
        a.agent.wake_outbox();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The backlog arrived with its own times: samples from before the agent came back, when
    // the counter stood at 5.
    let range = prom.query(&format!("{promql}[10m]")).await?;
    let samples = range.first().and_then(|r| r["values"].as_array().cloned()).unwrap_or_default();
    let before: Vec<f64> = samples
        .iter()
        .filter(|s| s[0].as_f64().is_some_and(|t| t < back_at))
        .filter_map(|s| s[1].as_str()?.parse().ok())
        .collect();
    let text = a.http.get(a.url("/metrics")).send().await?.text().await?;
    let alarms: Vec<&str> = text.lines().filter(|l| l.starts_with("outpost_alarm")).collect();
    assert!(!before.is_empty() && before.iter().all(|v| *v <= 5.0), "backlog samples: {samples:?}; {alarms:?}");
    assert_eq!(before.last(), Some(&5.0), "the last offline snapshot saw all five: {samples:?}");
    let times: Vec<f64> = samples.iter().filter_map(|s| s[0].as_f64()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in order: {times:?}");
    a.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_offline_for_a_day_of_traffic_sends_all_of_it_when_back() -> Result<()> {
    let pg = Postgres::start()?;
    let bin = collector_bin();
    let token = collector::enroll(&bin, &pg.dsn(), "till-o", None)?;
    // Offline: the only collector's address answers nothing.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let a = agent("till-o", &[&format!("http://{closed}")], &token, "").await?;
    // A branch's day: one request a minute is 1,440; the records wait on the box.
    let answered = infer(&a, "till-o", 0..1440).await?;
    assert_eq!(answered.len(), 1440);
    let head = a.agent.audit().map(|x| x.head_seq()).unwrap_or(0);
    assert_eq!(pg.psql("SELECT count(*) FROM audit_records")?, "0");
    let state = a.stop_keep_state().await?;
    // Back, with a collector: everything arrives, once, in order, without an alarm.
    let c = Collector::start(&bin, &pg.dsn())?;
    let a = agent_in(state, "till-o", &[&c.url], &token, "").await?;
    let synced = wait_synced(&pg, "till-o", &a).await?;
    assert!(synced > head, "the restart's own records too");
    let stats =
        pg.psql("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM audit_records WHERE node = 'till-o'")?;
    assert_eq!(stats, format!("{synced}|{synced}|1|{synced}"));
    let ids = pg.psql(
        "SELECT count(DISTINCT body::jsonb->>'request_id') FROM audit_records WHERE node = 'till-o' \
         AND body::jsonb->>'kind' = 'inference'",
    )?;
    assert_eq!(ids, "1440");
    assert!(alarm_kinds(&pg, "till-o")?.is_empty());
    a.stop().await?;
    Ok(())
}
