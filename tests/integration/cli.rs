//! The `outpost` binary as a child process: exit codes, signals, reload.

use std::time::Duration;

use outpost_tests::*;

use crate::outpost_bin;

fn write_config(dir: &std::path::Path, extra: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, config_text(dir, &[root().join("models")], extra))?;
    Ok(path)
}

/// An agent run on a configuration of `extra` written in `dir`, with `env`, once its models
/// are loaded: the agent, its HTTP address and the configuration file.
fn agent_on(
    dir: &std::path::Path,
    extra: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(ChildAgent, String, std::path::PathBuf)> {
    let path = write_config(dir, extra)?;
    let p = path.to_str().unwrap_or_default();
    let mut child = ChildAgent::spawn_env(&outpost_bin(), &["run", "--config", p], env)?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(120))?;
    Ok((child, addr, path))
}

#[test]
fn exit_codes_follow_sysexits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = write_config(dir.path(), "")?;
    let out = std::process::Command::new(outpost_bin()).args(["check-config", "--config"]).arg(&good).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[http]\nlisten = \"127.0.0.1:0\"\nunknown_key = 1\n")?;
    let out = std::process::Command::new(outpost_bin()).args(["check-config", "--config"]).arg(&bad).output()?;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `unknown_key`"), "{err}");

    let out = std::process::Command::new(outpost_bin()).args(["run", "--config"]).arg(&bad).output()?;
    assert_eq!(out.status.code(), Some(78), "run refuses a bad config");

    let out = std::process::Command::new(outpost_bin()).arg("--no-such-flag").output()?;
    assert_eq!(out.status.code(), Some(64));
    let out = std::process::Command::new(outpost_bin()).arg("--help").output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
    Ok(())
}

#[test]
fn check_models_reproduces_golden_vectors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = write_config(dir.path(), "")?;
    let out = std::process::Command::new(outpost_bin()).args(["check-models", "--config"]).arg(&good).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("10 models, 0 refused"), "{stdout}");
    // Packages are proven whole: raw input in, final output out.
    assert!(
        stdout.lines().any(|l| l.starts_with("digits-png: ok") && l.contains("package golden vectors reproduced")),
        "{stdout}"
    );

    let path = dir.path().join("fixtures.toml");
    std::fs::write(&path, config_text(dir.path(), &[root().join("tests/fixtures/models")], ""))?;
    let out = std::process::Command::new(outpost_bin()).args(["check-models", "--config"]).arg(&path).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("unsupported-op: REFUSED: operator not supported by the engine"), "{stdout}");
    assert!(stdout.contains("qdq-softmax-u8: REFUSED: golden vectors not reproduced"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_and_sigterm_shutdown() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, addr, path) = agent_on(dir.path(), "", &[])?;
    let http = outpost_tests::http_client();
    let ready = |m: &str| format!("http://{addr}/v2/models/{m}/ready");
    assert_eq!(http.get(ready("cnn")).send().await?.status().as_u16(), 200);

    // A bad config on SIGHUP is refused; the old one keeps serving.
    std::fs::write(&path, "[http]\nlisten = 12\n")?;
    child.signal("HUP")?;
    child.wait_for("reload refused", Duration::from_secs(30))?;
    assert_eq!(http.get(ready("cnn")).send().await?.status().as_u16(), 200);

    // A good one that disables the CNN takes effect.
    std::fs::write(&path, config_text(dir.path(), &[root().join("models")], "[models.cnn]\nenabled = false\n"))?;
    child.signal("HUP")?;
    child.wait_for("configuration reloaded", Duration::from_secs(60))?;
    assert_eq!(http.get(ready("cnn")).send().await?.status().as_u16(), 404);
    assert_eq!(http.get(ready("mlp")).send().await?.status().as_u16(), 200);

    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    assert!(child.log.iter().any(|l| l.contains("SIGTERM")));
    Ok(())
}

