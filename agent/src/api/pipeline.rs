//! Pipelines: models chained as a DAG and served under one name. A step is a model, or a
//! cascade (a small model answers when it is sure, else the next one does). Steps whose
//! inputs are ready run together; each goes through the model's own routing and queue. The
//! pipeline is one request to its caller and one audit record, which lists its steps.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::{json, Value};

pub use outpost_proto::registry::pipeline::{CascadeStage, PipelineDoc, PipelineStep, Pipelines, Sure};

use super::{InferError, InferenceService, RequestContext, Routed, Routing};
use crate::engine::package::Spec;
use crate::protocol::{InferRequest, InferResponse, Tensor};

/// Most steps in one pipeline.
pub const MAX_STEPS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Input(String),
    Step { step: usize, output: String },
}

#[derive(Debug)]
struct Stage {
    model: String,
    version: Option<String>,
    sure: Option<(String, f64)>,
}

#[derive(Debug)]
struct Step {
    name: String,
    stages: Vec<Stage>,
    /// Model input name → where its tensor comes from.
    inputs: Vec<(String, Source)>,
    /// Steps of one level have all their inputs once the levels before have run.
    level: usize,
}

/// A pipeline ready to serve.
#[derive(Debug)]
pub struct Pipeline {
    pub name: String,
    /// The registry's `pipelines.json` version, or `1` for a local pipeline.
    pub version: String,
    pub inputs: Vec<String>,
    /// In topological order.
    steps: Vec<Step>,
    outputs: Vec<(String, Source)>,
}

fn parse_source(s: &str, inputs: &[String], names: &HashMap<&str, usize>) -> Result<Source, String> {
    let (head, tail) =
        s.split_once('.').ok_or_else(|| format!("source '{s}' is not input.<name> or <step>.<output>"))?;
    if head == "input" {
        if !inputs.iter().any(|i| i == tail) {
            return Err(format!("source '{s}': the pipeline has no input '{tail}'"));
        }
        return Ok(Source::Input(tail.to_owned()));
    }
    let step = *names.get(head).ok_or_else(|| format!("source '{s}': no step '{head}'"))?;
    if tail.is_empty() {
        return Err(format!("source '{s}' names no output"));
    }
    Ok(Source::Step { step, output: tail.to_owned() })
}

