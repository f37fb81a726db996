//! The `outpost` binary as a child process: exit codes, signals, reload.

use std::time::Duration;

use outpost_tests::*;

use crate::outpost_bin;

fn write_config(dir: &std::path::Path, extra: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, config_text(dir, &[root().join("models")], extra))?;
    Ok(path)
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
    assert!(stdout.contains("6 models, 0 refused"), "{stdout}");

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
    let path = write_config(dir.path(), "")?;
    let mut child = ChildAgent::spawn(&outpost_bin(), &["run", "--config", path.to_str().unwrap_or_default()])?;
    let addr = child.wait_listening()?;
    child.wait_for("initial model load finished", Duration::from_secs(120))?;
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
