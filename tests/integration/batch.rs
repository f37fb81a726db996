//! Batch jobs: a file of rows run on the box, answered in row order with per-row errors,
//! cancelled on request, and resumed after kill -9 with every row answered exactly once.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use outpost_tests::*;
use serde_json::Value;

use crate::outpost_bin;

fn cli(args: &[&str]) -> Result<Output> {
    Ok(Command::new(outpost_bin()).args(args).output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `rows` NDJSON rows cycling the MLP's golden cases; the rows in `bad` are broken.
fn rows_file(dir: &Path, rows: usize, bad: &[usize]) -> Result<std::path::PathBuf> {
    let golden = golden_for(&root().join("models/mlp"))?;
    let mut text = String::new();
    for i in 0..rows {
        if bad.contains(&i) {
            text.push_str("{ not json\n");
        } else {
            text.push_str(&golden.request(i % 3).to_string());
            text.push('\n');
        }
    }
    let path = dir.join("rows.ndjson");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Checks a job's output: one line per row, rows 0.. in order, each answer the golden one,
/// the rows in `bad` errors.
fn check_output(text: &str, rows: usize, bad: &[usize]) -> Result<()> {
    let golden = golden_for(&root().join("models/mlp"))?;
    let lines: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    ensure!(lines.len() == rows, "{} output lines for {rows} rows", lines.len());
    for (i, l) in lines.iter().enumerate() {
        ensure!(l["row"] == i, "line {i} is row {}", l["row"]);
        if bad.contains(&i) {
            ensure!(l["error"].as_str().is_some_and(|e| e.contains("malformed")), "row {i}: {l}");
        } else {
            golden.check(i % 3, &l["answer"])?;
        }
    }
    Ok(())
}

/// Polls a job until `cond` holds on its status (bounded).
fn wait_job(base: &str, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cli(&["batch", "status", id, "--url", base])?;
        let line = stdout(&out);
        let status = status_of(&line);
        if cond(&status) {
            return Ok(status);
        }
        ensure!(Instant::now() < end, "{what}: {line}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The figures of a `batch status` line: `ID [###...] DONE/ROWS rows, F failed, STATE, …`.
fn status_of(line: &str) -> Value {
    let after = line.split("] ").nth(1).unwrap_or_default();
    let mut parts = after.split(", ");
    let counts = parts.next().unwrap_or_default().trim_end_matches(" rows");
    let (done, rows) = counts.split_once('/').unwrap_or(("0", "0"));
    let failed = parts.next().unwrap_or_default().trim_end_matches(" failed");
    let state = parts.next().unwrap_or_default().trim();
    serde_json::json!({
        "done": done.parse::<u64>().unwrap_or(0),
        "rows": rows.parse::<u64>().unwrap_or(0),
        "failed": failed.parse::<u64>().unwrap_or(0),
        "state": state,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_answers_every_row_in_order_with_per_row_errors_and_can_be_cancelled() -> Result<()> {
    let agent = TestAgent::start(&[root().join("models")], "").await?;
    let dir = tempfile::tempdir()?;
    let bad = [50, 120];
    let file = rows_file(dir.path(), 200, &bad)?;
    let base = agent.base.clone();
    let f = file.display().to_string();
    let (b2, f2) = (base.clone(), f.clone());
    let out =
        tokio::task::spawn_blocking(move || cli(&["batch", "submit", &f2, "--model", "mlp", "--wait", "--url", &b2]))
            .await??;
    ensure!(out.status.code() == Some(0), "submit: {} {}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    let id = stdout(&out).lines().next().unwrap_or_default().to_owned();
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(progress.contains("200/200 rows, 2 failed, done"), "{progress}");
    let output = tokio::task::spawn_blocking({
        let (id, base) = (id.clone(), base.clone());
        move || cli(&["batch", "output", &id, "--url", &base])
    })
    .await??;
    check_output(&stdout(&output), 200, &bad)?;

    // The job is one audit record with its counts and the input's digest.
    let digest = outpost_proto::registry::sha256_hex(&std::fs::read(&file)?);
    let log = stdout(&cli(&["audit", "export", "--config", agent.config_path().to_str().unwrap_or_default()])?);
    ensure!(
        log.lines()
            .any(|l| l.contains("\"action\":\"batch_job\"") && l.contains("200 rows, 2 failed") && l.contains(&digest)),
        "no job record"
    );
    ensure!(log.lines().filter(|l| l.contains("\"transport\":\"batch\"")).count() == 198, "per-row records");

    // CSV rows: the numbers of the MLP's one input.
    let golden = golden_for(&root().join("models/mlp"))?;
    let values: Vec<String> = golden.raw["cases"][0]["inputs"][0]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, format!("{}\n{}\nnot,numbers\n", values.join(","), values.join(", ")))?;
    let (b3, c3) = (base.clone(), csv.display().to_string());
    let out =
        tokio::task::spawn_blocking(move || cli(&["batch", "submit", &c3, "--model", "mlp", "--wait", "--url", &b3]))
            .await??;
    let id_csv = stdout(&out).lines().next().unwrap_or_default().to_owned();
    let output = stdout(&cli(&["batch", "output", &id_csv, "--url", &base])?);
    let lines: Vec<Value> = output.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    ensure!(lines.len() == 3, "{output}");
    golden.check(0, &lines[0]["answer"])?;
    golden.check(0, &lines[1]["answer"])?;
    ensure!(lines[2]["error"].as_str().is_some_and(|e| e.contains("not a number")), "{output}");

    // A long job cancelled: it ends as cancelled, the rows answered so far kept in order.
    let big = rows_file(dir.path(), 50_000, &[])?;
    let (b4, f4) = (base.clone(), big.display().to_string());
    let out =
        tokio::task::spawn_blocking(move || cli(&["batch", "submit", &f4, "--model", "mlp", "--url", &b4])).await??;
    let id_big = stdout(&out).lines().next().unwrap_or_default().to_owned();
    let (b5, i5) = (base.clone(), id_big.clone());
    tokio::task::spawn_blocking(move || wait_job(&b5, &i5, "rows answered", |s| s["done"].as_u64() > Some(10)))
        .await??;
    // Its progress in `outpost status` and on the status page while it runs.
    let status = stdout(&cli(&["status", "--url", &base])?);
    ensure!(status.contains(&format!("job {id_big} [")) && status.contains("rows/s"), "{status}");
    if let Some(browser) = crate::fleet::chromium() {
        let out = crate::fleet::chromium_run(&browser, &agent.url("/"), &["--virtual-time-budget=5000", "--dump-dom"])?;
        let html = String::from_utf8_lossy(&out.stdout);
        ensure!(html.contains(&format!("job {id_big} mlp: [")), "{html}");
    }
    ensure!(stdout(&cli(&["batch", "cancel", &id_big, "--url", &base])?).contains("cancelled"), "cancel");
    let (b6, i6) = (base.clone(), id_big.clone());
    let status =
        tokio::task::spawn_blocking(move || wait_job(&b6, &i6, "cancelled", |s| s["state"] == "cancelled")).await??;
    let done = status["done"].as_u64().unwrap_or(0) as usize;
    ensure!(done < 50_000, "{status}");
    check_output(&stdout(&cli(&["batch", "output", &id_big, "--url", &base])?), done, &[])?;
    // Live requests are answered while jobs run (and after).
    assert_eq!(agent.post("/v2/models/mlp/infer", &golden.request(1)).await?.0, 200);
    // Bad submissions are clear errors.
    let out = cli(&["batch", "submit", &f, "--model", "no-such-model", "--url", &base])?;
    ensure!(out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("404"), "{out:?}");
    agent.stop().await
}

#[test]
fn a_batch_job_killed_with_kill_9_resumes_and_answers_every_row_once_in_order() -> Result<()> {
    let models = mlp_only()?;
    let state = tempfile::tempdir()?;
    let config = state.path().join("outpost.toml");
    std::fs::write(&config, config_text(state.path(), &[models.path().to_owned()], ""))?;
    let cfg = config.display().to_string();
    let rows = 3_000;
    let file = rows_file(state.path(), rows, &[])?;
    let mut agent = ChildAgent::spawn(&outpost_bin(), &["run", "--config", &cfg])?;
    let base = format!("http://{}", agent.wait_listening()?);
    agent.seen_or_wait_for("initial model load finished", Duration::from_secs(60))?;
    let out = cli(&["batch", "submit", &file.display().to_string(), "--model", "mlp", "--url", &base])?;
    ensure!(out.status.success(), "{out:?}");
    let id = stdout(&out).lines().next().unwrap_or_default().to_owned();
    // Killed at three points chosen at random while rows are being answered.
    let mut seed = [0u8; 3];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    let mut kills = 0;
    let mut base = base;
    for (k, r) in seed.iter().enumerate() {
        let at = (k as u64 * 900) + 100 + u64::from(*r) * 3;
        let status = wait_job(&base, &id, "progress", |s| s["done"].as_u64() >= Some(at) || s["state"] == "done")?;
        if status["state"] == "done" {
            break;
        }
        agent.signal("KILL")?;
        let _ = agent.wait_status(Duration::from_secs(30))?;
        kills += 1;
        agent = ChildAgent::spawn(&outpost_bin(), &["run", "--config", &cfg])?;
        base = format!("http://{}", agent.wait_listening()?);
    }
    ensure!(kills >= 1, "the job ended before any kill");
    wait_job(&base, &id, "done after the kills", |s| s["state"] == "done")?;
    check_output(&stdout(&cli(&["batch", "output", &id, "--url", &base])?), rows, &[])?;
    agent.signal("TERM")?;
    ensure!(agent.wait_exit(Duration::from_secs(30))? == 0, "unclean stop");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_jobs_run_on_packages_and_pipelines_too() -> Result<()> {
    let agent = TestAgent::demo().await?;
    let base = agent.base.clone();
    let dir = tempfile::tempdir()?;
    // A package taking named fields: each CSV line is a row of them, as it is.
    let sample = std::fs::read_to_string(root().join("models/cancer-fields/sample.csv"))?;
    let fields = dir.path().join("fields.csv");
    std::fs::write(&fields, format!("{}{}1,2\n", sample, sample))?;
    // A pipeline taking a tensor (the cascade): each line is its numbers.
    let probes: Value = serde_json::from_slice(&std::fs::read(root().join("models/pipelines-probes.json"))?)?;
    let triage = probes["cancer-triage"].as_array().cloned().unwrap_or_default();
    let numbers = dir.path().join("numbers.csv");
    let lines: Vec<String> = triage
        .iter()
        .map(|p| {
            p["X"].as_array().cloned().unwrap_or_default().iter().map(Value::to_string).collect::<Vec<_>>().join(",")
        })
        .collect();
    std::fs::write(&numbers, lines.join("\n") + "\n")?;
    for (file, model) in [(fields, "cancer-fields"), (numbers, "cancer-triage")] {
        let (b, f, m) = (base.clone(), file.display().to_string(), model.to_owned());
        let out = tokio::task::spawn_blocking(move || {
            cli(&["batch", "submit", &f, "--model", &m, "--format", "csv", "--wait", "--url", &b])
        })
        .await??;
        ensure!(out.status.success(), "{model}: {out:?}");
        let id = stdout(&out).lines().next().unwrap_or_default().to_owned();
        let output = stdout(&cli(&["batch", "output", &id, "--url", &base])?);
        let answers: Vec<Value> = output.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        if model == "cancer-fields" {
            ensure!(answers.len() == 3, "{output}");
            for a in &answers[..2] {
                let diagnosis =
                    a["answer"]["outputs"].as_array().and_then(|o| o.iter().find(|t| t["name"] == "diagnosis"));
                ensure!(diagnosis.is_some_and(|d| d["data"] == serde_json::json!(["benign"])), "{output}");
            }
            ensure!(answers[2]["error"].as_str().is_some_and(|e| e.contains("2 values")), "{output}");
        } else {
            ensure!(answers.len() == triage.len(), "{output}");
            for (a, p) in answers.iter().zip(&triage) {
                let label = a["answer"]["outputs"].as_array().and_then(|o| o.iter().find(|t| t["name"] == "label"));
                ensure!(label.is_some_and(|l| l["data"] == serde_json::json!([p["label"]])), "{output}");
            }
        }
    }
    agent.stop().await
}
