//! The audit log and the upstream outbox: durability before the reply, crash rounds that lose
//! nothing, tamper detection by `outpost audit verify`, days offline, quotas, privacy.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_tests::upstream::Receiver;
use outpost_tests::*;
use serde_json::{json, Value};

use crate::outpost_bin;

fn upstream_toml(url: &str, extra: &str) -> String {
    format!("[upstream]\nurl = {url:?}\nallow_http = true\nflush_interval = \"20ms\"\ntelemetry_interval = \"1h\"\n{extra}\n")
}

fn verify_cli(config: &std::path::Path) -> anyhow::Result<(i32, String)> {
    let out = std::process::Command::new(outpost_bin()).args(["audit", "verify", "--config"]).arg(config).output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The audit log's segment files, in order.
pub(crate) fn segments(state: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<_> = std::fs::read_dir(state.join("audit"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seg-")))
        .collect();
    v.sort();
    Ok(v)
}

/// A segment's records as text: the active segment is zero-filled ahead of its last record.
pub(crate) fn stored_text(seg: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(seg)?.trim_end_matches('\0').to_owned())
}

/// Every stored record, by sequence number.
pub(crate) fn records(state: &std::path::Path) -> anyhow::Result<BTreeMap<u64, Value>> {
    let mut out = BTreeMap::new();
    for seg in segments(state)? {
        for line in stored_text(&seg)?.lines() {
            let v: Value = serde_json::from_str(line)?;
            out.insert(v["seq"].as_u64().unwrap_or(0), v);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reply_waits_for_its_record_to_be_fsynced() -> anyhow::Result<()> {
    let agent = TestAgent::start(&[root().join("models")], "").await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    // 64 concurrent requests, then 48 one at a time: once requests have been arriving one at a
    // time, a record is made durable on the request's own thread (no hand-off to the
    // committer), under the same rule.
    let bodies: Vec<Value> = (0..64)
        .map(|i| {
            let mut body = golden.request(i % 3);
            body["id"] = json!(format!("burst-{i}"));
            body
        })
        .collect();
    let reqs = bodies.iter().map(|b| agent.post("/v2/models/mlp/infer", b));
    for r in futures::future::join_all(reqs).await {
        assert_eq!(r?.0, 200);
    }
    for i in 0..48 {
        let mut body = golden.request(0);
        body["id"] = json!(format!("seq-{i}"));
        assert_eq!(agent.post("/v2/models/mlp/infer", &body).await?.0, 200);
    }
    let audit = agent.agent.audit().expect("audit on by default");
    let trace = audit.trace().expect("trace in test builds");
    let events = trace.events.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    // request id → seq, from the log itself.
    let recs = audit.range(1, u64::MAX, usize::MAX)?;
    let mut seq_of = BTreeMap::new();
    for (seq, v) in &recs {
        let r: Value = serde_json::from_slice(v)?;
        if let Some(id) = r["body"]["request_id"].as_str() {
            seq_of.insert(id.to_owned(), *seq);
        }
    }
    let mut fsync_done: Vec<(u64, u64, u64)> = Vec::new(); // (trace time, first, last)
    let mut checked = 0;
    for (t, e) in &events {
        if let Some(range) = e.strip_prefix("fsync-done ") {
            let (a, b) = range.split_once('-').expect("range");
            fsync_done.push((*t, a.parse()?, b.parse()?));
        } else if let Some(id) = e.strip_prefix("reply ") {
            let seq = seq_of[id];
            let durable_at = fsync_done.iter().find(|(_, a, b)| (*a..=*b).contains(&seq)).map(|x| x.0);
            assert!(durable_at.is_some_and(|d| d < *t), "reply {id} (record {seq}) left before its fsync");
            checked += 1;
        }
    }
    assert_eq!(checked, 112);
    let batches = fsync_done.len();
    let here = events.iter().filter(|(_, e)| e.starts_with("committed-here ")).count();
    eprintln!("112 replies, {batches} fsyncs (group commit), {here} on the request's thread");
    assert!(batches < 112, "concurrent records share fsyncs");
    assert!(here > 0, "lone requests commit on their own thread");
    let body = &serde_json::from_slice::<Value>(&recs.last().expect("records").1)?["body"];
    assert_eq!(body["kind"], "inference");
    assert_eq!(body["principal"], "anonymous");
    assert_eq!(body["transport"], "http");
    assert_eq!(body["model"], "mlp");
    assert_eq!(body["route"], "local");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["input_digest"].as_str().map(str::len), Some(64));
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_answered_record_and_upstream_gets_each_once() -> anyhow::Result<()> {
    let models = mlp_only()?;
    let receiver = Receiver::start().await?;
    let state = tempfile::tempdir()?;
    let config = state.path().join("outpost.toml");
    std::fs::write(
        &config,
        config_text(state.path(), &[models.path().to_path_buf()], &upstream_toml(&receiver.url(), "")),
    )?;
    let args = ["run", "--config", config.to_str().unwrap_or_default()];
    let golden = golden_for(&root().join("models/mlp"))?;
    let http = http_client();
    let rounds = if full_suite() { 50 } else { 8 };
    let mut answered: HashSet<String> = HashSet::new();
    for round in 0..rounds {
        let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
        let addr = child.wait_listening()?;
        child.wait_for("initial model load finished", Duration::from_secs(60))?;
        // A bounded load loop: 4 clients × up to 40 requests; the kill lands mid-loop.
        let kill_after = 10 + (round * 7) % 50;
        let url = format!("http://{addr}/v2/models/mlp/infer");
        let mut tasks = Vec::new();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for c in 0..4 {
            let (http, url, done) = (http.clone(), url.clone(), done.clone());
            let mut body = golden.request(c % 3);
            tasks.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                for i in 0..40 {
                    let id = format!("r{round}-c{c}-{i}");
                    body["id"] = json!(id);
                    match http.post(&url).json(&body).send().await {
                        Ok(r) if r.status().as_u16() == 200 => {
                            ok.push(id);
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => break,
                    }
                }
                ok
            }));
        }
        while done.load(Ordering::SeqCst) < kill_after {
            tokio::task::yield_now().await;
        }
        child.signal("KILL")?;
        let _ = child.wait_status(Duration::from_secs(30))?;
        for t in tasks {
            answered.extend(t.await?);
        }
    }
    // One clean run drains the outbox; the graceful stop flushes what is left.
    let mut child = ChildAgent::spawn(&outpost_bin(), &args)?;
    child.wait_for("initial model load finished", Duration::from_secs(60))?;
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(60))?, 0);

    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 0, "{out}");
    let recs = records(state.path())?;
    let logged: HashSet<String> =
        recs.values().filter_map(|r| r["body"]["request_id"].as_str().map(str::to_owned)).collect();
    let missing: Vec<_> = answered.iter().filter(|id| !logged.contains(*id)).collect();
    assert!(missing.is_empty(), "answered without a durable record: {missing:?}");
    let head = *recs.keys().last().expect("records");
    let up: Vec<u64> = receiver.records("audit").iter().filter_map(|r| r["seq"].as_u64()).collect();
    let unique: HashSet<u64> = up.iter().copied().collect();
    assert_eq!(unique.len(), up.len(), "each record arrives once after dedup by Idempotency-Key");
    assert_eq!(up, (1..=head).collect::<Vec<_>>(), "every record arrives, in order");
    eprintln!(
        "{rounds} kill -9 rounds: {} answered requests, {head} records, {} duplicate batches dropped by key",
        answered.len(),
        receiver.received.duplicates.load(Ordering::SeqCst)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_an_edited_deleted_or_reordered_record() -> anyhow::Result<()> {
    let agent = TestAgent::start(&[root().join("models")], "").await?;
    let golden = golden_for(&root().join("models/cnn"))?;
    for _ in 0..10 {
        assert_eq!(agent.post("/v2/models/cnn/infer", &golden.request(0)).await?.0, 200);
    }
    let config = agent.config_path();
    let state = agent.stop_keep_state().await?;
    assert_eq!(verify_cli(&config)?.0, 0);
    // All records are in one segment here: edit its lines as an attacker with disk access would.
    let seg = segments(state.path())?.pop().expect("a segment");
    let original = std::fs::read_to_string(&seg)?;
    let lines: Vec<String> = stored_text(&seg)?.lines().map(str::to_owned).collect();
    let write = |ls: &[String]| std::fs::write(&seg, ls.join("\n") + "\n");
    let nth = |n: u64| lines.iter().position(|l| l.starts_with(&format!("{{\"seq\":{n},"))).expect("record");

    // An edited field.
    let mut edited = lines.clone();
    let mut r: Value = serde_json::from_str(&edited[nth(4)])?;
    r["body"]["status"] = json!("invalid_input");
    edited[nth(4)] = r.to_string();
    write(&edited)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1);
    assert!(out.contains("record 4 was modified"), "{out}");
    // An edit that also recomputes the record's own hash breaks the link to the next one.
    let h = outpost::audit::Record::compute_hash(
        4,
        r["time_ms"].as_i64().unwrap_or_default(),
        r["prev"].as_str().unwrap_or_default(),
        &r["body"],
    );
    r["hash"] = json!(h);
    edited[nth(4)] = r.to_string();
    write(&edited)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1);
    assert!(out.contains("record 5 does not follow record 4"), "{out}");
    std::fs::write(&seg, &original)?;
    assert_eq!(verify_cli(&config)?.0, 0, "restored");

    // A deleted record.
    let mut deleted = lines.clone();
    deleted.remove(nth(6));
    write(&deleted)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1);
    assert!(out.contains("record 6 is missing"), "{out}");

    // Two records swapped.
    let mut swapped = lines.clone();
    swapped.swap(nth(7), nth(8));
    write(&swapped)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1);
    assert!(out.contains("record 7 is out of order"), "{out}");
    std::fs::write(&seg, &original)?;

    // Export reads the same log.
    let out = std::process::Command::new(outpost_bin())
        .args(["audit", "export", "--since", "1h", "--config"])
        .arg(&config)
        .output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() >= 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_then_back_delivers_every_record_once_and_in_order() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.received.refuse.store(true, Ordering::SeqCst);
    let agent =
        TestAgent::start(&[root().join("models")], &upstream_toml(&receiver.url(), "batch_records = 50")).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    // Many requests while upstream refuses everything (what days offline look like: a backlog).
    for i in 0..400 {
        assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(i % 3)).await?.0, 200);
    }
    let head = agent.agent.audit().expect("audit").head_seq();
    let metrics = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("outpost_audit_backlog_records"), "{metrics}");
    assert!(receiver.records("audit").is_empty());
    receiver.received.refuse.store(false, Ordering::SeqCst);
    agent.agent.wake_outbox();
    receiver.wait_until("audit", |r| r.len() as u64 >= head, Duration::from_secs(60)).await?;
    let seqs: Vec<u64> = receiver.records("audit").iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(&seqs[..head as usize], &(1..=head).collect::<Vec<_>>()[..], "once each, in order");
    let keys = receiver.received.headers_seen.lock().map(|h| h.clone()).unwrap_or_default();
    assert!(keys
        .iter()
        .all(|(k, node, site)| k.starts_with("test-node:") && node == "test-node" && site == "test-site"));
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_quota_drops_oldest_with_an_alarm_and_serving_continues() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.received.refuse.store(true, Ordering::SeqCst);
    let toml = upstream_toml(&receiver.url(), "telemetry_interval = \"10ms\"\nquota_bytes = 4000")
        .replace("telemetry_interval = \"1h\"\n", "");
    let agent = TestAgent::start(&[root().join("models")], &toml).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    // Serve until the alarm shows (bounded).
    let mut alarmed = false;
    for i in 0..2000 {
        assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(i % 3)).await?.0, 200);
        let m = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
        if m.contains("outpost_alarm{name=\"telemetry_dropped\"} 1") {
            alarmed = true;
            break;
        }
    }
    assert!(alarmed, "telemetry_dropped alarm raised");
    let (_, status) = agent.get("/admin/status").await?;
    assert!(status["alarms"]["telemetry_dropped"].is_string(), "{status}");
    receiver.received.refuse.store(false, Ordering::SeqCst);
    agent.agent.wake_outbox();
    // The snapshots that survived arrive, the latest of them with the MLP's counters.
    receiver
        .wait_until(
            "telemetry",
            |r| r.iter().any(|s| s["snapshot"]["metrics"]["models"]["mlp"].is_object()),
            Duration::from_secs(30),
        )
        .await?;
    let seqs: Vec<u64> = receiver.records("telemetry").iter().filter_map(|s| s["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert!(seqs[0] > 1, "the oldest were dropped: {seqs:?}");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_quota_full_fails_closed_then_resumes_after_sync() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.received.refuse.store(true, Ordering::SeqCst);
    let toml = format!("[audit]\nquota_bytes = 20000\n\n{}", upstream_toml(&receiver.url(), ""));
    let agent = TestAgent::start(&[root().join("models")], &toml).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut refused = None;
    for i in 0..1000 {
        let (s, _, body) = agent.post_raw("/v2/models/mlp/infer", serde_json::to_vec(&golden.request(i % 3))?).await?;
        if s == 503 {
            refused = Some(body);
            break;
        }
        assert_eq!(s, 200);
    }
    let body = refused.expect("the box fails closed when the audit quota is full");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("audit")), "{body}");
    let m = agent.http.get(agent.url("/metrics")).send().await?.text().await?;
    assert!(m.contains("outpost_alarm{name=\"audit_quota_full\"} 1"), "{m}");
    // Upstream returns: records sync, synced records are pruned, serving resumes by itself.
    receiver.received.refuse.store(false, Ordering::SeqCst);
    agent.agent.wake_outbox();
    let mut resumed = false;
    for i in 0..5000 {
        let (s, _) = agent.post("/v2/models/mlp/infer", &golden.request(i % 3)).await?;
        if s == 200 {
            resumed = true;
            break;
        }
        receiver.wait_until("audit", |r| !r.is_empty(), Duration::from_secs(30)).await?;
    }
    assert!(resumed);
    let config = agent.config_path();
    let state = agent.stop_keep_state().await?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 0, "the chain verifies from the prune anchor: {out}");
    assert!(!out.contains("anchor 0"), "records were pruned: {out}");
    drop(state);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonymized_parameters_never_leave_in_clear() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let toml = format!(
        "[privacy]\npseudonymize = [\"parameters.customer_id\"]\nresidency_allow = [\"127.0.0.1\"]\n\n{}",
        upstream_toml(&receiver.url(), "")
    );
    let agent = TestAgent::start(&[root().join("models")], &toml).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut body = golden.request(0);
    body["parameters"] = json!({ "customer_id": "alice-4711", "store": "north" });
    assert_eq!(agent.post("/v2/models/mlp/infer", &body).await?.0, 200);
    agent.agent.wake_outbox();
    receiver
        .wait_until("audit", |r| r.iter().any(|x| x["body"]["kind"] == "inference"), Duration::from_secs(30))
        .await?;
    let rec = receiver.records("audit").into_iter().find(|x| x["body"]["kind"] == "inference").expect("record");
    let params = &rec["body"]["parameters"];
    assert!(params["customer_id"].as_str().is_some_and(|v| v.starts_with("hmac:")), "{params}");
    assert_eq!(params["store"], "north");
    assert!(!rec.to_string().contains("alice-4711"));
    let key = std::fs::metadata(agent.state.path().join("hmac.key"))?;
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777, 0o600);
    agent.stop().await?;

    // An upstream host outside the residency allow-list is a configuration error.
    let dir = tempfile::tempdir()?;
    let toml =
        "[privacy]\nresidency_allow = [\"collector.example\"]\n\n[upstream]\nurl = \"https://elsewhere.example/\"\n";
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(dir.path(), &[], toml))?;
    let out = std::process::Command::new(outpost_bin()).args(["check-config", "--config"]).arg(&path).output()?;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("residency_allow"));
    Ok(())
}