/// `outpost reload` (what `systemctl reload` runs): applies what can change live and says so,
/// refuses a setting that needs a restart (exit 1, the running value kept, named in the
/// status), refuses an invalid file (exit 78, nothing changes), and finds no agent (69).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outpost_reload_reports_what_it_applied_and_fails_when_it_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Without an audit log, each request is logged at debug level: the log level's witness.
    let base = "[audit]\nenabled = false\n";
    // An empty RUST_LOG: the file's log.level governs.
    let (mut child, addr, path) = agent_on(dir.path(), base, &[("RUST_LOG", "")])?;
    let p = path.to_str().unwrap_or_default();
    let http = outpost_tests::http_client();
    let ready = |m: &str| format!("http://{addr}/v2/models/{m}/ready");
    let reload = || -> anyhow::Result<(Option<i32>, String)> {
        let out = std::process::Command::new(outpost_bin()).args(["reload", "--config", p]).output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code(), text))
    };

    // Live: a model's settings and the log level.
    let live = format!("{base}[log]\nlevel = \"debug\"\n\n[models.cnn]\nenabled = false\n");
    std::fs::write(&path, config_text(dir.path(), &[root().join("models")], &live))?;
    let (code, text) = reload()?;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("applied: models.cnn, log.level"), "{text}");
    assert_eq!(http.get(ready("cnn")).send().await?.status().as_u16(), 404);
    let body =
        serde_json::json!({"inputs": [{"name": "X", "shape": [1, 30], "datatype": "FP32", "data": vec![0.5f32; 30]}]});
    let answer = http.post(format!("http://{addr}/v2/models/mlp/infer")).json(&body).send().await?;
    assert_eq!(answer.status().as_u16(), 200);
    let line = child.wait_for("request_id", Duration::from_secs(30))?;
    assert!(line.contains("DEBUG"), "debug now logged: {line}");

    // A new listen address needs a restart: refused, named, the old address kept.
    let moved = config_text(dir.path(), &[root().join("models")], &live).replace("127.0.0.1:0", "127.0.0.1:1");
    std::fs::write(&path, moved)?;
    let (code, text) = reload()?;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("needs a restart (running value kept): http.listen"), "{text}");
    let status: serde_json::Value = http.get(format!("http://{addr}/admin/status")).send().await?.json().await?;
    assert_eq!(status["reload"]["needs_restart"], serde_json::json!(["http.listen"]), "{status}");
    assert!(status["alarms"]["restart_needed"].as_str().unwrap_or_default().contains("http.listen"), "{status}");
    let table = std::process::Command::new(outpost_bin())
        .args(["status", "--config", p, "--url"])
        .arg(format!("http://{addr}"))
        .output()?;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("reload:") && table.contains("needs a restart"), "{table}");
    assert_eq!(http.get(ready("mlp")).send().await?.status().as_u16(), 200, "still on its address");

    // An invalid file: refused before the agent is asked; nothing changes.
    std::fs::write(&path, "[http]\nlisten = 12\n")?;
    let (code, text) = reload()?;
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("listen"), "{text}");
    assert_eq!(http.get(ready("mlp")).send().await?.status().as_u16(), 200);

    // No agent: exit 69.
    std::fs::write(&path, config_text(dir.path(), &[root().join("models")], &live))?;
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    let (code, text) = reload()?;
    assert_eq!(code, Some(69), "{text}");
    Ok(())
}

