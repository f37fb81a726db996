//! Shadow traffic (`[models.<name>.shadow]`): a share of the requests the default version
//! answers is copied to a candidate version after the answer is given, and the candidate's
//! outputs are compared with the answer's: label agreement (the argmax of one output), the
//! largest absolute difference and the cosine over all numeric outputs, and its run time.
//! The candidate's answers never reach a caller.
//!
//! It yields to live work: a copy runs only when no other live request is being answered
//! and no other copy runs, and only if the candidate's queue takes it at once; otherwise it
//! is dropped and counted. Shown in `/admin/experiments/<model>` under `shadow`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::locks::MutexExt as _;
use crate::protocol::Tensor;

/// Run times kept per candidate for its percentiles (the most recent).
const KEPT: usize = 10_000;

#[derive(Default)]
struct Stats {
    sampled: u64,
    dropped_busy: u64,
    failed: u64,
    compared: u64,
    labels_agree: u64,
    labels_compared: u64,
    max_abs_diff: f64,
    sum_max_abs_diff: f64,
    cosine_sum: f64,
    cosine_min: Option<f64>,
    cosines: u64,
    run_us: VecDeque<u64>,
    /// The default version's run times for the same requests.
    live_run_us: VecDeque<u64>,
}

fn p99(v: &VecDeque<u64>) -> Option<u64> {
    let mut s: Vec<u64> = v.iter().copied().collect();
    s.sort_unstable();
    s.get(((s.len() as f64 * 0.99) as usize).min(s.len().saturating_sub(1))).copied()
}

/// Per model and candidate version, what its shadow copies did.
#[derive(Default)]
pub struct Shadows {
    stats: Mutex<BTreeMap<(String, String), Stats>>,
    /// A copy is running (at most one at a time, over all models).
    busy: AtomicBool,
    /// Shadows their rules ended, by model, with the settings they ended under.
    concluded: Mutex<BTreeMap<String, (crate::config::ShadowConfig, super::experiment::Conclusion)>>,
}

/// How a candidate's outputs compare with the answer's.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub label_agrees: Option<bool>,
    pub max_abs_diff: f64,
    pub cosine: Option<f64>,
}

fn argmax(v: &[f64]) -> Option<usize> {
    v.iter().enumerate().filter(|(_, x)| x.is_finite()).max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
}

/// Compares two sets of outputs by name; `label` names the output whose argmax is the label
/// (the first one by default).
pub fn compare(live: &[Tensor], shadow: &[Tensor], label: Option<&str>) -> Comparison {
    let mut max_abs_diff = 0.0f64;
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    let mut label_agrees = None;
    let label_name = label.or_else(|| live.first().map(|t| t.name.as_str()));
    for a in live {
        let Some(b) = shadow.iter().find(|t| t.name == a.name) else { continue };
        let (Some(x), Some(y)) = (a.data.to_f64(), b.data.to_f64()) else { continue };
        if Some(a.name.as_str()) == label_name {
            label_agrees = Some(if x.len() == 1 { x == y } else { argmax(&x) == argmax(&y) });
        }
        if x.len() != y.len() {
            max_abs_diff = f64::INFINITY;
            continue;
        }
        for (p, q) in x.iter().zip(&y) {
            max_abs_diff = max_abs_diff.max((p - q).abs());
            dot += p * q;
            na += p * p;
            nb += q * q;
        }
    }
    let cosine = (na > 0.0 && nb > 0.0).then(|| dot / (na.sqrt() * nb.sqrt()));
    Comparison { label_agrees, max_abs_diff, cosine }
}

