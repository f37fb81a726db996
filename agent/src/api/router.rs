//! The router's decisions, as pure functions of what the request and the box look like; the
//! inference API ([`super::InferenceService`]) carries them out. A request goes upstream only
//! when its model may leave the site (signed manifest, configuration, no sensitive input).

use std::time::Duration;

use crate::config::OverflowMode;
use crate::overflow::Reason;

/// What is known of a request before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// The model's overflow mode; `None` when there is no target or overflow is off for it.
    pub mode: Option<OverflowMode>,
    /// A loaded version's signed manifest keeps the model on the box.
    pub must_stay: bool,
    /// An input is marked sensitive.
    pub sensitive: bool,
}

/// Where a request goes when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Looked up and served here (overflow may still be tried: [`before_run`]).
    Local,
    /// Served only by the target.
    RemoteOnly,
    /// Remote-only, but an input is sensitive: refused.
    RefuseSensitive,
}

/// A remote-only model goes to the target, unless a signed manifest keeps it here.
pub fn at_arrival(f: &Facts) -> Arrival {
    match f.mode {
        Some(OverflowMode::RemoteOnly) if !f.must_stay => {
            if f.sensitive {
                Arrival::RefuseSensitive
            } else {
                Arrival::RemoteOnly
            }
        }
        _ => Arrival::Local,
    }
}

/// Whether a locally served request may go upstream at all: automatic overflow, a version
/// whose signed manifest lets it leave, no sensitive input. (Another loaded version whose
/// manifest keeps the model here stops the attempt itself, where every route passes.)
pub fn may_overflow(f: &Facts, version_may_leave: bool) -> bool {
    f.mode == Some(OverflowMode::Auto) && version_may_leave && !f.sensitive
}

/// Before running here: upstream when the queue is full, or when the request's age plus the
/// box's estimate would miss the objective less 10 % (headroom for encoding and jitter).
pub fn before_run(queue_full: bool, expected: Duration, slo: Duration) -> Option<Reason> {
    if queue_full {
        Some(Reason::QueueFull)
    } else if expected > slo.mul_f64(0.9) {
        Some(Reason::Slo)
    } else {
        None
    }
}

/// After a local answer: ask the target when the answer's confidence is below the minimum.
pub fn escalate(confidence: Option<f64>, min: Option<f64>) -> bool {
    matches!((confidence, min), (Some(c), Some(m)) if c < m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_as_a_table() {
        use OverflowMode::*;
        let cases = [
            // mode, must_stay, sensitive -> arrival
            (None, false, false, Arrival::Local),
            (Some(Auto), false, true, Arrival::Local),
            (Some(Never), false, false, Arrival::Local),
            (Some(RemoteOnly), false, false, Arrival::RemoteOnly),
            (Some(RemoteOnly), false, true, Arrival::RefuseSensitive),
            (Some(RemoteOnly), true, false, Arrival::Local),
            (Some(RemoteOnly), true, true, Arrival::Local),
        ];
        for (mode, must_stay, sensitive, want) in cases {
            assert_eq!(at_arrival(&Facts { mode, must_stay, sensitive }), want, "{mode:?} {must_stay} {sensitive}");
        }
    }

    #[test]
    fn overflow_needs_auto_a_leaving_version_and_no_sensitive_input() {
        use OverflowMode::*;
        let f = |mode, must_stay, sensitive| Facts { mode, must_stay, sensitive };
        assert!(may_overflow(&f(Some(Auto), false, false), true));
        assert!(!may_overflow(&f(Some(Auto), false, false), false), "the manifest keeps it");
        assert!(!may_overflow(&f(Some(Auto), false, true), true), "a sensitive input");
        assert!(!may_overflow(&f(Some(Never), false, false), true));
        assert!(!may_overflow(&f(Some(RemoteOnly), false, false), true), "remote-only is decided at arrival");
        assert!(!may_overflow(&f(None, false, false), true));
    }

    #[test]
    fn before_run_and_escalation_as_a_table() {
        let ms = Duration::from_millis;
        assert_eq!(before_run(true, ms(1), ms(100)), Some(Reason::QueueFull));
        assert_eq!(before_run(false, ms(91), ms(100)), Some(Reason::Slo));
        assert_eq!(before_run(false, ms(90), ms(100)), None);
        assert!(escalate(Some(0.4), Some(0.5)));
        assert!(!escalate(Some(0.5), Some(0.5)));
        assert!(!escalate(None, Some(0.5)));
        assert!(!escalate(Some(0.1), None));
    }
}