/// Two `outpost reload` commands race: the first one's reload has read the file when the file
/// is edited and a second command signals. The second command reports a reload that holds its
/// edit, not the one that was under way. Failpoints hold the agent after each read of the file
/// and the second command after its signal, so the order is the test's: the second command
/// looks while the report of the reload under way is the last one written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_way_when_the_file_is_edited_is_not_the_one_reported_for_the_edit() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir()?;
    let base = "[audit]\nenabled = false\n";
    let fifos = dir.path().to_str().unwrap_or_default();
    for name in ["reload-after-read", "reload-signalled"] {
        let made = std::process::Command::new("mkfifo").arg(dir.path().join(name)).status()?;
        anyhow::ensure!(made.success(), "mkfifo {name}");
    }
    let env = [("OUTPOST_FAILPOINTS", "reload-after-read"), ("OUTPOST_FAILPOINT_DIR", fifos)];
    let (mut child, addr, path) = agent_on(dir.path(), base, &env)?;
    let p = path.to_str().unwrap_or_default();
    let command = |failpoints: &str| {
        std::process::Command::new(outpost_bin())
            .args(["reload", "--config", p])
            .env("OUTPOST_FAILPOINTS", failpoints)
            .env("OUTPOST_FAILPOINT_DIR", fifos)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    // A byte in a paused point's FIFO lets it go.
    let release = |name: &str| {
        use std::io::Write as _;
        std::fs::OpenOptions::new().write(true).open(dir.path().join(name))?.write_all(b"g")
    };
    let paused = "failpoint reload-after-read: paused";

    // The first command's reload reads the file as it is, and is held there.
    let first = command("")?;
    child.wait_for(paused, Duration::from_secs(60))?;
    // The edit, and a second command, held once it has signalled.
    let live = format!("{base}[models.cnn]\nenabled = false\n");
    std::fs::write(&path, config_text(dir.path(), &[root().join("models")], &live))?;
    let mut second = command("reload-signalled")?;
    let stderr = second.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let signalled = lines.by_ref().map_while(Result::ok).any(|l| l.contains("failpoint reload-signalled: paused"));
    anyhow::ensure!(signalled, "the second command ended before it signalled");
    // The reload under way reports (without the edit); the next one, for the second signal,
    // has read the edited file and is held. Only then does the second command look.
    release("reload-after-read")?;
    child.wait_for(paused, Duration::from_secs(60))?;
    let first = first.wait_with_output()?;
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    release("reload-signalled")?;
    release("reload-after-read")?;
    let second = second.wait_with_output()?;
    let text = String::from_utf8_lossy(&second.stdout);
    assert_eq!(second.status.code(), Some(0), "{text}");
    assert!(text.contains("applied: models.cnn"), "the second command reported: {text}");
    let http = outpost_tests::http_client();
    assert_eq!(http.get(format!("http://{addr}/v2/models/cnn/ready")).send().await?.status().as_u16(), 404);
    Ok(())
}

#[test]
fn keygen_init_and_rotate_root_from_the_command_line() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let run = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(outpost_bin()).args(args).current_dir(dir.path()).output()?)
    };
    for k in ["root1", "root2", "index1"] {
        let out = run(&["keygen", "--out", k])?;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let mode = std::fs::metadata(dir.path().join(format!("{k}.key")))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "private key mode");
    }
    assert_eq!(run(&["keygen", "--out", "root1"])?.status.code(), Some(64), "never overwrites a key");
    let out = run(&["registry", "init", "--registry", "reg", "--root-key", "root1.key", "--index-key", "index1.key"])?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // Without the current root key's signature the rotation is refused.
    let out =
        run(&["registry", "rotate-root", "--registry", "reg", "--old-key", "root2.key", "--new-key", "root2.key"])?;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("by the old root keys"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("reg/roots/2.json").exists());
    // With it, root v2 is written and verifies.
    let out =
        run(&["registry", "rotate-root", "--registry", "reg", "--old-key", "root1.key", "--new-key", "root2.key"])?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let root = outpost::registry::trust::verify_root_self(&std::fs::read(dir.path().join("reg/roots/2.json"))?)?;
    assert_eq!(root.version, 2);
    Ok(())
}