/// Serves `n` MLP requests on an agent with `extra` configuration, stops it, and returns its
/// configuration and state.
async fn serve_and_stop(extra: &str, n: usize) -> anyhow::Result<(std::path::PathBuf, tempfile::TempDir)> {
    let agent = TestAgent::start(&[root().join("models")], extra).await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    for i in 0..n {
        assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(i % 3)).await?.0, 200);
    }
    let config = agent.config_path();
    Ok((config, agent.stop_keep_state().await?))
}

/// A stored record line, parsed, and written back as the log writes it.
pub(crate) fn parse_lines(text: &str) -> anyhow::Result<Vec<outpost::audit::Record>> {
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

pub(crate) fn write_records(seg: &std::path::Path, recs: &[outpost::audit::Record]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in recs {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    Ok(std::fs::write(seg, text)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_timestamp_breaks_the_chain() -> anyhow::Result<()> {
    let (config, state) = serve_and_stop("", 5).await?;
    assert_eq!(verify_cli(&config)?.0, 0);
    let seg = segments(state.path())?.pop().expect("a segment");
    let mut recs = parse_lines(&stored_text(&seg)?)?;
    recs[2].time_ms -= 3_600_000;
    write_records(&seg, &recs)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("record 3 was modified"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_checkpoints_reveal_a_cut_tail_a_deleted_segment_and_a_rewritten_last_record() -> anyhow::Result<()> {
    // Small segments (a small quota), a checkpoint every 10 records and one at shutdown.
    let (config, state) = serve_and_stop("[audit]\nquota_bytes = 65536\ncheckpoint_every = 10\n", 60).await?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("signed by the node key"), "{out}");
    let segs = segments(state.path())?;
    assert!(segs.len() >= 3, "several segments: {}", segs.len());
    let last_seg = segs.last().expect("segment").clone();
    let original = std::fs::read(&last_seg)?;
    let recs = parse_lines(&stored_text(&last_seg)?)?;
    let head = recs.last().expect("records").seq;
    assert_eq!(recs.last().expect("records").body["kind"], "checkpoint", "the shutdown checkpoint is the head");

    // Records cut from the tail.
    write_records(&last_seg, &recs[..recs.len() - 3])?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("missing from the tail") && out.contains(&format!("first affected seq: {}", head - 2)),
        "{out}"
    );
    std::fs::write(&last_seg, &original)?;

    // The last segment deleted.
    std::fs::remove_file(&last_seg)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1, "{out}");
    let first_of_last = recs[0].seq;
    assert!(out.contains(&format!("first affected seq: {first_of_last}")), "{out}");
    std::fs::write(&last_seg, &original)?;

    // The last answered record rewritten, its hash recomputed, and the closing checkpoint
    // record after it removed, so the chain alone is consistent.
    let mut rewritten = recs.clone();
    rewritten.pop();
    let r = rewritten.last_mut().expect("record");
    r.body["status"] = json!("invalid_input");
    r.hash = outpost::audit::Record::compute_hash(r.seq, r.time_ms, &r.prev, &r.body);
    let seq = r.seq;
    write_records(&last_seg, &rewritten)?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("record {seq} contradicts the checkpoint")), "{out}");
    assert!(out.contains("first affected seq:"), "{out}");

    // What the README states: with the checkpoints beside the log deleted too, a rewrite after
    // the last checkpoint still in the log is not seen on the box (only a witness off the box,
    // which got the checkpoints, sees it).
    std::fs::remove_file(state.path().join("audit").join("checkpoints.ndjson"))?;
    assert_eq!(verify_cli(&config)?.0, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstream_the_log_prunes_itself_and_inference_never_stops() -> anyhow::Result<()> {
    // 20 kB of quota holds about 50 records; 400 answers need pruning to go on.
    let (config, state) = serve_and_stop("[audit]\nquota_bytes = 20000\n", 400).await?;
    let (code, out) = verify_cli(&config)?;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("anchor 0"), "the oldest segments were pruned, leaving an anchor: {out}");
    let on_disk: u64 = segments(state.path())?.iter().map(|p| stored_text(p).map_or(0, |t| t.len() as u64)).sum();
    assert!(on_disk <= 20000, "records within the quota: {on_disk}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_retention_are_pruned_without_upstream() -> anyhow::Result<()> {
    let agent =
        TestAgent::start(&[root().join("models")], "[audit]\nquota_bytes = 262144\nretention = \"1s\"\n").await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    for i in 0..200 {
        assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(i % 3)).await?.0, 200);
    }
    let audit = agent.agent.audit().expect("audit on").clone();
    // The committer prunes by retention once a second: wait (bounded) for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let dir = agent.state.path().join("audit");
    // The offline verifier reads a live log here: a segment the pruner removes between its
    // listing and its read is pruning under way, not a failure; look again.
    let pruned = |dir: &std::path::Path| match outpost::audit::verify(dir, None) {
        Ok(v) => Ok(v.anchor > 0),
        Err(e) if e.to_string().contains("No such file") => Ok(false),
        Err(e) => Err(anyhow::Error::msg(e)),
    };
    while !pruned(&dir)? {
        anyhow::ensure!(std::time::Instant::now() < deadline, "nothing pruned after 30 s");
        assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(0)).await?.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(audit.retained_bytes() < 262144 / 2);
    agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_while_the_audit_log_fails_closed() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    receiver.received.refuse.store(true, Ordering::SeqCst);
    let toml = format!("[audit]\nquota_bytes = 20000\n\n{}", upstream_toml(&receiver.url(), ""));
    let agent = TestAgent::start(&[root().join("models")], &toml).await?;
    assert_eq!(agent.get("/v2/health/ready").await?.0, 200);
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut refused = false;
    for i in 0..1000 {
        if agent.post("/v2/models/mlp/infer", &golden.request(i % 3)).await?.0 == 503 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the quota fills");
    let (code, body) = agent.get("/v2/health/ready").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("audit")), "{body}");
    let (_, status) = agent.get("/admin/status").await?;
    assert_eq!(status["ready"], false, "{status}");
    assert!(status["not_ready_reason"].as_str().is_some_and(|r| r.contains("audit")), "{status}");
    // Upstream back: records sync and are pruned, and the agent is ready again by itself.
    receiver.received.refuse.store(false, Ordering::SeqCst);
    agent.agent.wake_outbox();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agent.get("/v2/health/ready").await?.0 != 200 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "not ready 30 s after upstream came back");
        receiver.wait_until("audit", |r| !r.is_empty(), Duration::from_secs(30)).await?;
        agent.agent.wake_outbox();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await?;
    Ok(())
}
