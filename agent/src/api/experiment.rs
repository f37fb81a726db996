//! A/B experiments (`[models.<name>.experiment]`): requests that name no version are split
//! between pinned versions by weight. The split is sticky: a request carrying the experiment's
//! key parameter (a customer, a till, a device) goes to the variant its keyed hash picks, the
//! same across requests and restarts, since the hash is keyed with the node's pseudonymization
//! key (which also keeps the key itself out of anything the split reveals). A request without
//! it is drawn at random. Per variant the agent keeps the count, errors, recent latencies and,
//! for a chosen output, the label distribution (argmax) and the mean of one element:
//! `GET /admin/experiments/<model>`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::ExperimentConfig;
use crate::locks::MutexExt as _;
use crate::protocol::InferResponse;

/// Latencies kept per variant for its percentiles (the most recent).
const LATENCIES_KEPT: usize = 10_000;

/// The node's keyed hash of some bytes, as hex.
pub type KeyedHash<'a> = &'a dyn Fn(&[u8]) -> String;

/// The variant (an index into the experiment's versions) for one request. `keyed_hash` is
/// the node's keyed hash; without a key the draw is random.
pub fn assign(keyed_hash: Option<KeyedHash<'_>>, model: &str, key: Option<&str>, weights: &[u32]) -> usize {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return 0;
    }
    let point = match (key, keyed_hash) {
        (Some(k), Some(hash)) => {
            let mut msg = Vec::with_capacity(model.len() + k.len() + 12);
            msg.extend_from_slice(b"experiment\0");
            msg.extend_from_slice(model.as_bytes());
            msg.push(0);
            msg.extend_from_slice(k.as_bytes());
            let hex = hash(&msg);
            u64::from_str_radix(hex.get(..16).unwrap_or("0"), 16).unwrap_or(0)
        }
        _ => {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        }
    };
    // Multiply-shift: an unbiased enough map of 64 bits onto [0, total).
    let mut at = ((u128::from(point) * u128::from(total)) >> 64) as u64;
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if at < w {
            return i;
        }
        at -= w;
    }
    weights.len() - 1
}

/// The key of a request, from its parameter (a string or a number).
pub fn key_of(parameters: &serde_json::Map<String, serde_json::Value>, name: &str) -> Option<String> {
    match parameters.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Default)]
struct VariantStats {
    count: u64,
    errors: u64,
    latencies_us: VecDeque<u64>,
    labels: BTreeMap<usize, u64>,
    sum: f64,
    summed: u64,
}

/// An experiment's end, by its rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    /// The candidate held: it becomes the default version.
    Promote { candidate: String, detail: String },
    /// The candidate regressed: every request goes to the default version.
    Stop { candidate: String, detail: String },
}

/// Per model and version, what the experiment's requests did.
#[derive(Default)]
pub struct Experiments {
    stats: Mutex<BTreeMap<(String, String), VariantStats>>,
    /// Experiments that ended, by model (until the agent restarts or the configuration
    /// changes the experiment).
    concluded: Mutex<BTreeMap<String, (ExperimentConfig, Conclusion)>>,
    /// Models whose verdict is being carried out (judged once; shown once carried out).
    pending: Mutex<std::collections::BTreeSet<String>>,
}

impl VariantStats {
    fn p99_us(&self) -> Option<u64> {
        let mut lat: Vec<u64> = self.latencies_us.iter().copied().collect();
        lat.sort_unstable();
        lat.get(((lat.len() as f64 * 0.99) as usize).min(lat.len().saturating_sub(1))).copied()
    }

    fn error_rate(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.errors as f64 / self.count as f64
        }
    }
}

impl Experiments {
    /// Whether the experiment (as configured now) has ended.
    pub fn conclusion(&self, model: &str, config: &ExperimentConfig) -> Option<Conclusion> {
        self.concluded.locked().get(model).filter(|(c, _)| c == config).map(|(_, v)| v.clone())
    }

