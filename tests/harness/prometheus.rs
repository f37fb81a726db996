//! A real Prometheus per test (Debian's `prometheus`), on a free loopback port, with its
//! remote-write receiver on and nothing to scrape; queried back with PromQL over its HTTP API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// The prometheus binary: `OUTPOST_PROMETHEUS`, else /usr/bin/prometheus, else PATH.
pub fn prometheus_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OUTPOST_PROMETHEUS") {
        return Ok(PathBuf::from(p));
    }
    if std::path::Path::new("/usr/bin/prometheus").is_file() {
        return Ok(PathBuf::from("/usr/bin/prometheus"));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("prometheus");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("prometheus not found: scripts/setup-test.sh installs it (apt-get install prometheus)")
}

pub struct Prometheus {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus; `out_of_order_window` is its TSDB's out-of-order time window (what a
    /// backlog older than its head needs).
    pub fn start(out_of_order_window: &str) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1h\nstorage:\n  tsdb:\n    out_of_order_time_window: {out_of_order_window}\n"),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = Command::new(prometheus_bin()?)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("prometheus")?;
        crate::wait_ready(&mut child, "Server is ready to receive web requests", "prometheus")?;
        Ok(Prometheus { url: format!("http://127.0.0.1:{port}"), child, _dir: dir })
    }

    /// The remote-write endpoint.
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url)
    }

    /// An instant PromQL query; returns the result vector (`[{metric, value: [t, "v"]}]`).
    pub async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        let resp: serde_json::Value = crate::http_client()
            .get(format!("{}/api/v1/query?query={}", self.url, percent_encode(promql)))
            .send()
            .await?
            .json()
            .await?;
        if resp["status"] != "success" {
            bail!("query {promql}: {resp}");
        }
        Ok(resp["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