#[test]
fn only_the_dev_profile_may_trust_the_demo_root() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let demo = root().join("models/registry");
    let extra = registry_toml(&format!("file://{}", demo.display()), &demo.join("root.json"), "");
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(dir.path(), &[], &extra))?;
    let out = std::process::Command::new(outpost_bin()).args(["check-config", "--config"]).arg(&path).output()?;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("demo root"), "{}", String::from_utf8_lossy(&out.stderr));
    // The dev profile trusts it and serves the demo models through it.
    let out = std::process::Command::new(outpost_bin()).args(["check-config", "--dev"]).current_dir(root()).output()?;
    assert_eq!(out.status.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_profile_serves_the_demo_models_through_the_signed_registry() -> anyhow::Result<()> {
    let mut config = outpost::config::Config::dev_profile();
    let state = tempfile::tempdir()?;
    config.node.state_dir = state.path().to_path_buf();
    config.http.listen = "127.0.0.1:0".parse()?;
    config.local_models.clear();
    assert!(config.registry.is_some(), "the dev profile uses the demo registry");
    let agent = outpost::start(config).await?;
    agent.started().await;
    let http = http_client();
    for name in DEMO_MODELS {
        let golden = golden_for(&root().join("models").join(name))?;
        let r = http
            .post(format!("http://{}/v2/models/{name}/infer", agent.addr()))
            .json(&golden.request(2))
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 200, "{name}");
        let body: serde_json::Value = r.json().await?;
        assert_eq!(body["model_version"], "1.0.0");
        golden.check(2, &body)?;
    }
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_and_status_are_thin_clients_of_the_running_agent() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let golden = golden_for(&root().join("models/mlp"))?;
    let dir = tempfile::tempdir()?;
    let req = dir.path().join("req.json");
    std::fs::write(&req, serde_json::to_vec(&golden.request(0))?)?;
    let out = tokio::process::Command::new(outpost_bin())
        .args(["infer", "mlp", "--data"])
        .arg(&req)
        .args(["--url", &agent.base])
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    golden.check(0, &answer)?;
    let out = tokio::process::Command::new(outpost_bin())
        .args(["infer", "nope", "--data"])
        .arg(&req)
        .args(["--url", &agent.base])
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown model"));
    let out =
        tokio::process::Command::new(outpost_bin()).args(["status", "--json", "--url", &agent.base]).output().await?;
    assert_eq!(out.status.code(), Some(0));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["node"], "test-node");
    assert!(status["models"].as_array().is_some_and(|m| m.len() == demo_names().len()));
    assert_eq!(
        status["models"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "mlp")).map(|m| m["requests"].clone()),
        Some(serde_json::json!(1))
    );
    // At a glance: a node line, a header, a row per model, the alarms; short enough to read.
    let out = tokio::process::Command::new(outpost_bin()).args(["status", "--url", &agent.base]).output().await?;
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("test-node (test-site) outpost ") && lines[0].ends_with("ready"), "{table}");
    let header = lines.iter().position(|l| l.starts_with("MODEL")).ok_or_else(|| anyhow::anyhow!("{table}"))?;
    assert!(lines[header].contains("REQ/S") && lines[header].contains("P99") && lines[header].contains("CANARY"));
    let mlp = lines.iter().find(|l| l.starts_with("mlp ")).ok_or_else(|| anyhow::anyhow!("{table}"))?;
    assert!(mlp.contains("READY") && mlp.contains("as-published") && mlp.contains(" ms"), "{mlp}");
    assert!(table.contains("alarms: none"), "{table}");
    // A line per model and per demo pipeline, and a few more.
    assert!(lines.len() <= demo_names().len() + 2 + 6, "{} lines:\n{table}", lines.len());
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_exits_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write_config(dir.path(), "")?;
    let config = path.to_str().unwrap_or_default();
    let mut first = ChildAgent::spawn(&outpost_bin(), &["run", "--config", config])?;
    let addr = first.wait_listening()?;
    first.wait_for("initial model load finished", Duration::from_secs(120))?;
    // The same configuration (its own free port): refused before it touches the state.
    let out = std::process::Command::new(outpost_bin()).args(["run", "--config", config]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("another outpost agent") && err.contains("is running on the state directory"), "{err}");
    // The first one serves on and its audit chain is whole.
    let golden = golden_for(&root().join("models/mlp"))?;
    let r = http_client().post(format!("http://{addr}/v2/models/mlp/infer")).json(&golden.request(0)).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    first.signal("TERM")?;
    assert_eq!(first.wait_exit(Duration::from_secs(30))?, 0);
    let out = std::process::Command::new(outpost_bin()).args(["audit", "verify", "--config", config]).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

