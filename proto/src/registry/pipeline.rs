//! Pipelines (DESIGN §3, "pipelines"): models and their steps chained as a DAG and served under
//! one name. The registry publishes them in `pipelines.json`, signed by the index role,
//! versioned and expiring like the index; a local model directory may hold a `pipeline.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const PIPELINES_TYPE: &str = "application/vnd.outpost.pipelines+json";
pub const MAX_PIPELINES_BYTES: u64 = 1 << 20;

/// `pipelines.json`: every pipeline the registry publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipelines {
    #[serde(rename = "_type")]
    pub kind: String,
    pub version: u64,
    pub expires: String,
    pub pipelines: Vec<PipelineDoc>,
}

/// One pipeline: its inputs, its steps and which step outputs are its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDoc {
    pub name: String,
    /// The names of the request inputs the steps read (`input.<name>`).
    pub inputs: Vec<String>,
    pub steps: Vec<PipelineStep>,
    /// The answer: output name → source (`<step>.<output>`).
    pub outputs: BTreeMap<String, String>,
}

/// A step: one model, or a cascade of models (the first that is sure answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineStep {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cascade: Vec<CascadeStage>,
    /// The model's inputs: model input name → source (`input.<name>` or `<step>.<output>`).
    pub inputs: BTreeMap<String, String>,
}

/// One model of a cascade; every stage but the last says when it is sure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeStage {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sure: Option<Sure>,
}

/// A stage is sure when, in every row of `output`, the largest value is at least `at_least`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sure {
    pub output: String,
    pub at_least: f64,
}
