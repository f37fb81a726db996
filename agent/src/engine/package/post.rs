//! Post-processing of model outputs: softmax, top-k with labels, thresholds.

use outpost_proto::registry::package::PostStep;

use crate::protocol::{Tensor, TensorData};

/// Largest labels file, in labels.
const MAX_LABELS: usize = 1 << 16;

pub(super) enum Post {
    Softmax { output: String },
    TopK { output: String, k: usize, labels: Vec<String>, labels_output: String, scores_output: String },
    Threshold { output: String, threshold: f32, name: String },
}

/// The model output a step reads, as FP32 rows of its last axis.
fn rows<'a>(outputs: &'a [Tensor], name: &str) -> Result<(&'a [f32], usize, &'a [usize]), String> {
    let t = outputs.iter().find(|t| t.name == name).ok_or_else(|| format!("no output '{name}' to process"))?;
    let TensorData::F32(v) = &t.data else {
        return Err(format!("output '{name}' is {}, processing takes FP32", t.datatype()));
    };
    let width = t.shape.last().copied().unwrap_or(1).max(1);
    Ok((v, width, &t.shape))
}

impl Post {
    pub(super) fn build(step: &PostStep, file: &dyn Fn(&str) -> Result<Vec<u8>, String>) -> Result<Post, String> {
        Ok(match step {
            PostStep::Softmax { output } => Post::Softmax { output: output.clone() },
            PostStep::TopK { output, k, labels, labels_output, scores_output } => {
                let text =
                    String::from_utf8(file(labels)?).map_err(|_| format!("labels file '{labels}' is not UTF-8"))?;
                let labels: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_owned()).collect();
                if labels.is_empty() || labels.len() > MAX_LABELS {
                    return Err(format!("labels file holds {} labels; 1-{MAX_LABELS}", labels.len()));
                }
                if *k == 0 || *k > labels.len() {
                    return Err(format!("top_k: k = {k} with {} labels", labels.len()));
                }
                Post::TopK {
                    output: output.clone(),
                    k: *k,
                    labels,
                    labels_output: labels_output.clone(),
                    scores_output: scores_output.clone(),
                }
            }
            PostStep::Threshold { output, threshold, name } => {
                if !threshold.is_finite() {
                    return Err("threshold must be finite".into());
                }
                Post::Threshold { output: output.clone(), threshold: *threshold, name: name.clone() }
            }
        })
    }

    /// The outputs the step adds.
    pub(super) fn adds(&self) -> Vec<&str> {
        match self {
            Post::Softmax { .. } => vec![],
            Post::TopK { labels_output, scores_output, .. } => vec![labels_output, scores_output],
            Post::Threshold { name, .. } => vec![name],
        }
    }

    /// The datatype and shape of an output the step adds (`None`: not one of its own).
    pub(super) fn describes(&self, name: &str) -> Option<(crate::protocol::DataType, Vec<i64>)> {
        use crate::protocol::DataType;
        match self {
            Post::TopK { labels_output, k, .. } if labels_output == name => {
                Some((DataType::Bytes, vec![-1, *k as i64]))
            }
            Post::TopK { scores_output, k, .. } if scores_output == name => Some((DataType::F32, vec![-1, *k as i64])),
            Post::Threshold { name: n, .. } if n == name => Some((DataType::Bool, vec![-1, -1])),
            _ => None,
        }
    }

    pub(super) fn run(&self, outputs: &mut Vec<Tensor>) -> Result<(), String> {
        let put = |outputs: &mut Vec<Tensor>, t: Tensor| match outputs.iter_mut().find(|o| o.name == t.name) {
            Some(o) => *o = t,
            None => outputs.push(t),
        };
        match self {
            Post::Softmax { output } => {
                let (v, width, shape) = rows(outputs, output)?;
                let mut out = Vec::with_capacity(v.len());
                for row in v.chunks(width) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let exps: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
                    let sum: f32 = exps.iter().sum();
                    out.extend(exps.iter().map(|e| e / sum));
                }
                let t = Tensor { name: output.clone(), shape: shape.to_vec(), data: TensorData::F32(out) };
                put(outputs, t);
            }
            Post::TopK { output, k, labels, labels_output, scores_output } => {
                let (v, width, shape) = rows(outputs, output)?;
                let k = (*k).min(width);
                let n = v.len() / width;
                let (mut names, mut scores) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
                for row in v.chunks(width) {
                    let mut idx: Vec<usize> = (0..row.len()).collect();
                    // Best first; ties keep the lower class index first.
                    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                    for &i in idx.iter().take(k) {
                        // A class the labels file does not name is answered by its index.
                        names.push(labels.get(i).cloned().unwrap_or_else(|| i.to_string()).into_bytes());
                        scores.push(row[i]);
                    }
                }
                let mut out_shape = shape[..shape.len().saturating_sub(1)].to_vec();
                out_shape.push(k);
                put(
                    outputs,
                    Tensor { name: labels_output.clone(), shape: out_shape.clone(), data: TensorData::Bytes(names) },
                );
                put(outputs, Tensor { name: scores_output.clone(), shape: out_shape, data: TensorData::F32(scores) });
            }
            Post::Threshold { output, threshold, name } => {
                let (v, _, shape) = rows(outputs, output)?;
                let data = TensorData::Bool(v.iter().map(|x| *x >= *threshold).collect());
                put(outputs, Tensor { name: name.clone(), shape: shape.to_vec(), data });
            }
        }
        Ok(())
    }
}
