//! Golden vectors: sample inputs with the outputs an independent runtime (ONNX Runtime)
//! computed. A model must reproduce them within tolerance before it serves.

use serde::Deserialize;
use serde_json::Value;

use super::model::LoadedModel;
use crate::protocol::json::tensors_from_value;
use crate::protocol::{Tensor, TensorData};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    /// Absolute tolerance for floating-point outputs.
    pub atol: f64,
    /// Relative tolerance, added as `rtol * |expected|`.
    #[serde(default)]
    pub rtol: f64,
    /// For embeddings: the least cosine similarity each row (last axis) must keep with the
    /// expected row. Catches a wrong direction that small absolute errors would hide.
    #[serde(default)]
    pub cosine_min: Option<f64>,
    /// Checks per output, by what the output is; outputs not named here use the fields above.
    #[serde(default)]
    pub outputs: std::collections::BTreeMap<String, OutputCheck>,
}

/// What an output is, and so how it is compared with the expected one.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Class labels (or any output that must match exactly).
    Label,
    /// Probabilities or scores: an absolute tolerance.
    Probability,
    /// Embeddings: each row (last axis) keeps a cosine similarity with the expected row.
    Embedding,
    /// Regression values: a relative tolerance (plus the absolute one).
    Regression,
}

/// One output's check: its kind, with tolerances that default by kind.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputCheck {
    pub kind: OutputKind,
    #[serde(default)]
    pub atol: Option<f64>,
    #[serde(default)]
    pub rtol: Option<f64>,
    #[serde(default)]
    pub cosine_min: Option<f64>,
}

/// Least cosine similarity of an embedding row by default.
pub const EMBEDDING_COSINE_MIN: f64 = 0.99;
/// Relative tolerance of a regression output by default.
pub const REGRESSION_RTOL: f64 = 1e-3;

/// How one output is compared: exact, within `atol + rtol·|expected|`, and/or by cosine.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Check {
    exact: bool,
    atol: f64,
    rtol: f64,
    /// `None`: no element-wise bound (an embedding is judged by direction).
    elementwise: bool,
    cosine_min: Option<f64>,
}

