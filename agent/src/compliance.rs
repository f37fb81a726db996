//! Compliance as code: a configuration checked against a signed baseline (`baseline.json`
//! from the registry, [`outpost_proto::registry::Baseline`]). [`check`] lists every drift; the
//! agent runs it at start, at reload and every `compliance.interval`, and `outpost
//! check-config --baseline FILE` runs it offline. In `enforce` mode a drifting start or
//! reload is refused; in `report` mode it is reported (alarm, metric, event, audit record).
//!
//! This module only judges. Where the baseline comes from (the registry sync) and where a
//! finding goes (metrics, events, the audit log) is the agent's wiring in `lib.rs`.

use std::path::Path;
use std::sync::RwLock;

use outpost_proto::registry::{Baseline, BaselineRules, SemVer};
use serde::Serialize;

use crate::config::{Config, OverflowMode};
use crate::locks::RwLockExt;

/// One rule the configuration breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// A served registry model and its manifest's quantization label.
pub type Served = (String, String);

/// Every drift of `config` (and the models it serves) from `rules`.
pub fn check(config: &Config, rules: &BaselineRules, served: &[Served]) -> Vec<Drift> {
    let mut out = Vec::new();
    let mut drift = |rule, detail: String| out.push(Drift { rule, detail });
    if rules.auth && config.auth.is_none() {
        drift("auth", "clients need not authenticate: [auth] is not configured".into());
    }
    match rules.tls.as_deref() {
        Some("mtls") if config.http.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) => {
            drift("tls", "mutual TLS is required: http.tls_cert, http.tls_key and http.client_ca".into())
        }
        Some(_) if config.http.tls.is_none() => {
            drift("tls", "TLS is required: http.tls_cert and http.tls_key are not set".into())
        }
        _ => {}
    }
    match (&config.audit, rules.audit, rules.audit_max_retention_days) {
        (None, true, _) => drift("audit", "the audit log is off ([audit] enabled = false)".into()),
        (Some(a), _, Some(days)) if a.retention.as_secs() > days.saturating_mul(86400) => drift(
            "audit_max_retention_days",
            format!("audit.retention keeps records {} days, more than {days}", a.retention.as_secs().div_ceil(86400)),
        ),
        _ => {}
    }
    if let Some(within) = &rules.residency_within {
        match crate::residency::AllowList::parse(within) {
            Err(e) => drift("residency_within", format!("the baseline's list is not valid: {e}")),
            Ok(_) if config.privacy.residency.is_empty() => {
                drift("residency_within", "privacy.residency_allow is not set: any destination is allowed".into())
            }
            Ok(outer) => {
                let outside = config.privacy.residency.outside(&outer);
                if !outside.is_empty() {
                    drift(
                        "residency_within",
                        format!("privacy.residency_allow allows {} outside the baseline's list", outside.join(", ")),
                    );
                }
            }
        }
    }
    let pseudonymized: Vec<&str> =
        config.privacy.pseudonymize.iter().map(|p| p.trim_start_matches("parameters.")).collect();
    for p in &rules.pseudonymize {
        if !pseudonymized.contains(&p.trim_start_matches("parameters.")) {
            drift("pseudonymize", format!("parameter '{p}' is not in privacy.pseudonymize"));
        }
    }
    if config.overflow.is_some() {
        for m in &rules.stay_on_site {
            let mc = config.model(m);
            if mc.may_leave_site && mc.overflow.mode != OverflowMode::Never {
                drift(
                    "stay_on_site",
                    format!("model '{m}' may overflow off the site: set models.{m}.may_leave_site = false"),
                );
            }
        }
    }
    if let Some(min) = &rules.min_agent_version {
        let running = env!("CARGO_PKG_VERSION");
        match (SemVer::parse(min), SemVer::parse(running)) {
            (Some(min_v), Some(v)) if v >= min_v => {}
            (Some(_), _) => drift("min_agent_version", format!("agent {running} is older than {min}")),
            (None, _) => drift("min_agent_version", format!("the baseline's version '{min}' is not a version")),
        }
    }
    if let Some(kinds) = &rules.quantization {
        for (model, q) in served {
            if !kinds.contains(q) {
                drift("quantization", format!("model '{model}' is quantized {q}, not one of {}", kinds.join(", ")));
            }
        }
    }
    if rules.store_encrypted && config.store_key_file.is_none() {
        drift("store_encrypted", "the model store is not encrypted (store.encrypt = false)".into());
    }
    out
}