#[test]
fn read_only_commands_create_nothing_in_the_state_directory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(&state, &[root().join("models")], ""))?;
    for args in [
        &["model", "list"][..],
        &["audit", "verify"][..],
        &["audit", "export"][..],
        &["status", "--url", "http://127.0.0.1:9"][..],
        &["check-config"][..],
    ] {
        let out = std::process::Command::new(outpost_bin()).args(args).arg("--config").arg(&path).output()?;
        assert!(!state.exists(), "`outpost {}` created {}", args.join(" "), state.display());
        if args[0] != "status" {
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

#[test]
fn a_missing_device_key_is_a_configuration_error_that_says_what_to_do() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = outpost_tests::registry::TestRegistry::new()?;
    reg.publish("mlp", "mlp", "1.0.0")?;
    let url = format!("file://{}", reg.path().display());
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(dir.path(), &[], &registry_toml(&url, &reg.root_json(), "")))?;
    let config = path.to_str().unwrap_or_default();
    let mut child = ChildAgent::spawn(&outpost_bin(), &["run", "--config", config])?;
    child.wait_for("initial model load finished", Duration::from_secs(120))?;
    child.signal("TERM")?;
    assert_eq!(child.wait_exit(Duration::from_secs(30))?, 0);
    // The store holds an encrypted model; its key is gone.
    std::fs::remove_file(dir.path().join("store.key"))?;
    let out = std::process::Command::new(outpost_bin()).args(["run", "--config", config]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("store.key_file") && err.contains("restore the key file"), "{err}");
    assert!(!dir.path().join("store.key").exists(), "no new key replaces the lost one");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_use_the_configuration_they_find_and_name_network_causes() -> anyhow::Result<()> {
    let agent = TestAgent::demo().await?;
    let dir = tempfile::tempdir()?;
    // The agent's configuration as an operator's file, with its real address.
    let addr = agent.base.trim_start_matches("http://").to_owned();
    let text = config_text(dir.path(), &[root().join("models")], "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let file = dir.path().join("outpost.toml");
    std::fs::write(&file, text)?;
    let cli = |args: &[&str], env: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(outpost_bin());
        c.args(args).env_remove("OUTPOST_CONFIG");
        if let Some(p) = env {
            c.env("OUTPOST_CONFIG", p);
        }
        c.output()
    };
    // $OUTPOST_CONFIG is found without --config, by check-config and by status.
    let out = cli(&["check-config"], Some(&file))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{}: ok", file.display()));
    let out = cli(&["status", "--json"], Some(&file))?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["node"], "test-node");
    // --dev forces the dev profile.
    let out = cli(&["check-config", "--dev"], Some(&file))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dev profile: ok");
    // An agent that is not there: exit 69 and the cause, not "error sending request".
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let out = cli(&["status", "--url", &format!("http://{closed}")], None)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    agent.stop().await
}

#[test]
fn settings_for_unknown_models_and_directories_without_a_model_are_warned_of_at_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("mlp"))?;
    std::fs::copy(root().join("models/mlp/model.onnx"), models.join("mlp/model.onnx"))?;
    std::fs::create_dir_all(models.join("notes"))?;
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(&dir.path().join("state"), &[models], "[models.ghost]\nmax_queue = 8\n"))?;
    let mut agent = ChildAgent::spawn(&outpost_bin(), &["run", "--config", path.to_str().unwrap_or_default()])?;
    agent.wait_for("without model.onnx", std::time::Duration::from_secs(60))?;
    let line = agent.wait_for("names no local model", std::time::Duration::from_secs(60))?;
    assert!(line.contains("ghost"), "{line}");
    agent.signal("TERM")?;
    assert_eq!(agent.wait_exit(std::time::Duration::from_secs(30))?, 0);
    Ok(())
}

#[test]
fn model_list_shows_local_models_too() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("outpost.toml");
    std::fs::write(
        &path,
        config_text(&dir.path().join("state"), &[root().join("models")], "[models.cnn]\nenabled = false\n"),
    )?;
    let text = crate::model_list(&path)?;
    let row =
        |name: &str| text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_default().to_owned();
    assert!(row("mlp").contains(" local ") && row("mlp").contains("golden vectors"), "{text}");
    assert!(row("cnn").contains(" disabled "), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" local ") || l.contains(" disabled ")).count(),
        demo_names().len(),
        "{text}"
    );
    Ok(())
}