impl Pipeline {
    /// Checks a pipeline document: names, one model or a cascade per step, every source
    /// defined, no cycle. The steps are put in an order where each comes after its sources.
    pub fn build(doc: &PipelineDoc, version: &str) -> Result<Pipeline, String> {
        let bad = |m: String| format!("pipeline '{}': {m}", doc.name);
        if !outpost_proto::valid_name(&doc.name) {
            return Err(format!("pipeline name '{}' must be 1-128 of [A-Za-z0-9._-]", doc.name.escape_debug()));
        }
        if doc.steps.is_empty() || doc.steps.len() > MAX_STEPS {
            return Err(bad(format!("1-{MAX_STEPS} steps")));
        }
        if doc.outputs.is_empty() {
            return Err(bad("no outputs".into()));
        }
        let mut names = HashMap::new();
        for (i, s) in doc.steps.iter().enumerate() {
            if !outpost_proto::valid_name(&s.name) || s.name == "input" {
                return Err(bad(format!("step name '{}' is not a valid name", s.name.escape_debug())));
            }
            if names.insert(s.name.as_str(), i).is_some() {
                return Err(bad(format!("two steps named '{}'", s.name)));
            }
        }
        let mut steps = Vec::with_capacity(doc.steps.len());
        for s in &doc.steps {
            let stages = match (&s.model, s.cascade.as_slice()) {
                (Some(m), []) => vec![Stage { model: m.clone(), version: s.version.clone(), sure: None }],
                (None, c) if c.len() >= 2 => {
                    let last = c.len() - 1;
                    c.iter()
                        .enumerate()
                        .map(|(i, st)| match (&st.sure, i == last) {
                            (Some(sure), false) if sure.at_least.is_finite() => Ok(Stage {
                                model: st.model.clone(),
                                version: st.version.clone(),
                                sure: Some((sure.output.clone(), sure.at_least)),
                            }),
                            (None, true) => {
                                Ok(Stage { model: st.model.clone(), version: st.version.clone(), sure: None })
                            }
                            (_, false) => Err(bad(format!(
                                "step '{}': every cascade stage but the last says when it is sure",
                                s.name
                            ))),
                            (Some(_), true) => {
                                Err(bad(format!("step '{}': the last cascade stage always answers", s.name)))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?
                }
                _ => return Err(bad(format!("step '{}': give a model, or a cascade of two or more", s.name))),
            };
            if let Some(m) = stages.iter().find(|st| !outpost_proto::valid_name(&st.model)) {
                return Err(bad(format!("step '{}': '{}' is not a model name", s.name, m.model.escape_debug())));
            }
            if s.inputs.is_empty() {
                return Err(bad(format!("step '{}' takes no input", s.name)));
            }
            let inputs = s
                .inputs
                .iter()
                .map(|(k, v)| parse_source(v, &doc.inputs, &names).map(|src| (k.clone(), src)).map_err(&bad))
                .collect::<Result<Vec<_>, _>>()?;
            steps.push(Step { name: s.name.clone(), stages, inputs, level: 0 });
        }
        // Levels, longest path first; a cycle leaves a step unplaced.
        let mut placed = vec![false; steps.len()];
        for _ in 0..steps.len() {
            for i in 0..steps.len() {
                if placed[i] {
                    continue;
                }
                let deps: Vec<usize> = steps[i]
                    .inputs
                    .iter()
                    .filter_map(|(_, s)| match s {
                        Source::Step { step, .. } => Some(*step),
                        Source::Input(_) => None,
                    })
                    .collect();
                if deps.iter().all(|&d| placed[d]) {
                    steps[i].level = deps.iter().map(|&d| steps[d].level + 1).max().unwrap_or(0);
                    placed[i] = true;
                }
            }
        }
        if let Some(i) = placed.iter().position(|p| !p) {
            return Err(bad(format!("step '{}' is part of a cycle", steps[i].name)));
        }
        let outputs = doc
            .outputs
            .iter()
            .map(|(k, v)| match parse_source(v, &doc.inputs, &names).map_err(&bad)? {
                Source::Input(_) => Err(bad(format!("output '{k}' must come from a step"))),
                src => Ok((k.clone(), src)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pipeline { name: doc.name.clone(), version: version.to_owned(), inputs: doc.inputs.clone(), steps, outputs })
    }

    /// Every model the pipeline may call.
    pub fn models(&self) -> Vec<&str> {
        let mut m: Vec<&str> = self.steps.iter().flat_map(|s| s.stages.iter().map(|st| st.model.as_str())).collect();
        m.sort_unstable();
        m.dedup();
        m
    }

    /// The names of the answer's outputs.
    pub fn output_names(&self) -> Vec<String> {
        self.outputs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The inputs and outputs callers see (name, datatype, shape), as the models that take
    /// and give them declare them (BYTES `[-1]` while such a model does not serve).
    pub fn io(&self, repository: &super::Repository) -> (Vec<Spec>, Vec<Spec>) {
        let io = |model: &str| repository.serving(model, None).ok().map(|s| s.io());
        let unknown = |n: &str| (n.to_owned(), crate::protocol::DataType::Bytes, vec![-1]);
        let inputs = self
            .inputs
            .iter()
            .map(|name| {
                let taker = self.steps.iter().find_map(|s| {
                    s.inputs.iter().find(|(_, src)| *src == Source::Input(name.clone())).map(|(k, _)| (s, k))
                });
                taker
                    .and_then(|(s, k)| io(&s.stages[0].model)?.0.into_iter().find(|t| &t.0 == k))
                    .map_or_else(|| unknown(name), |(_, dt, shape)| (name.clone(), dt, shape))
            })
            .collect();
        let outputs = self
            .outputs
            .iter()
            .map(|(name, src)| match src {
                Source::Step { step, output } => io(&self.steps[*step].stages[0].model)
                    .and_then(|(_, outs)| outs.into_iter().find(|t| &t.0 == output))
                    .map_or_else(|| unknown(name), |(_, dt, shape)| (name.clone(), dt, shape)),
                Source::Input(_) => unknown(name),
            })
            .collect();
        (inputs, outputs)
    }

    /// Whether every model the pipeline may call serves; the first that does not.
    pub fn ready(&self, repository: &super::Repository) -> Result<(), String> {
        match self.models().into_iter().find(|m| repository.serving(m, None).is_err()) {
            Some(m) => Err(format!("pipeline '{}' is not ready: model '{m}' does not serve", self.name)),
            None => Ok(()),
        }
    }

    /// The steps as status and metadata show them.
    pub fn describe(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step": s.name,
                    "models": s.stages.iter().map(|st| st.model.clone()).collect::<Vec<_>>(),
                    "cascade": s.stages.len() > 1,
                    "level": s.level,
                })
            })
            .collect();
        json!(steps)
    }
}

/// The pipelines served, by where they came from (`local`, `registry`). A local pipeline
/// hides a registry one of the same name, as local models do.
#[derive(Default)]
pub struct PipelineTable {
    by_source: RwLock<BTreeMap<String, BTreeMap<String, Arc<Pipeline>>>>,
    /// Pipelines held over all sources: a request looks nothing up while there are none.
    count: std::sync::atomic::AtomicUsize,
}

impl PipelineTable {
    /// Replaces what `source` provides.
    pub fn set(&self, source: &str, pipelines: Vec<Pipeline>) {
        let map = pipelines.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect();
        if let Ok(mut t) = self.by_source.write() {
            t.insert(source.to_owned(), map);
            self.count.store(t.values().map(BTreeMap::len).sum(), std::sync::atomic::Ordering::Release);
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pipeline>> {
        if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        let t = self.by_source.read().ok()?;
        t.values().find_map(|m| m.get(name).cloned())
    }

    pub fn list(&self) -> Vec<Arc<Pipeline>> {
        let Ok(t) = self.by_source.read() else { return Vec::new() };
        let mut seen = BTreeMap::new();
        for m in t.values() {
            for (n, p) in m {
                seen.entry(n.clone()).or_insert_with(|| p.clone());
            }
        }
        seen.into_values().collect()
    }
}

/// Whether every row's largest value of `output` is at least `at_least`.
fn is_sure(r: &InferResponse, output: &str, at_least: f64) -> bool {
    let Some(t) = r.outputs.iter().find(|t| t.name == output) else { return false };
    let Some(v) = t.data.to_f64() else { return false };
    // The bar as the output's own precision holds it: 0.9 is 0.89999998 in FP32.
    let at_least = match t.data {
        crate::protocol::TensorData::F32(_) | crate::protocol::TensorData::F16(_) => f64::from(at_least as f32),
        _ => at_least,
    };
    let width = t.shape.last().copied().unwrap_or(1).max(1);
    !v.is_empty() && v.chunks(width).all(|row| row.iter().copied().fold(f64::NEG_INFINITY, f64::max) >= at_least)
}

impl InferenceService {
    /// Runs a pipeline: its steps level by level (a level's steps together), each through its
    /// model's routing and queue. Returns the answer and what each step did, for the record.
    pub(super) async fn run_pipeline(
        &self,
        ctx: &RequestContext,
        p: &Pipeline,
        request: InferRequest,
    ) -> (Result<InferResponse, InferError>, Vec<Value>) {
        let mut record = Vec::new();
        // Inputs marked sensitive keep everything derived from them on the site: every step's
        // inputs are marked so (its model's overflow then refuses them).
        let sensitive = self.carries_sensitive(&request);
        let mut given: HashMap<String, Tensor> = HashMap::new();
        for t in request.inputs {
            if !p.inputs.contains(&t.name) {
                return (
                    Err(InferError::InvalidInput(format!("pipeline '{}' has no input '{}'", p.name, t.name))),
                    record,
                );
            }
            given.insert(t.name.clone(), t);
        }
        if let Some(missing) = p.inputs.iter().find(|i| !given.contains_key(*i)) {
            return (Err(InferError::InvalidInput(format!("pipeline '{}' needs input '{missing}'", p.name))), record);
        }
        if let Some(o) = request.outputs.iter().find(|o| !p.outputs.iter().any(|(n, _)| *n == o.name)) {
            return (Err(InferError::InvalidInput(format!("unknown output '{}'", o.name))), record);
        }
        let mut answers: Vec<Option<InferResponse>> = (0..p.steps.len()).map(|_| None).collect();
        let levels = p.steps.iter().map(|s| s.level).max().unwrap_or(0);
        for level in 0..=levels {
            let mut calls = Vec::new();
            for (i, step) in p.steps.iter().enumerate().filter(|(_, s)| s.level == level) {
                let mut inputs = Vec::with_capacity(step.inputs.len());
                for (name, src) in &step.inputs {
                    let t = match src {
                        Source::Input(n) => given.get(n).cloned(),
                        Source::Step { step: from, output } => {
                            answers[*from].as_ref().and_then(|r| r.outputs.iter().find(|t| &t.name == output).cloned())
                        }
                    };
                    let Some(mut t) = t else {
                        let e = format!("step '{}': its source for '{name}' gave no such output", step.name);
                        return (Err(InferError::InvalidInput(e)), record);
                    };
                    t.name.clone_from(name);
                    inputs.push(t);
                }
                calls.push(async move { (i, self.run_step(ctx, step, inputs, sensitive).await) });
            }
            for (i, (result, steps)) in futures::future::join_all(calls).await {
                record.extend(steps);
                match result {
                    Ok(r) => answers[i] = Some(r),
                    Err(e) => {
                        let step = &p.steps[i].name;
                        let e = match e {
                            InferError::InvalidInput(m) => InferError::InvalidInput(format!("step '{step}': {m}")),
                            InferError::Internal(m) => InferError::Internal(format!("step '{step}': {m}")),
                            other => other,
                        };
                        return (Err(e), record);
                    }
                }
            }
        }
        let wanted: Vec<&str> = request.outputs.iter().map(|o| o.name.as_str()).collect();
        let mut outputs = Vec::new();
        for (name, src) in p.outputs.iter().filter(|(n, _)| wanted.is_empty() || wanted.contains(&n.as_str())) {
            let Source::Step { step, output } = src else { continue };
            match answers[*step].as_ref().and_then(|r| r.outputs.iter().find(|t| &t.name == output)) {
                Some(t) => outputs.push(Tensor { name: name.clone(), ..t.clone() }),
                None => {
                    let e = format!("step '{}' gave no output '{output}'", p.steps[*step].name);
                    return (Err(InferError::Internal(e)), record);
                }
            }
        }
        let mut parameters = serde_json::Map::new();
        parameters.insert("pipeline_steps".into(), Value::Array(record.clone()));
        let answer = InferResponse {
            model_name: p.name.clone(),
            model_version: p.version.clone(),
            id: request.id,
            parameters,
            outputs,
        };
        (Ok(answer), record)
    }

    /// One step: its model, or its cascade's stages in turn until one is sure.
    async fn run_step(
        &self,
        ctx: &RequestContext,
        step: &Step,
        inputs: Vec<Tensor>,
        sensitive: bool,
    ) -> (Result<InferResponse, InferError>, Vec<Value>) {
        let mut record = Vec::new();
        let last = step.stages.len() - 1;
        let mut params = serde_json::Map::new();
        if sensitive {
            params.insert("sensitive".into(), Value::Bool(true));
        }
        for (k, stage) in step.stages.iter().enumerate() {
            let started = Instant::now();
            let request = InferRequest {
                input_parameters: vec![params.clone(); inputs.len()],
                inputs: inputs.clone(),
                ..Default::default()
            };
            let mut routing = Routing::default();
            let Routed { result, served_as } =
                self.route(ctx, &stage.model, stage.version.as_deref(), request, &mut routing).await;
            let version = result.as_ref().ok().map(|r| r.model_version.clone());
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            let run = served_as.as_ref().and_then(|(_, r)| *r);
            let here = served_as.as_ref().filter(|_| !routing.answered_upstream).map_or("", |(v, _)| v.as_str());
            self.metrics.record_request(&stage.model, here, outcome, started.elapsed(), run);
            // A canary is judged on its pipeline traffic too.
            if !here.is_empty() {
                let error = matches!(&result, Err(InferError::Internal(_) | InferError::DeadlineExceeded));
                if let Some(verdict) = self.repository.observe(&stage.model, here, error, run) {
                    self.announce(verdict).await;
                }
            }
            let sure = match (&result, &stage.sure) {
                (Ok(r), Some((output, at_least))) => Some(is_sure(r, output, *at_least)),
                _ => None,
            };
            let mut entry = json!({
                "step": step.name,
                "model": stage.model,
                "version": version,
                "outcome": outcome,
                "route": if routing.answered_upstream { "overflow" } else { "local" },
                "us": started.elapsed().as_micros() as u64,
            });
            // Only a cascade stage with a bar says whether it was sure.
            if let (Some(sure), Some(e)) = (sure, entry.as_object_mut()) {
                e.insert("sure".into(), Value::Bool(sure));
            }
            record.push(entry);
            match (result, sure) {
                (Err(e), _) => return (Err(e), record),
                (Ok(_), Some(false)) if k < last => continue,
                (Ok(r), _) => return (Ok(r), record),
            }
        }
        (Err(InferError::Internal(format!("step '{}' has no stage", step.name))), record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(v: Value) -> PipelineDoc {
        serde_json::from_value(v).expect("pipeline document parses")
    }

    #[test]
    fn steps_are_ordered_after_their_sources_and_cycles_refused() {
        let d = doc(json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "c.out" }, "steps": [
            { "name": "c", "model": "m3", "inputs": { "a": "a.out", "b": "b.out" } },
            { "name": "a", "model": "m1", "inputs": { "x": "input.x" } },
            { "name": "b", "model": "m2", "inputs": { "x": "input.x" } } ] }));
        let p = Pipeline::build(&d, "1").expect("builds");
        let levels: Vec<(&str, usize)> = p.steps.iter().map(|s| (s.name.as_str(), s.level)).collect();
        assert_eq!(levels, [("c", 1), ("a", 0), ("b", 0)]);
        assert_eq!(p.models(), ["m1", "m2", "m3"]);
        let cyc = doc(json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "a.out" }, "steps": [
            { "name": "a", "model": "m1", "inputs": { "x": "b.out" } },
            { "name": "b", "model": "m2", "inputs": { "x": "a.out" } } ] }));
        assert!(Pipeline::build(&cyc, "1").unwrap_err().contains("cycle"));
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        for (v, want) in [
            (
                json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "a.out" }, "steps": [
                { "name": "a", "model": "m", "inputs": { "x": "input.z" } } ] }),
                "no input 'z'",
            ),
            (
                json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "b.out" }, "steps": [
                { "name": "a", "model": "m", "inputs": { "x": "input.x" } } ] }),
                "no step 'b'",
            ),
            (
                json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "a.out" }, "steps": [
                { "name": "a", "model": "m", "cascade": [{ "model": "n" }], "inputs": { "x": "input.x" } } ] }),
                "give a model",
            ),
            (
                json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "a.out" }, "steps": [
                { "name": "a", "cascade": [{ "model": "n" }, { "model": "o" }], "inputs": { "x": "input.x" } } ] }),
                "says when it is sure",
            ),
            (
                json!({ "name": "p", "inputs": ["x"], "outputs": { "y": "input.x" }, "steps": [
                { "name": "a", "model": "m", "inputs": { "x": "input.x" } } ] }),
                "must come from a step",
            ),
            (json!({ "name": "../p", "inputs": [], "outputs": {}, "steps": [] }), "must be 1-128"),
        ] {
            let err = Pipeline::build(&doc(v), "1").unwrap_err();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
    }

    #[test]
    fn a_stage_is_sure_when_every_row_clears_the_bar() {
        let r = |data: Vec<f32>| InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            parameters: Default::default(),
            outputs: vec![Tensor { name: "p".into(), shape: vec![2, 2], data: crate::protocol::TensorData::F32(data) }],
        };
        assert!(is_sure(&r(vec![0.95, 0.05, 0.1, 0.9]), "p", 0.9));
        assert!(!is_sure(&r(vec![0.95, 0.05, 0.5, 0.5]), "p", 0.9));
        assert!(!is_sure(&r(vec![0.95, 0.05, 0.1, 0.9]), "q", 0.9), "a missing output is not sure");
    }
}
