//! `outpost-collector` as a child process for tests: served on a free loopback port against a
//! test PostgreSQL ([`crate::postgres::Postgres`]), enrolling nodes and readers through its CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::ChildAgent;

pub struct Collector {
    pub process: ChildAgent,
    pub url: String,
}

/// Runs a collector CLI command against `dsn`; returns its stdout.
pub fn cli(bin: &Path, dsn: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .args(["--database", dsn])
        .env_remove("OUTPOST_COLLECTOR_CONFIG")
        .output()
        .context("outpost-collector")?;
    if !out.status.success() {
        bail!(
            "outpost-collector {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Enrolls `node` (with its public key file when given); returns its token.
pub fn enroll(bin: &Path, dsn: &str, node: &str, key: Option<&Path>) -> Result<String> {
    let mut args = vec!["enroll", node];
    let key_arg;
    if let Some(k) = key {
        key_arg = k.display().to_string();
        args.extend(["--key", &key_arg]);
    }
    let out = cli(bin, dsn, &args)?;
    // The printed line: echo '<token>' > /etc/outpost/upstream.token
    out.lines()
        .find_map(|l| l.split('\'').nth(1).filter(|t| t.len() == 64))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no token in:\n{out}"))
}

/// A reader token.
pub fn reader(bin: &Path, dsn: &str, name: &str) -> Result<String> {
    Ok(cli(bin, dsn, &["reader", name])?.trim().to_owned())
}

impl Collector {
    /// Starts a collector on a free loopback port; returns once it listens.
    pub fn start(bin: &Path, dsn: &str) -> Result<Collector> {
        let config = tempfile::NamedTempFile::new()?;
        std::fs::write(config.path(), "listen = \"127.0.0.1:0\"\n")?;
        let path: PathBuf = config.path().to_owned();
        let path_s = path.display().to_string();
        let mut process = ChildAgent::spawn(bin, &["serve", "--config", &path_s, "--database", dsn])?;
        let line = process.wait_for("collector listening", Duration::from_secs(60))?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .ok_or_else(|| anyhow!("no addr in {line}"))?;
        drop(config);
        Ok(Collector { process, url: format!("http://{addr}") })
    }

    /// Kills the process (SIGKILL) and waits for it to be gone.
    pub fn kill_9(&mut self) -> Result<()> {
        self.process.signal("KILL")?;
        self.process.wait_status(Duration::from_secs(30))?;
        Ok(())
    }
}