    /// Applies the experiment's rules (when [`Experiments::record`] says a check is due): the
    /// conclusion, once (the caller carries it out). It sorts the recent latencies, so it runs
    /// off the request path.
    pub fn judge(&self, model: &str, config: &ExperimentConfig) -> Option<Conclusion> {
        let rules = config.rules.as_ref()?;
        let verdict = {
            let stats = self.stats.locked();
            let c = stats.get(&(model.to_owned(), rules.candidate.clone()))?;
            let b = stats.get(&(model.to_owned(), rules.baseline.clone()))?;
            if c.count < rules.min_requests || b.count < rules.min_requests {
                return None;
            }
            let (ce, be) = (c.error_rate(), b.error_rate());
            let (cp, bp) = (c.p99_us()?, b.p99_us()?);
            let stats_text = format!(
                "candidate {} ({} requests, error rate {:.2}%, p99 {} us) against baseline {} ({} requests, {:.2}%, {} us)",
                rules.candidate, c.count, ce * 100.0, cp, rules.baseline, b.count, be * 100.0, bp
            );
            if ce > be + rules.max_error_rate_increase {
                Conclusion::Stop {
                    candidate: rules.candidate.clone(),
                    detail: format!(
                        "error rate over the allowed +{:.2}%: {stats_text}",
                        rules.max_error_rate_increase * 100.0
                    ),
                }
            } else if cp as f64 > bp.max(1) as f64 * rules.max_p99_ratio {
                Conclusion::Stop {
                    candidate: rules.candidate.clone(),
                    detail: format!("p99 over {}x the baseline's: {stats_text}", rules.max_p99_ratio),
                }
            } else {
                Conclusion::Promote { candidate: rules.candidate.clone(), detail: format!("held: {stats_text}") }
            }
        };
        if self.conclusion(model, config).is_some() || !self.pending.locked().insert(model.to_owned()) {
            return None;
        }
        Some(verdict)
    }

    /// Marks a verdict carried out: the experiment stops splitting and its report says so.
    pub fn settle(&self, model: &str, config: &ExperimentConfig, verdict: Conclusion) {
        self.concluded.locked().insert(model.to_owned(), (config.clone(), verdict));
        self.pending.locked().remove(model);
    }

    /// Records one request the experiment routed; `true` when the rules are due a check
    /// (every 25th request of a variant, when the experiment has rules).
    pub fn record(
        &self,
        model: &str,
        version: &str,
        config: &ExperimentConfig,
        latency: Duration,
        response: Option<&InferResponse>,
    ) -> bool {
        let summary = response.and_then(|r| {
            let name = config.output.as_ref()?;
            let values = r.outputs.iter().find(|o| &o.name == name)?.data.to_f64()?;
            let label = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            Some((label, values.get(config.output_index).copied().filter(|v| v.is_finite())))
        });
        let mut stats = self.stats.locked();
        let s = stats.entry((model.to_owned(), version.to_owned())).or_default();
        s.count += 1;
        if response.is_none() {
            s.errors += 1;
        }
        if s.latencies_us.len() == LATENCIES_KEPT {
            s.latencies_us.pop_front();
        }
        s.latencies_us.push_back(latency.as_micros() as u64);
        if let Some((label, value)) = summary {
            if let Some(l) = label {
                *s.labels.entry(l).or_default() += 1;
            }
            if let Some(v) = value {
                s.sum += v;
                s.summed += 1;
            }
        }
        config.rules.is_some() && s.count % 25 == 0
    }

