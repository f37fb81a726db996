//! Golden vectors: sample inputs with the outputs an independent runtime (ONNX Runtime)
//! computed. A model must reproduce them within tolerance before it serves.

use serde::Deserialize;
use serde_json::Value;

use super::model::LoadedModel;
use crate::protocol::json::tensors_from_value;
use crate::protocol::{Tensor, TensorData};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
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
                let err = compare(have, want, self.tolerance)
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
                    compare(have, want, self.tolerance).map_err(|e| {
                        format!("output '{}' of a row changes with the rows it shares a run with ({e})", want.name)
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Compares one output with its expected value; returns the largest absolute error.
pub fn compare(have: &Tensor, want: &Tensor, tol: Tolerance) -> Result<f64, String> {
    if have.shape != want.shape {
        return Err(format!("shape {:?}, expected {:?}", have.shape, want.shape));
    }
    let exact = !matches!(want.data, TensorData::F16(_) | TensorData::F32(_) | TensorData::F64(_));
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
        let limit = if exact { 0.0 } else { tol.atol + tol.rtol * y.abs() };
        if err.is_nan() || err > limit {
            return Err(format!("element {idx} is {x}, expected {y} (tolerance {limit:e})"));
        }
        max_err = max_err.max(err);
    }
    if let (Some(min), false) = (tol.cosine_min, exact) {
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
