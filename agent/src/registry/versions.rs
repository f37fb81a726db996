//! The installed versions of one registry model and their transitions, as one type. Each
//! transition changes the persisted record ([`InstalledModel`]) and returns what the serving
//! table must do, and which versions leave for good (to record as rejected). The registry task
//! persists the record, then applies the changes, in that order.

use crate::store::{InstalledModel, InstalledVersion};

/// What the serving table must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingChange {
    /// The prepared new version becomes the default (an atomic swap).
    Activate(String),
    /// The prepared new version serves beside the default (a pinned version).
    Add(String),
    /// The prepared new version serves a share of traffic as a canary.
    StartCanary(String),
    /// This version leaves the table.
    Remove(String),
    /// This stored version (loaded again from the store) becomes the default.
    Restore(String),
}

/// How a new version is taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// The newest version becomes the default at once.
    Replace,
    /// The newest version first serves as a canary (only when a version already serves).
    Canary,
    /// Every pinned version serves side by side.
    Pinned,
}

/// A transition's outcome.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transition {
    pub serving: Vec<ServingChange>,
    /// Versions that must not be installed again, with why.
    pub rejected: Vec<(InstalledVersion, String)>,
}

/// Takes in a verified, prepared version. A canary still in progress that a newer version
/// replaces is rejected ("superseded"): it never had its verdict, and the registry's newest is
/// now another version, so it must not come back at the next poll or start.
pub fn install(
    existing: Option<InstalledModel>,
    new: InstalledVersion,
    intake: Intake,
) -> (InstalledModel, Transition) {
    let version = new.version.clone();
    match (intake, existing) {
        (Intake::Pinned, Some(mut m)) => {
            m.also.push(new);
            (m, Transition { serving: vec![ServingChange::Add(version)], rejected: Vec::new() })
        }
        (Intake::Canary, Some(mut m)) => {
            let mut t = Transition::default();
            if let Some(old) = m.candidate.take() {
                t.serving.push(ServingChange::Remove(old.version.clone()));
                t.rejected.push((old, format!("superseded by {version} before its canary verdict")));
            }
            m.candidate = Some(new);
            t.serving.extend([ServingChange::Add(version.clone()), ServingChange::StartCanary(version)]);
            (m, t)
        }
        (_, existing) => {
            let mut m = InstalledModel::new(new);
            let mut t = Transition { serving: vec![ServingChange::Activate(version)], rejected: Vec::new() };
            if let Some(old) = existing {
                if let Some(c) = old.candidate {
                    t.serving.push(ServingChange::Remove(c.version.clone()));
                    t.rejected.push((c, format!("superseded by {} before its canary verdict", m.current.version)));
                }
                m.previous = Some(old.current);
            }
            (m, t)
        }
    }
}

/// The canary `version` held: it becomes the default, the default becomes the previous one.
/// `None` when `version` is not the running canary (a verdict that arrives late).
pub fn promote(m: &mut InstalledModel, version: &str) -> Option<Transition> {
    let cand = m.candidate.take_if(|c| c.version == version)?;
    m.previous = Some(std::mem::replace(&mut m.current, cand));
    Some(Transition::default())
}

/// The canary `version` failed (or an operator took it back): it leaves and is rejected.
pub fn reject_canary(m: &mut InstalledModel, version: &str, reason: &str) -> Option<Transition> {
    let cand = m.candidate.take_if(|c| c.version == version)?;
    Some(Transition {
        serving: vec![ServingChange::Remove(cand.version.clone())],
        rejected: vec![(cand, reason.into())],
    })
}

