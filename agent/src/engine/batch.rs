//! Dynamic batching, as Triton's dynamic batcher: requests queued for one model are joined
//! along the batch axis, run as one, and the outputs split back so each caller gets exactly its
//! own rows. Only for models whose every input and output has the same dynamic first dimension.

use std::time::Duration;

use crate::protocol::Tensor;

/// How a model's queue forms batches (`max_batch`, `max_queue_delay`, `preferred_batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most rows in one run; a request larger than this runs alone.
    pub max_batch: usize,
    /// How long the first request of a batch may wait for company.
    pub max_delay: Duration,
    /// Batch sizes worth dispatching at once, without waiting out the delay, when nothing
    /// more is queued. Ascending, each at most `max_batch`.
    pub preferred: Vec<usize>,
    /// The batch sizes the model runs at (`batch_sizes`): a batch is padded up to the next one,
    /// so only these sizes get an optimized plan (each holds its own packed weights). Ascending;
    /// empty: every size runs as it is.
    pub sizes: Vec<usize>,
}

impl BatchPolicy {
    /// Rows a run of `rows` rows is padded to: the next of `sizes`, else `rows` itself.
    pub fn run_rows(&self, rows: usize) -> usize {
        self.sizes.iter().copied().find(|&s| s >= rows).unwrap_or(rows)
    }

    /// Powers of two up to `max_batch`, and `max_batch`: the sizes for a model whose plans are
    /// costly to keep many of.
    pub fn powers_of_two(max_batch: usize) -> Vec<usize> {
        let mut sizes: Vec<usize> =
            std::iter::successors(Some(1usize), |s| s.checked_mul(2)).take_while(|&s| s < max_batch).collect();
        sizes.push(max_batch);
        sizes
    }
}

/// Rows a request carries: the first dimension of its first input.
pub fn rows(inputs: &[Tensor]) -> usize {
    inputs.first().and_then(|t| t.shape.first()).copied().unwrap_or(1)
}

/// Whether two requests (inputs ordered as the model declares) can share a run: the same
/// inputs with equal dimensions beyond the first.
pub fn compatible(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.datatype() == y.datatype()
                && x.shape.len() == y.shape.len()
                && !x.shape.is_empty()
                && x.shape[1..] == y.shape[1..]
        })
}

/// Joins requests along the first axis. Callers check [`compatible`] first; a mismatch is an
/// error, never a wrong tensor.
pub fn concat(requests: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, String> {
    let mut iter = requests.into_iter();
    let Some(mut joined) = iter.next() else { return Err("empty batch".into()) };
    for request in iter {
        if !compatible(&joined, &request) {
            return Err("requests in one batch disagree on shapes".into());
        }
        for (acc, t) in joined.iter_mut().zip(request) {
            acc.data.append(t.data)?;
            acc.shape[0] += t.shape[0];
        }
    }
    Ok(joined)
}

/// Pads joined inputs with `extra` copies of their last row (the padding's outputs are
/// dropped after the run).
pub fn pad(mut inputs: Vec<Tensor>, extra: usize) -> Result<Vec<Tensor>, String> {
    if extra == 0 {
        return Ok(inputs);
    }
    for t in &mut inputs {
        let rows = t.shape.first().copied().unwrap_or(0);
        let elements = t.data.len();
        if rows == 0 || elements % rows != 0 {
            return Err(format!("input '{}' has {elements} elements for {rows} rows", t.name));
        }
        let last = t.data.split_off(elements - elements / rows);
        for _ in 0..extra {
            t.data.append(last.clone())?;
        }
        t.data.append(last)?;
        t.shape[0] += extra;
    }
    Ok(inputs)
}

/// Splits a batched run's outputs back into one output list per request, `rows[i]` rows for
/// request `i`. Every output must carry the batch on its first axis.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    let total: usize = rows.iter().sum();
    let mut per_request: Vec<Vec<Tensor>> = rows.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for mut out in outputs {
        if out.shape.first() != Some(&total) {
            return Err(format!("output '{}' has shape {:?}, not {total} rows first", out.name, out.shape));
        }
        let elements = out.data.len();
        if total == 0 || elements % total != 0 {
            return Err(format!("output '{}' has {elements} elements for {total} rows", out.name));
        }
        let per_row = elements / total;
        for (i, &r) in rows.iter().enumerate() {
            let rest = out.data.split_off(r * per_row);
            let mine = std::mem::replace(&mut out.data, rest);
            let mut shape = out.shape.clone();
            shape[0] = r;
            per_request[i].push(Tensor { name: out.name.clone(), shape, data: mine });
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    fn t(name: &str, shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor { name: name.into(), shape: shape.to_vec(), data: TensorData::F32(data) }
    }

    #[test]
    fn concat_then_split_gives_each_request_its_rows() {
        let a = vec![t("x", &[1, 2], vec![1.0, 2.0])];
        let b = vec![t("x", &[2, 2], vec![3.0, 4.0, 5.0, 6.0])];
        let joined = concat(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(joined[0].shape, vec![3, 2]);
        let back = split(joined, &[1, 2]).unwrap();
        assert_eq!(back, vec![a, b]);
    }

    #[test]
    fn mismatched_requests_are_refused() {
        let a = vec![t("x", &[1, 2], vec![1.0, 2.0])];
        let b = vec![t("x", &[1, 3], vec![1.0, 2.0, 3.0])];
        assert!(!compatible(&a, &b));
        assert!(concat(vec![a, b]).is_err());
        let out = vec![t("y", &[2, 1], vec![1.0, 2.0])];
        assert!(split(out, &[1, 2]).is_err(), "an output without the batch rows is an error");
    }

    #[test]
    fn padding_repeats_the_last_row_and_sizes_round_up() {
        let joined = vec![t("x", &[2, 2], vec![1.0, 2.0, 3.0, 4.0])];
        let padded = pad(joined.clone(), 2).unwrap();
        assert_eq!(padded, vec![t("x", &[4, 2], vec![1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0])]);
        assert_eq!(pad(joined.clone(), 0).unwrap(), joined);
        assert!(pad(vec![t("x", &[0, 2], vec![])], 1).is_err());
        let policy = BatchPolicy {
            max_batch: 8,
            max_delay: Duration::ZERO,
            preferred: vec![],
            sizes: BatchPolicy::powers_of_two(8),
        };
        assert_eq!(policy.sizes, vec![1, 2, 4, 8]);
        assert_eq!((1..=9).map(|r| policy.run_rows(r)).collect::<Vec<_>>(), vec![1, 2, 4, 4, 8, 8, 8, 8, 9]);
        assert_eq!(BatchPolicy::powers_of_two(6), vec![1, 2, 4, 6]);
        let exact = BatchPolicy { sizes: vec![], ..policy };
        assert_eq!(exact.run_rows(5), 5);
    }
}
