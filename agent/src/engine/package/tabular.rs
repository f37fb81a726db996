//! Named fields in, a feature vector out: a JSON object (`{"field": number, ...}`) or a CSV
//! line (the values in field order), each value scaled as declared.

use outpost_proto::registry::package::TabularStep;
use serde_json::Value;

use crate::protocol::{Tensor, TensorData};

/// Most fields a step may declare.
const MAX_FIELDS: usize = 4096;
/// Largest row accepted, in bytes.
const MAX_ROW_BYTES: usize = 256 << 10;

pub(super) struct Tabular {
    step: TabularStep,
}

impl Tabular {
    pub(super) fn build(step: &TabularStep) -> Result<Tabular, String> {
        if step.fields.is_empty() || step.fields.len() > MAX_FIELDS {
            return Err(format!("tabular step: 1-{MAX_FIELDS} fields"));
        }
        for (i, f) in step.fields.iter().enumerate() {
            if step.fields[..i].iter().any(|g| g.name == f.name) {
                return Err(format!("tabular step: field '{}' twice", f.name));
            }
            if !(f.std.is_finite() && f.std != 0.0 && f.mean.is_finite()) {
                return Err(format!("tabular step: field '{}' needs a finite mean and a non-zero std", f.name));
            }
        }
        Ok(Tabular { step: step.clone() })
    }

    pub(super) fn output(&self) -> &str {
        &self.step.output
    }

    pub(super) fn input(&self) -> &str {
        &self.step.input
    }

    /// `[n]` rows to FP32 `[n, fields]`.
    pub(super) fn run(&self, t: &Tensor) -> Result<Tensor, String> {
        let rows = super::items(t, "rows of named fields")?;
        let width = self.step.fields.len();
        let mut out = Vec::with_capacity(rows.len() * width);
        for (i, row) in rows.iter().enumerate() {
            let values = self.row(row).map_err(|e| format!("input '{}' row {i}: {e}", t.name))?;
            out.extend(values);
        }
        Ok(Tensor { name: self.step.output.clone(), shape: vec![rows.len(), width], data: TensorData::F32(out) })
    }

    fn row(&self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        if bytes.len() > MAX_ROW_BYTES {
            return Err(format!("{} bytes; at most {MAX_ROW_BYTES}", bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?.trim();
        let raw: Vec<Option<f64>> = if text.starts_with('{') {
            let obj: serde_json::Map<String, Value> =
                serde_json::from_str(text).map_err(|e| format!("not a JSON object of fields: {e}"))?;
            if let Some(unknown) = obj.keys().find(|k| !self.step.fields.iter().any(|f| &f.name == *k)) {
                return Err(format!("unknown field '{}'", unknown.chars().take(128).collect::<String>()));
            }
            self.step
                .fields
                .iter()
                .map(|f| match obj.get(&f.name) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("field '{}' is not a number", f.name)),
                })
                .collect::<Result<_, String>>()?
        } else {
            let cells: Vec<&str> = text.split(',').collect();
            if cells.len() != self.step.fields.len() {
                return Err(format!("a CSV line of {} values; the fields are {}", cells.len(), self.step.fields.len()));
            }
            cells
                .iter()
                .zip(&self.step.fields)
                .map(|(c, f)| match c.trim() {
                    "" => Ok(None),
                    s => s.parse::<f64>().map(Some).map_err(|_| format!("field '{}' is not a number", f.name)),
                })
                .collect::<Result<_, String>>()?
        };
        raw.into_iter()
            .zip(&self.step.fields)
            .map(|(v, f)| {
                let x = match (v, f.default) {
                    (Some(x), _) => x as f32,
                    (None, Some(d)) => d,
                    (None, None) => return Err(format!("field '{}' is missing", f.name)),
                };
                if !x.is_finite() {
                    return Err(format!("field '{}' is not a finite number", f.name));
                }
                Ok((x - f.mean) / f.std)
            })
            .collect()
    }
}