    /// The experiment's report: per variant, its weight and what its requests did.
    pub fn report(&self, model: &str, config: &ExperimentConfig) -> serde_json::Value {
        let stats = self.stats.locked();
        let total: u64 = config.weights.iter().map(|w| u64::from(*w)).sum();
        let variants: Vec<serde_json::Value> = config
            .versions
            .iter()
            .zip(&config.weights)
            .map(|(version, weight)| {
                let empty = VariantStats::default();
                let s = stats.get(&(model.to_owned(), version.clone())).unwrap_or(&empty);
                let mut lat: Vec<u64> = s.latencies_us.iter().copied().collect();
                lat.sort_unstable();
                let q = |p: f64| {
                    (!lat.is_empty()).then(|| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3)
                };
                serde_json::json!({
                    "version": version,
                    "weight": weight,
                    "share": *weight as f64 / total.max(1) as f64,
                    "count": s.count,
                    "errors": s.errors,
                    "error_rate": if s.count == 0 { 0.0 } else { s.errors as f64 / s.count as f64 },
                    "p50_ms": q(0.5),
                    "p99_ms": q(0.99),
                    "labels": s.labels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                    "output_mean": (s.summed > 0).then(|| s.sum / s.summed as f64),
                })
            })
            .collect();
        let conclusion = self.concluded.locked().get(model).filter(|(c, _)| c == config).map(|(_, v)| match v {
            Conclusion::Promote { candidate, detail } => {
                serde_json::json!({ "verdict": "promoted", "candidate": candidate, "detail": detail })
            }
            Conclusion::Stop { candidate, detail } => {
                serde_json::json!({ "verdict": "stopped", "candidate": candidate, "detail": detail })
            }
        });
        serde_json::json!({
            "model": model,
            "running": conclusion.is_none(),
            "conclusion": conclusion,
            "key_parameter": config.key_parameter,
            "output": config.output,
            "output_index": config.output_index,
            "variants": variants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keyed(key: &'static [u8]) -> impl Fn(&[u8]) -> String {
        move |msg: &[u8]| {
            use hmac::Mac as _;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
            mac.update(msg);
            mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
        }
    }

    proptest! {
        /// The same key always gets the same variant (a restart keeps the node's key, so
        /// this holds across restarts), and only a positive weight is ever chosen.
        #[test]
        fn the_same_key_gets_the_same_variant(key in "[a-zA-Z0-9]{1,24}", w in proptest::collection::vec(0u32..5, 2..6)) {
            prop_assume!(w.iter().any(|x| *x > 0));
            let hash = keyed(b"node key");
            let first = assign(Some(&hash), "mlp", Some(&key), &w);
            for _ in 0..3 {
                prop_assert_eq!(assign(Some(&hash), "mlp", Some(&key), &w), first);
            }
            prop_assert!(w[first] > 0);
        }
    }

    fn with_rules() -> ExperimentConfig {
        ExperimentConfig {
            versions: vec!["1.0.0".into(), "1.1.0".into()],
            weights: vec![1, 1],
            key_parameter: None,
            key_header: None,
            output: None,
            output_index: 0,
            rules: Some(crate::config::ExperimentRules {
                candidate: "1.1.0".into(),
                baseline: "1.0.0".into(),
                min_requests: 50,
                max_error_rate_increase: 0.05,
                max_p99_ratio: 2.0,
            }),
        }
    }

    fn ok_response() -> InferResponse {
        InferResponse {
            model_name: "m".into(),
            model_version: "v".into(),
            id: None,
            parameters: serde_json::Map::new(),
            outputs: Vec::new(),
        }
    }

    /// Feeds `n` requests per variant; `candidate_fails(i)` says which of the candidate's fail.
    fn feed(
        x: &Experiments,
        e: &ExperimentConfig,
        n: usize,
        candidate_ms: u64,
        candidate_fails: impl Fn(usize) -> bool,
    ) -> Vec<Conclusion> {
        let mut verdicts = Vec::new();
        let ok = ok_response();
        for i in 0..n {
            let answer = (!candidate_fails(i)).then_some(&ok);
            let due = [
                x.record("m", "1.0.0", e, Duration::from_millis(10), Some(&ok)),
                x.record("m", "1.1.0", e, Duration::from_millis(candidate_ms), answer),
            ];
            for _ in due.iter().filter(|d| **d) {
                if let Some(v) = x.judge("m", e) {
                    x.settle("m", e, v.clone());
                    verdicts.push(v);
                }
            }
        }
        verdicts
    }

    #[test]
    fn rules_promote_a_candidate_that_holds_and_stop_one_that_regresses() {
        let e = with_rules();
        // As good as the baseline: promoted once, after both served 50.
        let x = Experiments::default();
        let v = feed(&x, &e, 200, 11, |_| false);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(matches!(&v[0], Conclusion::Promote { candidate, .. } if candidate == "1.1.0"), "{v:?}");
        assert!(x.conclusion("m", &e).is_some());
        // One failure in five: stopped on its error rate.
        let x = Experiments::default();
        let v = feed(&x, &e, 200, 10, |i| i % 5 == 0);
        assert!(matches!(&v[..], [Conclusion::Stop { detail, .. }] if detail.contains("error rate")), "{v:?}");
        // Three times slower: stopped on its p99.
        let x = Experiments::default();
        let v = feed(&x, &e, 200, 30, |_| false);
        assert!(matches!(&v[..], [Conclusion::Stop { detail, .. }] if detail.contains("p99")), "{v:?}");
        // No rules: never a verdict.
        let x = Experiments::default();
        let plain = ExperimentConfig { rules: None, ..with_rules() };
        assert!(feed(&x, &plain, 200, 30, |i| i % 2 == 0).is_empty());
    }

    #[test]
    fn over_ten_thousand_keys_the_weights_hold() {
        let hash = keyed(b"another node key");
        let weights = [70u32, 20, 10];
        let mut counts = [0u64; 3];
        let n = 10_000u64;
        for i in 0..n {
            counts[assign(Some(&hash), "cnn", Some(&format!("customer-{i}")), &weights)] += 1;
        }
        for (c, w) in counts.iter().zip(weights) {
            let p = f64::from(w) / 100.0;
            let expected = n as f64 * p;
            let sigma = (n as f64 * p * (1.0 - p)).sqrt();
            // Within 4 standard deviations: a correct split fails this about once in 15,000 runs.
            assert!((*c as f64 - expected).abs() < 4.0 * sigma, "{counts:?} for weights {weights:?}");
        }
        // Without a key the draw is random, and still weighted.
        let mut counts = [0u64; 3];
        for _ in 0..n {
            counts[assign(Some(&hash), "cnn", None, &weights)] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[2], "{counts:?}");
    }
}
