//! Two boxes, one site: the VRRP role keepalived gives this box (MASTER, BACKUP, FAULT), as its
//! notify hook reports it (`outpost ha-notify`). The agent shows it in status and metrics and
//! records each change in the audit log and as an event. The last report is kept in
//! `<state_dir>/ha.json`, so a role reported while the agent was down (keepalived notifies
//! FAULT when the agent dies) is recorded when it starts again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The states keepalived reports to a notify script.
pub const STATES: [&str; 4] = ["MASTER", "BACKUP", "FAULT", "STOP"];

/// One role report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// The VRRP instance (keepalived's `vrrp_instance` name).
    pub instance: String,
    /// MASTER, BACKUP, FAULT or STOP.
    pub state: String,
    #[serde(default)]
    pub priority: Option<u32>,
    /// When it was reported (Unix seconds).
    pub at: i64,
    /// Whether the agent has recorded it in its audit log.
    #[serde(default)]
    pub recorded: bool,
}

impl Role {
    /// Checks a report's fields (they come from a hook's arguments or an HTTP body).
    pub fn new(instance: &str, state: &str, priority: Option<u32>) -> Result<Role, String> {
        let state = state.to_ascii_uppercase();
        if !STATES.contains(&state.as_str()) {
            return Err(format!("state '{state}': one of {}", STATES.join(", ")));
        }
        if instance.is_empty() || instance.len() > 128 || !instance.chars().all(|c| c.is_ascii_graphic()) {
            return Err("instance: 1 to 128 printable characters".into());
        }
        Ok(Role { instance: instance.to_owned(), state, priority, at: outpost_proto::registry::now(), recorded: false })
    }

    /// The status section.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "role": self.state,
            "instance": self.instance,
            "priority": self.priority,
            "since": outpost_proto::registry::format_time(self.at),
        })
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("ha.json")
}

/// The last role reported, if any (a damaged file counts as none).
pub fn load(state_dir: &Path) -> Option<Role> {
    std::fs::read(path(state_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

pub fn save(state_dir: &Path, role: &Role) -> Result<(), String> {
    let bytes = serde_json::to_vec(role).map_err(|e| e.to_string())?;
    crate::store::write_atomic(&path(state_dir), &bytes).map_err(|e| format!("{}: {e}", path(state_dir).display()))
}

/// Shows `role` in status and metrics, records it in the audit log and as an event (by
/// `principal`), and keeps it in the state directory; the error says it could not be recorded.
pub async fn report(
    service: &crate::api::InferenceService,
    state_dir: &Path,
    mut role: Role,
    principal: &str,
) -> Result<(), String> {
    service.metrics.set_section("ha", role.status());
    service.metrics.set_gauge("ha_master", if role.state == "MASTER" { 1.0 } else { 0.0 });
    let outcome = match role.priority {
        Some(p) => format!("{} (priority {p})", role.state),
        None => role.state.clone(),
    };
    let event = crate::api::Event::Admin {
        principal: principal.to_owned(),
        action: "ha_role".into(),
        target: role.instance.clone(),
        outcome,
    };
    let recorded = service.events.record(event).await;
    role.recorded = recorded.is_ok();
    if let Err(e) = save(state_dir, &role) {
        tracing::warn!(error = %e, "could not keep the HA role");
    }
    recorded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_checked_and_kept() {
        assert!(Role::new("site", "master", Some(150)).is_ok_and(|r| r.state == "MASTER"));
        assert!(Role::new("site", "LEADER", None).is_err());
        assert!(Role::new("", "BACKUP", None).is_err());
        assert!(Role::new("a b", "BACKUP", None).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_none());
        let r = Role::new("site", "BACKUP", Some(100)).unwrap();
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path()), Some(r));
        std::fs::write(path(dir.path()), b"{").unwrap();
        assert!(load(dir.path()).is_none());
    }
}
