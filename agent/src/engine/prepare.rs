//! Model preparation, off the request path: load, reproduce the golden vectors, choose the
//! fastest plan that reproduces them (quantized models), decide on batching, warm up. The
//! caller hands in the bytes; a failure is a [`LoadError`] and nothing is served from it.

use std::time::{Duration, Instant};

use super::rewrite::{self, Candidate, Variant};
use super::{BatchPolicy, Golden, LoadError, LoadedModel};

/// What preparation needs of a model's configuration, for a model of a given size.
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Optimized plans kept, one per concrete input shape.
    pub plan_cache: usize,
    /// Float inputs may hold NaN or infinities.
    pub allow_non_finite: bool,
    /// Dynamic batching as it will run (batch sizes already chosen for the model's size).
    pub batch: Option<BatchPolicy>,
}

/// What a successful preparation measured.
#[derive(Debug)]
pub struct Prepared {
    pub model: LoadedModel,
    pub detail: String,
    /// Size of the ONNX file (how runs are sized: `ModelConfig::serve_options`).
    pub bytes: usize,
}

/// Runs of the first golden case timed per candidate, and the time they may take.
const TIMED_RUNS: usize = 25;
const TIMING_BUDGET: Duration = Duration::from_millis(300);
/// A rewrite must beat the published graph by this factor to replace it.
const REWRITE_MARGIN: f64 = 0.95;
/// A candidate whose first run is this many times slower than the fastest passing plan is
/// rejected without its golden check.
const SLOWER_SKIP: u32 = 3;

