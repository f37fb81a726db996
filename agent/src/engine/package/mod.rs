//! Model packages: the processing steps a signed manifest (or a local `package.json`) ships
//! with a model, run around it so that callers send raw data (text, an encoded image, named
//! fields) and get answers (probabilities, top-k labels, decisions).
//!
//! A [`Package`] is built from its declaration and the bytes of the files it names (the
//! caller has checked their digests), then proven like a model: its golden vectors, raw
//! input in and final output out, must be reproduced before it serves ([`Package::check`]).
//! Every step bounds what it accepts before it allocates for it.

mod image;
mod post;
mod tabular;
mod text;

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;

pub use outpost_proto::registry::package::{
    FileRef, PostStep, PreStep, Processing, MAX_PACKAGE_FILES, MAX_PACKAGE_FILE_BYTES,
};

use super::golden::{compare, Golden, GoldenCase, GoldenReport, Tolerance};
use super::model::LoadedModel;
use crate::protocol::json::tensors_from_value;
use crate::protocol::{DataType, Tensor, TensorData};

/// Most raw items (texts, images, rows) in one request.
pub const MAX_ITEMS: usize = 1024;

/// A package ready to run.
pub struct Package {
    pre: Vec<Pre>,
    post: Vec<post::Post>,
    outputs: Vec<String>,
    /// The raw inputs, in declaration order, with what each takes.
    pub raw_inputs: Vec<(String, &'static str)>,
}

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package").field("raw_inputs", &self.raw_inputs).finish_non_exhaustive()
    }
}

enum Pre {
    Text(Box<text::Text>),
    Image(image::Image),
    Tabular(tabular::Tabular),
}

/// A tensor as metadata shows it: name, datatype, V2 shape (`-1`: any).
pub type Spec = (String, DataType, Vec<i64>);

impl Pre {
    /// The model inputs the step produces.
    fn feeds(&self) -> Vec<&str> {
        match self {
            Pre::Text(s) => s.feeds(),
            Pre::Image(s) => vec![s.output()],
            Pre::Tabular(s) => vec![s.output()],
        }
    }

    fn input(&self) -> &str {
        match self {
            Pre::Text(s) => s.input(),
            Pre::Image(s) => s.input(),
            Pre::Tabular(s) => s.input(),
        }
    }
}

/// The items of a raw (BYTES) input: its elements, at most [`MAX_ITEMS`].
fn items<'a>(t: &'a Tensor, what: &str) -> Result<&'a [Vec<u8>], String> {
    let TensorData::Bytes(v) = &t.data else {
        return Err(format!("input '{}' takes {what} as BYTES, not {}", t.name, t.datatype()));
    };
    if v.is_empty() {
        return Err(format!("input '{}' is empty", t.name));
    }
    if v.len() > MAX_ITEMS {
        return Err(format!("input '{}' has {} items; at most {MAX_ITEMS} per request", t.name, v.len()));
    }
    Ok(v)
}

impl Package {
    /// Builds the steps; `file` gives the bytes of a package file by name (already checked
    /// against its digest by the caller). Fails on a step that cannot run: a file missing or
    /// unreadable, a bad setting.
    pub fn build(decl: &Processing, file: &dyn Fn(&str) -> Result<Vec<u8>, String>) -> Result<Package, String> {
        if decl.pre.is_empty() && decl.post.is_empty() {
            return Err("a package declares no step".into());
        }
        let mut pre = Vec::new();
        let mut raw_inputs = Vec::new();
        for step in &decl.pre {
            if raw_inputs.iter().any(|(n, _)| n == step.input()) {
                return Err(format!("two steps read input '{}'", step.input()));
            }
            let (built, kind) = match step {
                PreStep::Text(s) => (Pre::Text(Box::new(text::Text::build(s, &file(&s.tokenizer)?)?)), "text"),
                PreStep::Image(s) => (Pre::Image(image::Image::build(s)?), "image"),
                PreStep::Tabular(s) => (Pre::Tabular(tabular::Tabular::build(s)?), "fields"),
            };
            raw_inputs.push((step.input().to_owned(), kind));
            pre.push(built);
        }
        let post = decl.post.iter().map(|s| post::Post::build(s, file)).collect::<Result<Vec<_>, _>>()?;
        Ok(Package { pre, post, outputs: decl.outputs.clone(), raw_inputs })
    }

