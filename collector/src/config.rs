//! The collector's configuration: a TOML file (`/etc/outpost-collector/collector.toml`), every key
//! optional, unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the packaged collector reads its configuration.
pub const DEFAULT_PATH: &str = "/etc/outpost-collector/collector.toml";

#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the HTTP API (agents, operators, Prometheus).
    pub listen: SocketAddr,
    /// libpq-style connection string of the PostgreSQL database.
    pub database: String,
    /// Connections this collector keeps open to PostgreSQL.
    pub connections: usize,
    /// Days of audit records kept; older day partitions are dropped.
    pub retention_days: u32,
    /// Largest request body accepted (compressed), in bytes.
    pub max_body_bytes: usize,
    /// Largest audit batch once decompressed, in bytes.
    pub max_batch_bytes: usize,
    /// A node not heard from for this many seconds is shown as silent.
    pub silent_after_s: u64,
    pub path: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            database: "host=/var/run/postgresql dbname=outpost".into(),
            connections: 4,
            retention_days: 400,
            max_body_bytes: 16 << 20,
            max_batch_bytes: 64 << 20,
            silent_after_s: 180,
            path: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<SocketAddr>,
    database: Option<String>,
    connections: Option<usize>,
    retention_days: Option<u32>,
    max_body_bytes: Option<usize>,
    max_batch_bytes: Option<usize>,
    silent_after_s: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads `path`; a missing file at the default path means the embedded defaults.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => return Ok(Config::default()),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        let raw: Raw = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let d = Config::default();
        let c = Config {
            listen: raw.listen.unwrap_or(d.listen),
            database: raw.database.unwrap_or(d.database),
            connections: raw.connections.unwrap_or(d.connections),
            retention_days: raw.retention_days.unwrap_or(d.retention_days),
            max_body_bytes: raw.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_batch_bytes: raw.max_batch_bytes.unwrap_or(d.max_batch_bytes),
            silent_after_s: raw.silent_after_s.unwrap_or(d.silent_after_s),
            path: Some(path.to_owned()),
        };
        if !(1..=64).contains(&c.connections) {
            return Err(invalid("connections must be between 1 and 64".into()));
        }
        if c.retention_days == 0 {
            return Err(invalid("retention_days must be at least 1".into()));
        }
        if c.max_body_bytes < 1024 || c.max_batch_bytes < c.max_body_bytes {
            return Err(invalid("max_body_bytes must be at least 1024 and at most max_batch_bytes".into()));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_key() {
        let p = Path::new("/etc/outpost-collector/collector.toml");
        let e = Config::parse("listn = \"127.0.0.1:1\"", p).expect_err("unknown key");
        assert!(e.to_string().contains("listn"), "{e}");
        let e = Config::parse("connections = 0", p).expect_err("no connections");
        assert!(e.to_string().contains("connections"), "{e}");
        let c = Config::parse("listen = \"127.0.0.1:9999\"\nretention_days = 30", p).expect("valid");
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.retention_days, 30);
        assert_eq!(c.database, Config::default().database);
    }
}
