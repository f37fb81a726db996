//! What a reload (SIGHUP, `outpost reload`) did: the settings it applied, the ones only a
//! restart applies (kept at their running value, never stored as if applied), and the ones
//! that failed to apply (the running value kept). The outcome goes to the log, to
//! `/admin/status` and to `<state_dir>/reload.json`, which `outpost reload` waits for.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// One reload's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The agent's process id and its reload count: together they name this reload.
    pub pid: u32,
    pub generation: u64,
    /// Unix time.
    pub at: i64,
    /// Why the file was refused as a whole (nothing applied), if it was.
    pub error: Option<String>,
    /// Changed settings now in effect.
    pub applied: Vec<String>,
    /// Changed settings that need a restart; their running value stays.
    pub needs_restart: Vec<String>,
    /// Changed settings that could not be applied; their running value stays.
    pub failed: Vec<String>,
    /// Models the reload's model pass refused to load (each keeps what served before).
    pub models_refused: usize,
}

impl ReloadReport {
    pub fn new(generation: u64) -> ReloadReport {
        ReloadReport {
            pid: std::process::id(),
            generation,
            at: outpost_proto::registry::now(),
            ..ReloadReport::default()
        }
    }

    /// Everything changed was applied.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.needs_restart.is_empty() && self.failed.is_empty()
    }

    /// One line for the log and the CLI.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("reload refused, the running configuration stays: {e}");
        }
        let mut parts = Vec::new();
        if self.applied.is_empty() {
            parts.push("no change to apply".to_owned());
        } else {
            parts.push(format!("applied: {}", self.applied.join(", ")));
        }
        if !self.needs_restart.is_empty() {
            parts.push(format!("needs a restart (running value kept): {}", self.needs_restart.join(", ")));
        }
        if !self.failed.is_empty() {
            parts.push(format!("failed (running value kept): {}", self.failed.join("; ")));
        }
        if self.models_refused > 0 {
            parts.push(format!("{} model(s) refused to load", self.models_refused));
        }
        parts.join("; ")
    }

    /// Where a state directory keeps the last reload's outcome.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("reload.json")
    }

    /// Writes the outcome (atomically: a reader sees the old one or this one).
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir);
        let tmp = state_dir.join(".reload.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    }

    /// The last outcome written in `state_dir`, if any.
    pub fn read(state_dir: &Path) -> Option<ReloadReport> {
        let bytes = std::fs::read(Self::path(state_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Where a state directory notes the reload that has begun: `<pid> <generation>`, written
/// before the configuration file is read. A reload that began before a file was edited may not
/// hold the edit, so `outpost reload` waits for a report past the one begun when it signals.
pub fn started_path(state_dir: &Path) -> PathBuf {
    state_dir.join("reload-started")
}

/// Notes that reload `generation` of process `pid` has begun (atomically).
pub fn write_started(state_dir: &Path, pid: u32, generation: u64) -> std::io::Result<()> {
    let tmp = state_dir.join(".reload-started.tmp");
    std::fs::write(&tmp, format!("{pid} {generation}\n"))?;
    std::fs::rename(&tmp, started_path(state_dir))
}

/// The generation of the last reload process `pid` began, if it noted one (read up to 64
/// bytes: a note is two numbers, whatever else the file holds).
pub fn read_started(state_dir: &Path, pid: u32) -> Option<u64> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(started_path(state_dir)).ok()?.take(64).read_to_string(&mut text).ok()?;
    let (who, generation) = text.trim().split_once(' ')?;
    (who.parse::<u32>().ok()? == pid).then_some(())?;
    generation.parse().ok()
}

/// Restores in `new` the settings only a restart applies (the listen address and connection
/// limits, TLS on or off, the log format, adding or removing `[registry]`, and the sections
/// whose parts are built at start); returns the keys that had changed.
pub fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<String> {
    let mut pending = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $key:expr) => {
            if old.$($field).+ != new.$($field).+ {
                pending.push($key.to_owned());
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(http.listen, "http.listen");
    keep!(http.max_connections, "http.max_connections");
    keep!(http.max_header_bytes, "http.max_header_bytes");
    keep!(http.header_read_timeout, "http.header_read_timeout");
    keep!(http.idle_timeout, "http.idle_timeout");
    if old.http.tls.is_some() != new.http.tls.is_some() {
        pending.push("http.tls_cert (TLS on or off)".to_owned());
        new.http.tls = old.http.tls.clone();
    }
    keep!(grpc, "[grpc]");
    keep!(webhooks, "[[webhooks]]");
    keep!(node, "[node]");
    keep!(log.format, "log.format");
    if old.registry.is_some() != new.registry.is_some() {
        pending.push("[registry] (added or removed)".to_owned());
        new.registry = old.registry.clone();
    }
    keep!(upstream, "[upstream]");
    keep!(overflow, "[overflow]");
    // `audit.keep_unsent` follows `[upstream]`: named with it, not as an `[audit]` change.
    if let (Some(o), Some(n)) = (&old.audit, &mut new.audit) {
        n.keep_unsent = o.keep_unsent;
    }
    keep!(audit, "[audit]");
    keep!(privacy, "[privacy]");
    keep!(store_key_file, "store.key_file");
    pending
}

/// The live settings that differ between `old` and `new` (after [`keep_restart_only`]).
pub fn changed_live(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut note = |differs: bool, key: &str| {
        if differs {
            changed.push(key.to_owned());
        }
    };
    let names: std::collections::BTreeSet<&String> = old.models.keys().chain(new.models.keys()).collect();
    for name in names {
        note(old.models.get(name) != new.models.get(name), &format!("models.{name}"));
    }
    note(old.local_models != new.local_models, "local_models.dirs");
    note(old.auth != new.auth, "[auth]");
    note(old.engine_threads != new.engine_threads, "engine.threads");
    note(old.http.max_body_bytes != new.http.max_body_bytes, "http.max_body_bytes");
    note(old.http.request_timeout != new.http.request_timeout, "http.request_timeout");
    note(old.http.tls != new.http.tls, "http.tls_cert");
    note(old.registry != new.registry, "[registry]");
    note(old.mqtt != new.mqtt, "[mqtt]");
    note(old.log.level != new.log.level, "log.level");
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_settings_keep_their_running_value_and_live_ones_are_named() {
        let old = Config::dev_profile();
        let mut new = old.clone();
        new.http.listen = "127.0.0.1:1".parse().unwrap();
        new.http.max_connections += 1;
        new.log.format = crate::config::LogFormat::Json;
        new.log.level = "debug".into();
        new.engine_threads += 1;
        let pending = keep_restart_only(&old, &mut new);
        assert_eq!(pending, ["http.listen", "http.max_connections", "log.format"]);
        assert_eq!(new.http.listen, old.http.listen);
        assert_eq!(new.http.max_connections, old.http.max_connections);
        assert_eq!(new.log.format, old.log.format);
        assert_eq!(changed_live(&old, &new), ["engine.threads", "log.level"]);
    }

    #[test]
    fn the_report_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ReloadReport::read(dir.path()).is_none());
        let mut r = ReloadReport::new(3);
        r.needs_restart.push("http.listen".into());
        r.write(dir.path()).unwrap();
        let back = ReloadReport::read(dir.path()).unwrap();
        assert_eq!(back, r);
        assert!(!back.ok());
        assert!(back.summary().contains("needs a restart (running value kept): http.listen"), "{}", back.summary());
    }

    #[test]
    fn the_reload_begun_is_read_back_for_its_own_process_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(super::read_started(dir.path(), 42), None);
        super::write_started(dir.path(), 42, 7).unwrap();
        assert_eq!(super::read_started(dir.path(), 42), Some(7));
        assert_eq!(super::read_started(dir.path(), 43), None, "another process's note");
        std::fs::write(super::started_path(dir.path()), "42 seven\n").unwrap();
        assert_eq!(super::read_started(dir.path(), 42), None, "garbage is no generation");
    }
}