    /// Whether pre-processing these inputs may take more than tens of microseconds (image
    /// decoding, long texts): run off the runtime's threads.
    pub fn heavy(&self, inputs: &[Tensor]) -> bool {
        const LIGHT_BYTES: usize = 16 << 10;
        let raw: usize = inputs
            .iter()
            .map(|t| match &t.data {
                TensorData::Bytes(v) => v.iter().map(Vec::len).sum(),
                _ => 0,
            })
            .sum();
        raw > LIGHT_BYTES || self.pre.iter().any(|p| matches!(p, Pre::Image(_)))
    }

    /// The model inputs for a request's raw inputs; inputs no step reads pass through.
    /// Errors are the caller's (bad input), with the input named.
    pub fn pre(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, String> {
        let mut out = Vec::with_capacity(inputs.len() + 2);
        for t in inputs {
            match self.pre.iter().find(|p| p.input() == t.name) {
                None => out.push(t),
                Some(Pre::Text(s)) => out.extend(s.run(&t)?),
                Some(Pre::Image(s)) => out.push(s.run(&t)?),
                Some(Pre::Tabular(s)) => out.push(s.run(&t)?),
            }
        }
        Ok(out)
    }

    /// The answer's outputs from the model's.
    pub fn post(&self, mut outputs: Vec<Tensor>) -> Result<Vec<Tensor>, String> {
        for step in &self.post {
            step.run(&mut outputs)?;
        }
        if self.outputs.is_empty() {
            return Ok(outputs);
        }
        self.outputs
            .iter()
            .map(|name| {
                let i = outputs.iter().position(|t| &t.name == name).ok_or_else(|| format!("no output '{name}'"))?;
                Ok(outputs.swap_remove(i))
            })
            .collect()
    }

    /// The names of the outputs a caller may ask for, given the model's.
    pub fn output_names(&self, model: &[String]) -> Vec<String> {
        if !self.outputs.is_empty() {
            return self.outputs.clone();
        }
        let mut names = model.to_vec();
        for step in &self.post {
            for n in step.adds() {
                if !names.iter().any(|m| m == n) {
                    names.push(n.to_owned());
                }
            }
        }
        names
    }

    /// The V2 inputs and outputs callers see (name, datatype, shape), given the model's.
    pub fn describe(&self, model: &super::Signature) -> (Vec<Spec>, Vec<Spec>) {
        let fed: Vec<&str> = self.pre.iter().flat_map(Pre::feeds).collect();
        let mut inputs: Vec<Spec> =
            self.raw_inputs.iter().map(|(n, _)| (n.clone(), DataType::Bytes, vec![-1])).collect();
        inputs.extend(
            model
                .inputs
                .iter()
                .filter(|t| !fed.contains(&t.name.as_str()))
                .map(|t| (t.name.clone(), t.datatype, t.v2_shape())),
        );
        let names = self.output_names(&model.outputs.iter().map(|t| t.name.clone()).collect::<Vec<_>>());
        let outputs = names
            .into_iter()
            .map(|n| {
                let added = self.post.iter().rev().find_map(|p| p.describes(&n));
                match (added, model.outputs.iter().find(|t| t.name == n)) {
                    (Some((dt, shape)), _) => (n, dt, shape),
                    (None, Some(t)) => (n, t.datatype, t.v2_shape()),
                    (None, None) => (n, DataType::Bytes, vec![-1]),
                }
            })
            .collect();
        (inputs, outputs)
    }

    /// Runs the package's golden cases through the steps and the model; the first mismatch
    /// is the error.
    pub fn check(&self, golden: &Golden, model: &LoadedModel) -> Result<GoldenReport, String> {
        let mut max_err = 0.0f64;
        for (i, case) in golden.cases.iter().enumerate() {
            let got = self.pre(case.inputs.clone()).map_err(|e| format!("package case {i}: {e}"))?;
            let got = model.validate(got).map_err(|e| format!("package case {i}: {e}"))?;
            let got = model.run(got).map_err(|e| format!("package case {i}: {e}"))?;
            let got = self.post(got).map_err(|e| format!("package case {i}: {e}"))?;
            for want in &case.outputs {
                let have = got
                    .iter()
                    .find(|t| t.name == want.name)
                    .ok_or_else(|| format!("package case {i}: no output '{}'", want.name))?;
                let err = compare(have, want, &golden.tolerance)
                    .map_err(|e| format!("package case {i}, output '{}': {e}", want.name))?;
                max_err = max_err.max(err);
            }
        }
        Ok(GoldenReport { cases: golden.cases.len(), max_abs_error: max_err })
    }
}

/// Parses a package's golden vectors: the model's golden format, where a BYTES input may say
/// `"encoding": "base64"` (binary data such as an image).
pub fn parse_golden(v: &Value) -> Result<Golden, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        producer: Option<String>,
        tolerance: Tolerance,
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Case {
        inputs: Vec<Value>,
        outputs: Value,
    }
    let file: File = serde_json::from_value(v.clone()).map_err(|e| format!("package golden vectors: {e}"))?;
    if file.cases.is_empty() {
        return Err("package golden vectors have no cases".into());
    }
    if !(file.tolerance.atol >= 0.0 && file.tolerance.rtol >= 0.0) {
        return Err("package golden vectors: tolerances must be non-negative".into());
    }
    let mut cases = Vec::new();
    for (i, c) in file.cases.into_iter().enumerate() {
        let mut inputs = Vec::new();
        for mut raw in c.inputs {
            let base64 = raw.as_object_mut().and_then(|o| o.remove("encoding"));
            match base64.as_ref().map(|e| e.as_str()) {
                None => inputs.extend(
                    tensors_from_value(Value::Array(vec![raw])).map_err(|e| format!("package golden case {i}: {e}"))?,
                ),
                Some(Some("base64")) => {
                    inputs.push(base64_tensor(&raw).map_err(|e| format!("package golden case {i}: {e}"))?)
                }
                Some(_) => return Err(format!("package golden case {i}: the only encoding is \"base64\"")),
            }
        }
        let outputs = tensors_from_value(c.outputs).map_err(|e| format!("package golden case {i} outputs: {e}"))?;
        cases.push(GoldenCase { inputs, outputs });
    }
    Ok(Golden { producer: file.producer, tolerance: file.tolerance, cases })
}