/// Leave to run one copy; dropping it frees the slot.
pub struct Slot(Arc<Shadows>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl Shadows {
    /// A copy was sampled; `Some` leave to run it when live work leaves a core free (`live`:
    /// live requests being answered, this one included), else it is dropped and counted.
    pub fn try_start(self: &Arc<Self>, model: &str, version: &str, live: usize) -> Option<Slot> {
        let mut stats = self.stats.locked();
        let s = stats.entry((model.to_owned(), version.to_owned())).or_default();
        s.sampled += 1;
        if live > 1 || self.busy.swap(true, Ordering::AcqRel) {
            s.dropped_busy += 1;
            return None;
        }
        Some(Slot(self.clone()))
    }

    /// A copy could not run (the candidate's queue was full, or it is not installed).
    pub fn dropped(&self, model: &str, version: &str, failed: bool) {
        let mut stats = self.stats.locked();
        let s = stats.entry((model.to_owned(), version.to_owned())).or_default();
        if failed {
            s.failed += 1;
        } else {
            s.dropped_busy += 1;
        }
    }

    /// Whether the shadow (as configured now) has ended by its rules.
    pub fn conclusion(
        &self,
        model: &str,
        config: &crate::config::ShadowConfig,
    ) -> Option<super::experiment::Conclusion> {
        self.concluded.locked().get(model).filter(|(c, _)| c == config).map(|(_, v)| v.clone())
    }

    /// Applies the shadow's rules (every 5 comparisons once `min_compared` is reached; off the
    /// request path): the conclusion, once.
    pub fn judge(&self, model: &str, config: &crate::config::ShadowConfig) -> Option<super::experiment::Conclusion> {
        use super::experiment::Conclusion;
        let rules = config.rules.as_ref()?;
        let verdict = {
            let stats = self.stats.locked();
            let s = stats.get(&(model.to_owned(), config.version.clone()))?;
            if s.compared < rules.min_compared || s.compared % 5 != 0 {
                return None;
            }
            let agreement = if s.labels_compared == 0 { 0.0 } else { s.labels_agree as f64 / s.labels_compared as f64 };
            let (cp, lp) = (p99(&s.run_us)?, p99(&s.live_run_us)?);
            let text = format!(
                "shadow {} over {} requests: label agreement {:.2}%, run p99 {} us against the default's {} us",
                config.version,
                s.compared,
                agreement * 100.0,
                cp,
                lp
            );
            let candidate = config.version.clone();
            if agreement < rules.min_agreement {
                Conclusion::Stop {
                    candidate,
                    detail: format!("agreement under {:.2}%: {text}", rules.min_agreement * 100.0),
                }
            } else if cp as f64 > lp.max(1) as f64 * rules.max_p99_ratio {
                Conclusion::Stop {
                    candidate,
                    detail: format!("p99 over {}x the default's: {text}", rules.max_p99_ratio),
                }
            } else {
                Conclusion::Promote { candidate, detail: format!("held: {text}") }
            }
        };
        let mut concluded = self.concluded.locked();
        if concluded.get(model).is_some_and(|(c, _)| c == config) {
            return None;
        }
        concluded.insert(model.to_owned(), (config.clone(), verdict.clone()));
        Some(verdict)
    }

    pub fn record(&self, model: &str, version: &str, c: &Comparison, run: Duration, live_run: Option<Duration>) {
        let mut stats = self.stats.locked();
        let s = stats.entry((model.to_owned(), version.to_owned())).or_default();
        s.compared += 1;
        if let Some(agree) = c.label_agrees {
            s.labels_compared += 1;
            s.labels_agree += u64::from(agree);
        }
        s.max_abs_diff = s.max_abs_diff.max(c.max_abs_diff);
        s.sum_max_abs_diff += c.max_abs_diff;
        if let Some(cos) = c.cosine {
            s.cosine_sum += cos;
            s.cosines += 1;
            s.cosine_min = Some(s.cosine_min.map_or(cos, |m| m.min(cos)));
        }
        if s.run_us.len() == KEPT {
            s.run_us.pop_front();
        }
        s.run_us.push_back(run.as_micros() as u64);
        if let Some(l) = live_run {
            if s.live_run_us.len() == KEPT {
                s.live_run_us.pop_front();
            }
            s.live_run_us.push_back(l.as_micros() as u64);
        }
    }

    pub fn report(&self, model: &str, version: &str) -> serde_json::Value {
        let stats = self.stats.locked();
        let empty = Stats::default();
        let s = stats.get(&(model.to_owned(), version.to_owned())).unwrap_or(&empty);
        let mut run: Vec<u64> = s.run_us.iter().copied().collect();
        run.sort_unstable();
        let q =
            |p: f64| (!run.is_empty()).then(|| run[((run.len() as f64 * p) as usize).min(run.len() - 1)] as f64 / 1e3);
        let conclusion = self.concluded.locked().get(model).map(|(_, v)| match v {
            super::experiment::Conclusion::Promote { detail, .. } => {
                serde_json::json!({ "verdict": "promoted", "detail": detail })
            }
            super::experiment::Conclusion::Stop { detail, .. } => {
                serde_json::json!({ "verdict": "stopped", "detail": detail })
            }
        });
        serde_json::json!({
            "version": version,
            "conclusion": conclusion,
            "sampled": s.sampled,
            "dropped_busy": s.dropped_busy,
            "failed": s.failed,
            "compared": s.compared,
            "label_agreement": (s.labels_compared > 0).then(|| s.labels_agree as f64 / s.labels_compared as f64),
            "max_abs_diff": (s.compared > 0).then_some(s.max_abs_diff),
            "mean_max_abs_diff": (s.compared > 0).then(|| s.sum_max_abs_diff / s.compared as f64),
            "cosine_mean": (s.cosines > 0).then(|| s.cosine_sum / s.cosines as f64),
            "cosine_min": s.cosine_min,
            "run_p50_ms": q(0.5),
            "run_p99_ms": q(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    fn t(name: &str, v: Vec<f32>) -> Tensor {
        Tensor { name: name.into(), shape: vec![1, v.len()], data: TensorData::F32(v) }
    }

    #[test]
    fn comparisons_measure_labels_differences_and_direction() {
        let live = vec![t("p", vec![0.1, 0.9])];
        let same = compare(&live, &live, None);
        assert_eq!(same.label_agrees, Some(true));
        assert_eq!(same.max_abs_diff, 0.0);
        assert!((same.cosine.unwrap_or(0.0) - 1.0).abs() < 1e-9);
        let flipped = compare(&live, &[t("p", vec![0.8, 0.2])], Some("p"));
        assert_eq!(flipped.label_agrees, Some(false));
        assert!((flipped.max_abs_diff - 0.7).abs() < 1e-6, "{flipped:?}");
        assert!(flipped.cosine.unwrap_or(1.0) < 0.5);
    }

    #[test]
    fn rules_promote_an_agreeing_shadow_and_stop_a_slow_one() {
        use crate::api::experiment::Conclusion;
        let cfg = |ratio: f64| crate::config::ShadowConfig {
            version: "2".into(),
            share: 1.0,
            output: None,
            rules: Some(crate::config::ShadowRules { min_compared: 20, min_agreement: 0.9, max_p99_ratio: ratio }),
        };
        let agree = Comparison { label_agrees: Some(true), max_abs_diff: 0.01, cosine: Some(0.999) };
        for (ratio, promoted) in [(2.0, true), (1.2, false)] {
            let (s, c) = (Shadows::default(), cfg(ratio));
            let mut verdicts = Vec::new();
            for _ in 0..100 {
                // The candidate runs 1.5x as long as the default.
                s.record("m", "2", &agree, Duration::from_micros(150), Some(Duration::from_micros(100)));
                verdicts.extend(s.judge("m", &c));
            }
            assert_eq!(verdicts.len(), 1, "{verdicts:?}");
            assert_eq!(matches!(verdicts[0], Conclusion::Promote { .. }), promoted, "{verdicts:?}");
            assert!(s.conclusion("m", &c).is_some());
        }
    }

    #[test]
    fn copies_yield_to_live_work_and_to_each_other() {
        let s = Arc::new(Shadows::default());
        assert!(s.try_start("m", "2", 3).is_none(), "other live requests: dropped");
        let slot = s.try_start("m", "2", 1);
        assert!(slot.is_some());
        assert!(s.try_start("m", "2", 1).is_none(), "one copy at a time");
        drop(slot);
        assert!(s.try_start("m", "2", 1).is_some());
        let r = s.report("m", "2");
        assert_eq!((r["sampled"].as_u64(), r["dropped_busy"].as_u64()), (Some(4), Some(2)));
    }
}