/// The registry models installed in `state_dir`'s store, each version with its quantization.
pub fn served_models(state_dir: &Path) -> Vec<Served> {
    let store = crate::store::Store::open_read_only(state_dir);
    let Ok(state) = store.load_state() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, m) in &state.installed {
        for v in std::iter::once(&m.current).chain(&m.candidate).chain(&m.also) {
            let q = store
                .read_manifest(&v.manifest_sha256)
                .ok()
                .and_then(|b| outpost_proto::registry::dsse::Envelope::parse(&b).ok())
                .and_then(|e| e.payload_bytes().ok())
                .and_then(|p| serde_json::from_slice::<outpost_proto::registry::Statement>(&p).ok())
                .map_or_else(|| "unknown".to_owned(), |s| s.predicate.quantization);
            out.push((format!("{name}@{}", v.version), q));
        }
    }
    out
}

/// The agent's compliance state: the baseline in force and the drifts last found.
#[derive(Default)]
pub struct Compliance {
    baseline: RwLock<Option<Baseline>>,
    drifts: RwLock<Vec<Drift>>,
    /// Woken when the baseline, the configuration or the models changed: check again now.
    changed: tokio::sync::Notify,
    /// Why the next check runs.
    trigger: RwLock<&'static str>,
}

impl Compliance {
    pub fn new(baseline: Option<Baseline>) -> Compliance {
        Compliance { baseline: RwLock::new(baseline), trigger: RwLock::new("start"), ..Compliance::default() }
    }

    pub fn baseline(&self) -> Option<Baseline> {
        self.baseline.read_locked().clone()
    }

    /// A newer verified baseline (from the registry): checked at once.
    pub fn set_baseline(&self, baseline: Baseline) {
        *self.baseline.write_locked() = Some(baseline);
        self.recheck("baseline");
    }

    /// Asks for a check now (`trigger`: what changed).
    pub fn recheck(&self, trigger: &'static str) {
        *self.trigger.write_locked() = trigger;
        self.changed.notify_one();
    }

    /// Waits for [`Compliance::recheck`]; returns its trigger.
    pub async fn rechecked(&self) -> &'static str {
        self.changed.notified().await;
        *self.trigger.read_locked()
    }

    /// Checks `config` against the baseline in force (none: no drift).
    pub fn evaluate(&self, config: &Config) -> Vec<Drift> {
        match &*self.baseline.read_locked() {
            Some(b) => check(config, &b.rules, &served_models(&config.node.state_dir)),
            None => Vec::new(),
        }
    }

    /// Keeps `drifts` as the current finding; returns whether it differs from the last one.
    pub fn settle(&self, drifts: Vec<Drift>) -> bool {
        let mut last = self.drifts.write_locked();
        let changed = *last != drifts;
        *last = drifts;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let dir = std::env::temp_dir();
        let text =
            format!("[node]\nstate_dir = {:?}\n{extra}", dir.join("outpost-compliance-unit").display().to_string());
        Config::parse(&text, &dir.join("outpost.toml")).expect("config")
    }

    fn rules() -> BaselineRules {
        BaselineRules {
            auth: true,
            tls: Some("tls".into()),
            audit: true,
            audit_max_retention_days: Some(30),
            residency_within: Some(vec!["10.0.0.0/8".into(), "*.corp.example".into()]),
            pseudonymize: vec!["customer_id".into()],
            stay_on_site: vec![],
            min_agent_version: Some("0.1.0".into()),
            quantization: Some(vec!["int8-qdq".into()]),
            store_encrypted: true,
        }
    }

    #[test]
    fn each_rule_finds_its_drift() {
        let c = config("[audit]\nretention = \"90d\"\n[privacy]\nresidency_allow = [\"10.1.0.0/16\", \"a.corp.example\", \"192.168.0.0/16\"]\n");
        let served = vec![("mlp@1.0.0".to_owned(), "fp32".to_owned())];
        let d: Vec<&str> = check(&c, &rules(), &served).iter().map(|d| d.rule).collect();
        assert_eq!(
            d,
            ["auth", "tls", "audit_max_retention_days", "residency_within", "pseudonymize", "quantization"],
            "{:?}",
            check(&c, &rules(), &served)
        );
        let detail = check(&c, &rules(), &served).into_iter().find(|d| d.rule == "residency_within").unwrap();
        assert!(detail.detail.contains("192.168.0.0/16") && !detail.detail.contains("10.1.0.0"), "{detail}");
        let mut r = BaselineRules { min_agent_version: Some("999.0.0".into()), ..BaselineRules::default() };
        assert_eq!(check(&c, &r, &[])[0].rule, "min_agent_version");
        r = BaselineRules { store_encrypted: true, ..BaselineRules::default() };
        assert!(check(&c, &r, &[]).is_empty());
        let off = config("[store]\nencrypt = false\n");
        assert_eq!(check(&off, &r, &[])[0].rule, "store_encrypted");
    }
}