impl Tolerance {
    fn check_for(&self, output: &str, float: bool) -> Check {
        let base =
            Check { exact: !float, atol: self.atol, rtol: self.rtol, elementwise: true, cosine_min: self.cosine_min };
        let Some(spec) = self.outputs.get(output) else { return base };
        match spec.kind {
            OutputKind::Label => Check { exact: true, atol: 0.0, rtol: 0.0, elementwise: true, cosine_min: None },
            OutputKind::Probability => {
                Check { atol: spec.atol.unwrap_or(self.atol), rtol: spec.rtol.unwrap_or(0.0), cosine_min: None, ..base }
            }
            OutputKind::Embedding => Check {
                atol: spec.atol.unwrap_or(0.0),
                rtol: spec.rtol.unwrap_or(0.0),
                elementwise: spec.atol.is_some() || spec.rtol.is_some(),
                cosine_min: Some(spec.cosine_min.unwrap_or(EMBEDDING_COSINE_MIN)),
                ..base
            },
            OutputKind::Regression => Check {
                atol: spec.atol.unwrap_or(self.atol),
                rtol: spec.rtol.unwrap_or(REGRESSION_RTOL),
                cosine_min: None,
                ..base
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct GoldenFile {
    /// Which runtime computed the expected outputs.
    #[serde(default)]
    pub producer: Option<String>,
    pub tolerance: Tolerance,
    pub cases: Vec<GoldenCaseRaw>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GoldenCaseRaw {
    pub inputs: Value,
    pub outputs: Value,
}

#[derive(Debug, Clone)]
pub struct GoldenCase {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Golden {
    pub producer: Option<String>,
    pub tolerance: Tolerance,
    pub cases: Vec<GoldenCase>,
}

/// What a successful check measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoldenReport {
    pub cases: usize,
    pub max_abs_error: f64,
}

impl Golden {
    pub fn parse(bytes: &[u8]) -> Result<Golden, String> {
        let file: GoldenFile = serde_json::from_slice(bytes).map_err(|e| format!("golden file: {e}"))?;
        if !(file.tolerance.atol >= 0.0 && file.tolerance.rtol >= 0.0) {
            return Err("golden file: tolerances must be non-negative".into());
        }
        if file.cases.is_empty() {
            return Err("golden file has no cases".into());
        }
        let cases = file
            .cases
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                Ok(GoldenCase {
                    inputs: tensors_from_value(c.inputs).map_err(|e| format!("golden case {i} inputs: {e}"))?,
                    outputs: tensors_from_value(c.outputs).map_err(|e| format!("golden case {i} outputs: {e}"))?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Golden { producer: file.producer, tolerance: file.tolerance, cases })
    }

    /// Runs every case; the first mismatch is the error.
    pub fn check(&self, model: &LoadedModel) -> Result<GoldenReport, String> {
        let mut max_err = 0.0f64;
        for (i, case) in self.cases.iter().enumerate() {
            let inputs = model.validate(case.inputs.clone()).map_err(|e| format!("case {i}: {e}"))?;
            let got = model.run(inputs).map_err(|e| format!("case {i}: {e}"))?;
            for want in &case.outputs {
                let Some(have) = got.iter().find(|t| t.name == want.name) else {
                    return Err(format!("case {i}: model has no output '{}'", want.name));
                };
                let err = compare(have, want, &self.tolerance)
                    .map_err(|e| format!("case {i}, output '{}': {e}", want.name))?;
                max_err = max_err.max(err);
            }
        }
        Ok(GoldenReport { cases: self.cases.len(), max_abs_error: max_err })
    }
}

impl Golden {
    /// Whether each row's answer is its own: every case, as it is and with its float inputs a
    /// quarter as wide, run alone and then joined on the batch axis with each case's inputs 16
    /// times wider (a companion of another range), must give the same rows within the
    /// tolerance. Err names the output that changed.
    pub fn rows_independent(&self, model: &LoadedModel) -> Result<(), String> {
        use super::batch::{compatible, concat, rows, split};
        let scaled = |inputs: &[Tensor], k: f32| -> Vec<Tensor> {
            inputs
                .iter()
                .map(|t| {
                    let mut t = t.clone();
                    match &mut t.data {
                        TensorData::F16(v) | TensorData::F32(v) => v.iter_mut().for_each(|x| *x *= k),
                        TensorData::F64(v) => v.iter_mut().for_each(|x| *x *= f64::from(k)),
                        _ => {}
                    }
                    t
                })
                .collect()
        };
        let mut cases = Vec::new();
        for case in &self.cases {
            cases.push(model.validate(case.inputs.clone()).map_err(|e| e.to_string())?);
        }
        let owns: Vec<Vec<Tensor>> = cases.iter().flat_map(|c| [c.clone(), scaled(c, 0.25)]).collect();
        let companions: Vec<Vec<Tensor>> = cases.iter().map(|c| scaled(c, 16.0)).collect();
        for own in &owns {
            let Ok(alone) = model.run(own.clone()) else { continue };
            for companion in companions.iter().filter(|c| compatible(own, c)) {
                let split_at = [rows(own), rows(companion)];
                let joined = concat(vec![own.clone(), companion.clone()])?;
                let Ok(out) = model.run(joined) else { continue };
                let Some(together) = split(out, &split_at)?.into_iter().next() else { continue };
                for want in &alone {
                    let Some(have) = together.iter().find(|t| t.name == want.name) else { continue };
                    compare(have, want, &self.tolerance).map_err(|e| {
                        format!("output '{}' of a row changes with the rows it shares a run with ({e})", want.name)
                    })?;
                }
            }
        }
        Ok(())
    }
}

impl Golden {
    /// Whether the tolerances can tell right outputs from wrong ones of the same scale: for
    /// each non-exact output, its expected values over all cases, reversed and laid back case
    /// by case, must fail the comparison somewhere. A tolerance that accepts them would also
    /// accept a model that computes something else (publishing refuses it).
    pub fn tolerances_discriminate(&self) -> Result<(), String> {
        let Some(first) = self.cases.first() else { return Ok(()) };
        for out in &first.outputs {
            let float = matches!(out.data, TensorData::F16(_) | TensorData::F32(_) | TensorData::F64(_));
            if self.tolerance.check_for(&out.name, float).exact {
                continue;
            }
            let wants: Vec<&Tensor> =
                self.cases.iter().filter_map(|c| c.outputs.iter().find(|t| t.name == out.name)).collect();
            let values: Vec<f64> = wants.iter().filter_map(|t| t.data.to_f64()).flatten().collect();
            let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            if values.is_empty() || hi <= lo {
                continue; // constant: every permutation is the same output
            }
            let mut reversed = values.into_iter().rev();
            let mut all_pass = true;
            for want in &wants {
                let n = want.data.len();
                let data: Vec<f64> = reversed.by_ref().take(n).collect();
                let permuted =
                    Tensor { name: want.name.clone(), shape: want.shape.clone(), data: TensorData::F64(data) };
                let as_f64 = Tensor {
                    name: want.name.clone(),
                    shape: want.shape.clone(),
                    data: TensorData::F64(want.data.to_f64().unwrap_or_default()),
                };
                if compare(&permuted, &as_f64, &self.tolerance).is_err() {
                    all_pass = false;
                    break;
                }
            }
            if all_pass {
                return Err(format!(
                    "the tolerance of output '{}' also accepts its expected values in reverse order: it cannot tell \
                     the model's answers from unrelated ones of the same scale (give the output its kind: \
                     scripts/make-golden.py --kind)",
                    out.name
                ));
            }
        }
        Ok(())
    }
}

/// Compares one output with its expected value (as the tolerance says for that output);
/// returns the largest absolute error.
pub fn compare(have: &Tensor, want: &Tensor, tol: &Tolerance) -> Result<f64, String> {
    if have.shape != want.shape {
        return Err(format!("shape {:?}, expected {:?}", have.shape, want.shape));
    }
    let float = matches!(want.data, TensorData::F16(_) | TensorData::F32(_) | TensorData::F64(_));
    let check = tol.check_for(&want.name, float);
    let exact = check.exact;
    if let (TensorData::Bytes(a), TensorData::Bytes(b)) = (&have.data, &want.data) {
        return if a == b { Ok(0.0) } else { Err("bytes differ".into()) };
    }
    let (Some(a), Some(b)) = (have.data.to_f64(), want.data.to_f64()) else {
        return Err(format!("datatype {}, expected {}", have.datatype(), want.datatype()));
    };
    let mut max_err = 0.0f64;
    for (idx, (x, y)) in a.iter().zip(&b).enumerate() {
        if x.is_nan() && y.is_nan() {
            continue;
        }
        let err = (x - y).abs();
        if exact || check.elementwise {
            let limit = if exact { 0.0 } else { check.atol + check.rtol * y.abs() };
            if err.is_nan() || err > limit {
                return Err(format!("element {idx} is {x}, expected {y} (tolerance {limit:e})"));
            }
        }
        max_err = max_err.max(err);
    }
    if let (Some(min), false) = (check.cosine_min, exact) {
        let width = have.shape.last().copied().unwrap_or(1).max(1);
        for (row, (x, y)) in a.chunks(width).zip(b.chunks(width)).enumerate() {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let nx = x.iter().map(|p| p * p).sum::<f64>().sqrt();
            let ny = y.iter().map(|q| q * q).sum::<f64>().sqrt();
            let cos = if nx == 0.0 && ny == 0.0 { 1.0 } else { dot / (nx * ny).max(f64::MIN_POSITIVE) };
            if cos.is_nan() || cos < min {
                return Err(format!("row {row} has cosine similarity {cos:.4} with the expected row, below {min}"));
            }
        }
    }
    Ok(max_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(tolerance: &str, outputs: &[&str]) -> Golden {
        let cases: Vec<String> = outputs.iter().map(|o| format!(r#"{{"inputs": [], "outputs": [{o}]}}"#)).collect();
        Golden::parse(format!(r#"{{"tolerance": {tolerance}, "cases": [{}]}}"#, cases.join(",")).as_bytes())
            .expect("golden")
    }

    const PROBS: [&str; 3] = [
        r#"{"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.9]}"#,
        r#"{"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.7, 0.3]}"#,
        r#"{"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.45, 0.55]}"#,
    ];

    #[test]
    fn a_tolerance_that_accepts_the_outputs_permuted_is_refused() {
        assert!(golden(r#"{"atol": 1e-3}"#, &PROBS).tolerances_discriminate().is_ok());
        let e = golden(r#"{"atol": 0.9}"#, &PROBS).tolerances_discriminate().unwrap_err();
        assert!(e.contains("output 'p'"), "{e}");
        // Labels are exact whatever the tolerance says.
        let labels = golden(
            r#"{"atol": 100, "outputs": {"l": {"kind": "label"}}}"#,
            &[r#"{"name": "l", "datatype": "FP32", "shape": [2], "data": [1, 2]}"#],
        );
        assert!(labels.tolerances_discriminate().is_ok());
    }

    #[test]
    fn each_output_is_checked_by_its_kind() {
        let t: Tolerance = serde_json::from_str(
            r#"{"atol": 0.5, "outputs": {"e": {"kind": "embedding"}, "l": {"kind": "label"}, "r": {"kind": "regression", "atol": 0}}}"#,
        )
        .unwrap();
        let tensor = |name: &str, data: Vec<f32>| Tensor {
            name: name.into(),
            shape: vec![1, data.len()],
            data: TensorData::F32(data),
        };
        // An embedding: direction counts, not the absolute error.
        assert!(compare(&tensor("e", vec![2.0, 4.0, 6.0]), &tensor("e", vec![1.0, 2.0, 3.0]), &t).is_ok());
        assert!(compare(&tensor("e", vec![3.0, 2.0, 1.0]), &tensor("e", vec![1.0, 2.0, 3.0]), &t).is_err());
        // A label: exact, even in floats and with a loose absolute tolerance.
        assert!(compare(&tensor("l", vec![1.0]), &tensor("l", vec![1.0]), &t).is_ok());
        assert!(compare(&tensor("l", vec![1.1]), &tensor("l", vec![1.0]), &t).is_err());
        // Regression: relative.
        assert!(compare(&tensor("r", vec![1000.5]), &tensor("r", vec![1000.0]), &t).is_ok());
        assert!(compare(&tensor("r", vec![1.5]), &tensor("r", vec![1.0]), &t).is_err());
        // Unnamed outputs: the file-wide tolerance.
        assert!(compare(&tensor("x", vec![1.4]), &tensor("x", vec![1.0]), &t).is_ok());
    }
}