fn base64_tensor(v: &Value) -> Result<Tensor, String> {
    let name = v.get("name").and_then(Value::as_str).ok_or("an input without a name")?;
    if v.get("datatype").and_then(Value::as_str) != Some(DataType::Bytes.as_str()) {
        return Err(format!("input '{name}': base64 data must be BYTES"));
    }
    let data = v.get("data").and_then(Value::as_array).ok_or_else(|| format!("input '{name}' has no data array"))?;
    let items = data
        .iter()
        .map(|d| {
            d.as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(|| format!("input '{name}': data must be base64 strings"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor { name: name.to_owned(), shape: vec![items.len()], data: TensorData::Bytes(items) })
}

/// Checks a registry package's file list against what its steps read: every file named, with
/// a sane digest and size, and no more files than [`MAX_PACKAGE_FILES`].
pub fn check_files(decl: &Processing) -> Result<(), String> {
    if decl.files.len() > MAX_PACKAGE_FILES {
        return Err(format!("a package carries {} files; at most {MAX_PACKAGE_FILES}", decl.files.len()));
    }
    for (name, f) in &decl.files {
        if !outpost_proto::valid_name(name) {
            return Err(format!("package file name '{}' must be 1-128 of [A-Za-z0-9._-]", name.escape_debug()));
        }
        outpost_proto::registry::check_hex_digest(&f.sha256).map_err(|e| e.to_string())?;
        if f.size > MAX_PACKAGE_FILE_BYTES {
            return Err(format!("package file '{name}' is {} bytes; at most {MAX_PACKAGE_FILE_BYTES}", f.size));
        }
    }
    for needed in needed_files(decl) {
        if !decl.files.contains_key(needed) {
            return Err(format!("a step reads '{needed}', which the package's file list does not name"));
        }
    }
    Ok(())
}

/// The files the steps read.
pub fn needed_files(decl: &Processing) -> Vec<&str> {
    let mut names: Vec<&str> = decl
        .pre
        .iter()
        .filter_map(|s| match s {
            PreStep::Text(t) => Some(t.tokenizer.as_str()),
            _ => None,
        })
        .chain(decl.post.iter().filter_map(|s| match s {
            PostStep::TopK { labels, .. } => Some(labels.as_str()),
            _ => None,
        }))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Builds a package and proves it on `model`: its golden vectors must hold. The detail says
/// what was checked.
pub fn prepare(
    decl: &Processing,
    files: &BTreeMap<String, Vec<u8>>,
    model: &LoadedModel,
) -> Result<(Package, String), String> {
    let started = std::time::Instant::now();
    let package = Package::build(decl, &|name| {
        files.get(name).cloned().ok_or_else(|| format!("package file '{name}' is missing"))
    })?;
    let golden = parse_golden(&decl.golden)?;
    let report = package.check(&golden, model).map_err(|e| format!("package golden vectors not reproduced: {e}"))?;
    let detail = format!(
        "package golden vectors reproduced: {} cases, max abs error {:.2e}, in {} ms",
        report.cases,
        report.max_abs_error,
        started.elapsed().as_millis()
    );
    Ok((package, detail))
}

#[cfg(test)]
mod tests;