/// An operator's rollback: the running canary if there is one, else the default version, whose
/// previous one serves again. `None`: nothing to roll back to.
pub fn roll_back(m: &mut InstalledModel, reason: &str) -> Option<Transition> {
    if let Some(version) = m.candidate.as_ref().map(|c| c.version.clone()) {
        return reject_canary(m, &version, reason);
    }
    let prev = m.previous.take()?;
    let restored = prev.version.clone();
    let bad = std::mem::replace(&mut m.current, prev);
    Some(Transition { serving: vec![ServingChange::Restore(restored)], rejected: vec![(bad, reason.into())] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: &str) -> InstalledVersion {
        InstalledVersion {
            version: version.into(),
            manifest_sha256: format!("m{version}"),
            model_sha256: format!("b{version}"),
            installed_at: 0,
        }
    }

    fn versions(m: &InstalledModel) -> (String, Option<String>, Option<String>, Vec<String>) {
        (
            m.current.version.clone(),
            m.previous.as_ref().map(|p| p.version.clone()),
            m.candidate.as_ref().map(|c| c.version.clone()),
            m.also.iter().map(|a| a.version.clone()).collect(),
        )
    }

    #[test]
    fn a_first_install_activates() {
        let (m, t) = install(None, v("1.0.0"), Intake::Canary);
        assert_eq!(versions(&m), ("1.0.0".into(), None, None, vec![]));
        assert_eq!(t.serving, vec![ServingChange::Activate("1.0.0".into())]);
        assert!(t.rejected.is_empty());
    }

    #[test]
    fn a_new_version_replaces_the_default_and_keeps_it_as_previous() {
        let (m, _) = install(None, v("1.0.0"), Intake::Replace);
        let (m, t) = install(Some(m), v("1.1.0"), Intake::Replace);
        assert_eq!(versions(&m), ("1.1.0".into(), Some("1.0.0".into()), None, vec![]));
        assert_eq!(t.serving, vec![ServingChange::Activate("1.1.0".into())]);
    }

    #[test]
    fn a_canary_starts_beside_the_default() {
        let (m, _) = install(None, v("1.0.0"), Intake::Canary);
        let (m, t) = install(Some(m), v("1.1.0"), Intake::Canary);
        assert_eq!(versions(&m), ("1.0.0".into(), None, Some("1.1.0".into()), vec![]));
        assert_eq!(t.serving, vec![ServingChange::Add("1.1.0".into()), ServingChange::StartCanary("1.1.0".into())]);
    }

    #[test]
    fn a_promoted_canary_becomes_the_default() {
        let (m, _) = install(None, v("1.0.0"), Intake::Canary);
        let (mut m, _) = install(Some(m), v("1.1.0"), Intake::Canary);
        assert!(promote(&mut m, "1.0.9").is_none(), "a late verdict for another version");
        assert!(promote(&mut m, "1.1.0").is_some());
        assert_eq!(versions(&m), ("1.1.0".into(), Some("1.0.0".into()), None, vec![]));
    }

    #[test]
    fn a_rolled_back_canary_leaves_and_is_rejected() {
        let (m, _) = install(None, v("1.0.0"), Intake::Canary);
        let (mut m, _) = install(Some(m), v("1.1.0"), Intake::Canary);
        let t = reject_canary(&mut m, "1.1.0", "error rate").expect("the canary");
        assert_eq!(versions(&m), ("1.0.0".into(), None, None, vec![]));
        assert_eq!(t.serving, vec![ServingChange::Remove("1.1.0".into())]);
        assert_eq!(t.rejected, vec![(v("1.1.0"), "error rate".into())]);
    }

    /// Seen from outside: canary 1.1.0 replaced by 1.2.0, which is then rolled back. 1.1.0 is
    /// rejected when it is replaced, so neither comes back at the next poll or start.
    #[test]
    fn a_canary_replaced_by_a_newer_one_is_rejected_and_does_not_come_back() {
        let (m, _) = install(None, v("1.0.0"), Intake::Canary);
        let (m, _) = install(Some(m), v("1.1.0"), Intake::Canary);
        let (mut m, t) = install(Some(m), v("1.2.0"), Intake::Canary);
        assert_eq!(versions(&m), ("1.0.0".into(), None, Some("1.2.0".into()), vec![]));
        assert_eq!(t.serving[0], ServingChange::Remove("1.1.0".into()));
        assert_eq!(t.rejected.len(), 1);
        assert_eq!(t.rejected[0].0, v("1.1.0"));
        assert!(t.rejected[0].1.contains("superseded by 1.2.0"));
        let t = reject_canary(&mut m, "1.2.0", "latency").expect("the canary");
        assert_eq!(t.rejected[0].0, v("1.2.0"));
        assert_eq!(versions(&m), ("1.0.0".into(), None, None, vec![]));
    }

    #[test]
    fn pinned_versions_serve_side_by_side() {
        let (m, _) = install(None, v("1.0.0"), Intake::Pinned);
        let (m, t) = install(Some(m), v("2.0.0"), Intake::Pinned);
        assert_eq!(versions(&m), ("1.0.0".into(), None, None, vec!["2.0.0".into()]));
        assert_eq!(t.serving, vec![ServingChange::Add("2.0.0".into())]);
    }

    #[test]
    fn an_operator_rollback_takes_the_canary_first_then_the_default() {
        let (m, _) = install(None, v("1.0.0"), Intake::Replace);
        let (m, _) = install(Some(m), v("1.1.0"), Intake::Replace);
        let (mut m, _) = install(Some(m), v("1.2.0"), Intake::Canary);
        let t = roll_back(&mut m, "operator").expect("the canary");
        assert_eq!(t.serving, vec![ServingChange::Remove("1.2.0".into())]);
        let t = roll_back(&mut m, "operator").expect("the default");
        assert_eq!(t.serving, vec![ServingChange::Restore("1.0.0".into())]);
        assert_eq!(t.rejected, vec![(v("1.1.0"), "operator".into())]);
        assert_eq!(versions(&m), ("1.0.0".into(), None, None, vec![]));
        assert!(roll_back(&mut m, "operator").is_none(), "nothing left to roll back to");
    }

    #[test]
    fn replacing_the_default_while_a_canary_runs_rejects_the_canary() {
        let (m, _) = install(None, v("1.0.0"), Intake::Canary);
        let (m, _) = install(Some(m), v("1.1.0"), Intake::Canary);
        let (m, t) = install(Some(m), v("1.2.0"), Intake::Replace);
        assert_eq!(versions(&m), ("1.2.0".into(), Some("1.0.0".into()), None, vec![]));
        assert!(t.serving.contains(&ServingChange::Remove("1.1.0".into())));
        assert_eq!(t.rejected[0].0, v("1.1.0"));
    }
}