/// The median of up to `runs` timed runs of the first golden case (at least 3 when `runs`
/// allows, then as many as fit in the timing budget), after one untimed run that builds the plan.
fn median_run(model: &LoadedModel, golden: &Golden, runs: usize) -> Result<Duration, String> {
    let case = golden.cases.first().ok_or("golden file has no cases")?;
    let inputs = model.validate(case.inputs.clone()).map_err(|e| e.to_string())?;
    model.run(inputs.clone()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut times = Vec::with_capacity(runs);
    while times.len() < runs.max(1) && (times.len() < 3 || started.elapsed() < TIMING_BUDGET) {
        let t = Instant::now();
        model.run(inputs.clone()).map_err(|e| e.to_string())?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

/// Loads a model and checks its golden vectors. For a quantized model, every candidate graph
/// (see [`super::rewrite`]) is loaded, checked and timed, and the fastest that
/// reproduces the golden vectors is kept; none passing refuses the model. Blocking: run on a
/// blocking thread.
pub fn prepare(onnx: &[u8], golden: Option<&[u8]>, opts: &PrepareOptions) -> Result<Prepared, LoadError> {
    let started = Instant::now();
    let proto = LoadedModel::parse(onnx)?;
    let golden = golden.map(|g| Golden::parse(g).map_err(LoadError::Golden)).transpose()?;
    let (mut model, mut detail) = match &golden {
        Some(golden) if rewrite::is_quantized(&proto) => choose(&proto, golden, opts, started)?,
        Some(golden) => {
            let model = LoadedModel::load_proto(&proto, Variant::Published, opts.plan_cache)?;
            let report = golden.check(&model).map_err(LoadError::Golden)?;
            let detail = format!(
                "golden vectors reproduced: {} cases, max abs error {:.2e} (tolerance {:e}); loaded in {} ms",
                report.cases,
                report.max_abs_error,
                golden.tolerance.atol,
                started.elapsed().as_millis()
            );
            (model, detail)
        }
        None => {
            let model = LoadedModel::load_proto(&proto, Variant::Published, opts.plan_cache)?;
            (model, format!("no golden vectors; loaded in {} ms", started.elapsed().as_millis()))
        }
    };
    if let Some(golden) =
        golden.as_ref().filter(|_| onnx.len() >= super::model::LARGE_MODEL_BYTES && model.symbol_count() > 0)
    {
        detail.push_str(&consider_symbolic(&model, golden));
    }
    model.allow_non_finite = opts.allow_non_finite;
    // Batching joins callers' rows in one run: only for models whose rows are independent.
    if let (Some(golden), Some(policy)) = (&golden, &opts.batch) {
        if policy.max_batch > 1 && model.batch_axis() {
            if let Err(why) = golden.rows_independent(&model) {
                detail.push_str(&format!("; batching off: {why}"));
                model.rows_depend = Some(why);
            }
        }
    }
    warm(&model, opts)?;
    Ok(Prepared { model, detail, bytes: onnx.len() })
}

/// The symbolic plan is kept when at most this much slower than a concrete one, for a model
/// whose only dynamic dimension is the batch: its concrete plans are few (one per batch size
/// it runs at) and built at load.
const SYMBOLIC_SLACK: f64 = 1.10;

/// As [`SYMBOLIC_SLACK`], for a model with another dynamic dimension (a sequence length):
/// concrete plans would follow the lengths traffic brings, each built while requests wait (a
/// MiniLM plan: about a second of a core) and each holding its own packed copy of the weights
/// (MiniLM: ~45 MB), evicted and rebuilt once more lengths than `plan_cache` are in use. Where
/// the two run about equally fast (MiniLM; BENCHMARKS.md, engine), a narrow margin would let
/// the load-time timing decide by chance from one start to the next.
const SYMBOLIC_SLACK_FREE_DIMS: f64 = 1.5;

/// Whether a symbolic plan timed at `symbolic` is kept over concrete plans timed at `concrete`.
fn keeps_symbolic(symbolic: Duration, concrete: Duration, free_dimension: bool) -> bool {
    let slack = if free_dimension { SYMBOLIC_SLACK_FREE_DIMS } else { SYMBOLIC_SLACK };
    symbolic.as_secs_f64() <= concrete.as_secs_f64() * slack
}

/// Large models: one plan with symbolic dimensions instead of one per batch size and sequence
/// length (each holds its own packed copy of the weights), kept only when it reproduces the
/// golden vectors and runs within 10 % of a concrete plan (50 % with a dynamic dimension besides
/// the batch: [`SYMBOLIC_SLACK_FREE_DIMS`]). tract's symbolic plans are as fast as concrete
/// ones on transformers and several times slower on convolutions.
fn consider_symbolic(model: &LoadedModel, golden: &Golden) -> String {
    let Ok(concrete) = median_run(model, golden, TIMED_RUNS) else { return String::new() };
    match model.set_symbolic(true) {
        Ok(true) => {}
        Ok(false) => return String::new(),
        Err(e) => return format!("; concrete plans per shape ({e})"),
    }
    let verdict = golden.check(model).map_err(|e| format!("golden vectors: {e}")).and_then(|_| {
        let t = median_run(model, golden, TIMED_RUNS)?;
        if keeps_symbolic(t, concrete, model.signature.has_free_dimension()) {
            Ok(t)
        } else {
            Err(format!("{} µs vs {} µs concrete", t.as_micros(), concrete.as_micros()))
        }
    });
    match verdict {
        Ok(t) => {
            tracing::info!(
                symbolic_us = t.as_micros() as u64,
                concrete_us = concrete.as_micros() as u64,
                "one symbolic plan for every shape"
            );
            format!(
                "; one symbolic plan for every shape ({} µs vs {} µs concrete)",
                t.as_micros(),
                concrete.as_micros()
            )
        }
        Err(why) => {
            let _ = model.set_symbolic(false);
            format!("; concrete plans per shape (symbolic plan: {why})")
        }
    }
}

/// Builds the plans traffic will need, before it arrives: batch 1, each preferred batch size,
/// then every other size a batch can run at up to `max_batch` (as the batch sizes in effect
/// round them up), as many as the plan cache keeps. A plan built under traffic holds a core
/// for the build while the requests of that size wait: the first seconds of batched traffic
/// had a p99 twice the later one (BENCHMARKS.md).
fn warm(model: &LoadedModel, opts: &PrepareOptions) -> Result<(), LoadError> {
    let mut sizes = vec![1];
    if let Some(b) = opts.batch.clone().filter(|_| model.batch_axis() && model.symbol_count() == 1) {
        let wanted = std::iter::once(1).chain(b.preferred.iter().copied()).chain(2..=b.max_batch);
        let room = opts.plan_cache.max(1);
        sizes.clear();
        for n in wanted.map(|n| b.run_rows(n)) {
            if sizes.len() == room {
                break;
            }
            if !sizes.contains(&n) {
                sizes.push(n);
            }
        }
    }
    if model.symbol_count() == 0 {
        return model.prepare(&[]).map_err(|e| LoadError::Parse(e.to_string()));
    }
    if model.symbol_count() == 1 {
        for n in sizes {
            model.prepare(&[n]).map_err(|e| LoadError::Parse(e.to_string()))?;
        }
    }
    Ok(())
}

/// The plan chooser: the fastest candidate that reproduces the golden vectors.
fn choose(
    proto: &tract_onnx::pb::ModelProto,
    golden: &Golden,
    opts: &PrepareOptions,
    started: Instant,
) -> Result<(LoadedModel, String), LoadError> {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut best: Option<(LoadedModel, Duration, super::GoldenReport)> = None;
    let mut first_error: Option<LoadError> = None;
    // Rewrites first, the published graph last: a candidate whose first run is far slower than
    // the fastest passing one is not worth its golden check (tract's integer kernels can be
    // 25x slower than the float rewrite).
    let mut variants: Vec<(Variant, Option<tract_onnx::pb::ModelProto>)> =
        rewrite::variants(proto).into_iter().map(|(v, p)| (v, Some(p))).collect();
    variants.push((Variant::Published, None));
    for (variant, rewritten) in variants {
        let loaded = LoadedModel::load_proto(rewritten.as_ref().unwrap_or(proto), variant, opts.plan_cache);
        let checked = loaded.and_then(|m| {
            if let Some((_, fastest, _)) = &best {
                let first = median_run(&m, golden, 1).map_err(LoadError::Golden)?;
                if first > *fastest * SLOWER_SKIP {
                    return Err(LoadError::Slower(format!(
                        "one run took {} µs, over {SLOWER_SKIP}x the fastest passing plan ({} µs)",
                        first.as_micros(),
                        fastest.as_micros()
                    )));
                }
            }
            let report = golden.check(&m).map_err(LoadError::Golden)?;
            let time = median_run(&m, golden, TIMED_RUNS).map_err(LoadError::Golden)?;
            Ok((m, time, report))
        });
        match checked {
            Ok((m, time, report)) => {
                candidates.push(Candidate { variant, outcome: Ok(time) });
                let better = match &best {
                    None => true,
                    // A rewrite must beat the published graph by the margin to replace it.
                    Some(_) if variant == Variant::Published => {
                        best.as_ref().is_some_and(|(_, t, _)| time.as_secs_f64() * REWRITE_MARGIN <= t.as_secs_f64())
                    }
                    Some((_, t, _)) => time < *t,
                };
                if better {
                    best = Some((m, time, report));
                }
            }
            Err(e) => {
                candidates.push(Candidate { variant, outcome: Err(e.to_string()) });
                // The published graph's own failure leads the refusal message.
                if variant == Variant::Published {
                    first_error = Some(e);
                } else {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    // Reported in the publisher's order: the graph as published first.
    candidates.sort_by_key(|c| c.variant != Variant::Published);
    let summary = candidates
        .iter()
        .map(|c| match &c.outcome {
            Ok(t) => format!("{} {} µs", c.variant.as_str(), t.as_micros()),
            Err(e) => format!("{} rejected ({e})", c.variant.as_str()),
        })
        .collect::<Vec<_>>()
        .join("; ");
    match best {
        Some((model, _, report)) => {
            tracing::info!(plan = model.variant.as_str(), candidates = %summary, "plan chosen");
            let detail = format!(
                "golden vectors reproduced: {} cases, max abs error {:.2e} (tolerance {:e}); plan {} chosen of: {summary}; loaded in {} ms",
                report.cases,
                report.max_abs_error,
                golden.tolerance.atol,
                model.variant.as_str(),
                started.elapsed().as_millis()
            );
            let mut model = model;
            model.candidates = candidates;
            Ok((model, detail))
        }
        None => Err(match first_error {
            Some(LoadError::Golden(m)) if candidates.len() > 1 => {
                LoadError::Golden(format!("{m} (no candidate plan passes: {summary})"))
            }
            Some(e) => e,
            None => LoadError::Golden(format!("no candidate plan passes: {summary}")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_with_a_sequence_dimension_keeps_its_symbolic_plan_at_a_wider_margin() {
        let ms = Duration::from_millis;
        // Batch only: concrete plans are few and built at load, so 10 % decides.
        assert!(keeps_symbolic(ms(109), ms(100), false));
        assert!(!keeps_symbolic(ms(115), ms(100), false));
        // A sequence length as well: a load-time timing 17 % apart still keeps one plan.
        assert!(keeps_symbolic(ms(117), ms(100), true));
        assert!(keeps_symbolic(ms(150), ms(100), true));
        // Several times slower (convolutions with a symbolic size) still goes concrete.
        assert!(!keeps_symbolic(ms(151), ms(100), true));
        assert!(!keeps_symbolic(ms(700), ms(100), true));
    }
}
