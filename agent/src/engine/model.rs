//! One loaded model: tract load → declutter once, then one optimized plan per concrete set of
//! symbol values (batch size, sequence length), built on first use and kept in a small LRU.
//!
//! Every call into tract runs under `catch_unwind`: a tract panic refuses the model or fails the
//! request, never the process.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::protocol::{DataType, Tensor as V2Tensor, TensorData};

/// How many optimized plans (one per concrete input shape) a model keeps by default.
pub const DEFAULT_PLAN_CACHE: usize = 8;

/// ONNX files at least this large make plans costly to keep many of (each optimized plan holds
/// its own packed copy of the weights): they are tried with one symbolic plan for every shape,
/// and their batched runs are padded to a few sizes (`BatchPolicy::powers_of_two`).
pub const LARGE_MODEL_BYTES: usize = 8 << 20;

/// A dimension of a model input or output.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(usize),
    /// A dynamic dimension, named by its symbol (e.g. `N` for the batch).
    Dynamic(String),
}

#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<Dim>,
}

impl TensorSpec {
    /// The V2 metadata shape: -1 for dynamic dimensions.
    pub fn v2_shape(&self) -> Vec<i64> {
        self.dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(i64::MAX),
                Dim::Dynamic(_) => -1,
            })
            .collect()
    }
}

/// Names, datatypes and shapes of a model's inputs and outputs.
#[derive(Debug, Clone)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl Signature {
    /// True when every input has a dynamic first dimension shared by all of them.
    pub fn batch_symbol(&self) -> Option<&str> {
        let first = match self.inputs.first()?.dims.first()? {
            Dim::Dynamic(s) => s.as_str(),
            Dim::Fixed(_) => return None,
        };
        self.inputs.iter().all(|i| matches!(i.dims.first(), Some(Dim::Dynamic(s)) if s == first)).then_some(first)
    }

    /// Whether an input has a dynamic dimension other than the batch (a sequence length, an
    /// image size): its values come from traffic, not from the batching policy.
    pub fn has_free_dimension(&self) -> bool {
        let batch = self.batch_symbol();
        self.inputs.iter().flat_map(|i| &i.dims).any(|d| matches!(d, Dim::Dynamic(s) if Some(s.as_str()) != batch))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model cannot be read: {0}")]
    Parse(String),
    #[error("operator not supported by the engine: {0}")]
    Unsupported(String),
    #[error("model input or output unsupported: {0}")]
    Signature(String),
    #[error("engine panicked while loading the model: {0}")]
    Panic(String),
    #[error("golden vectors not reproduced: {0}")]
    Golden(String),
    /// A candidate plan left out by the plan chooser for being far slower than another.
    #[error("not checked: {0}")]
    Slower(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("inference failed: {0}")]
    Engine(String),
}

struct PlanCache {
    tick: u64,
    plans: Vec<(Vec<usize>, Arc<TypedRunnableModel>, u64)>,
    /// Plans built since load.
    built: u64,
}

pub struct LoadedModel {
    pub signature: Signature,
    /// Which variant of the graph runs (see [`super::rewrite`]); `as-published` unless a
    /// quantized model's rewrite was faster and reproduced the golden vectors.
    pub variant: super::rewrite::Variant,
    /// Every candidate the plan chooser tried (empty for models it had no choice for).
    pub candidates: Vec<super::rewrite::Candidate>,
    typed: TypedModel,
    symbols: Vec<Symbol>,
    plans: Mutex<PlanCache>,
    plan_capacity: usize,
    /// One plan optimized with the dynamic dimensions left symbolic, used for every shape when
    /// the loader found it as fast as a concrete plan (transformers): one copy of the packed
    /// weights instead of one per batch size.
    symbolic: std::sync::RwLock<Option<Arc<TypedRunnableModel>>>,
    /// Inputs used as indices into a table of known size (an embedding's `Gather`): their
    /// values are checked before a run, since the engine does not bound-check them.
    index_bounds: Vec<(String, i64)>,
    /// Whether float inputs may hold NaN or infinities (`models.<name>.allow_non_finite`).
    pub allow_non_finite: bool,
    /// Why rows may not share a run with other callers' rows: the loader found a row's answer
    /// changing with its batch companions (e.g. dynamic quantization scales computed over the
    /// batch). `None`: independent, or not checked.
    pub rows_depend: Option<String>,
}

/// Graph inputs used directly (or through a `Cast`) as the indices of a `Gather` whose table is
/// a stored tensor (possibly dequantized): each with the size of the gathered axis.
fn index_bounds(proto: &tract_onnx::pb::ModelProto) -> Vec<(String, i64)> {
    use tract_onnx::pb::{GraphProto, NodeProto};
    fn producer<'g>(graph: &'g GraphProto, name: &str) -> Option<&'g NodeProto> {
        graph.node.iter().find(|n| n.output.iter().any(|o| o == name))
    }
    // The graph input a value comes from, through casts.
    fn source_input<'g>(graph: &'g GraphProto, mut name: &'g str) -> Option<&'g str> {
        for _ in 0..8 {
            let is_input = graph.input.iter().any(|i| i.name == name);
            if is_input && !graph.initializer.iter().any(|t| t.name == name) {
                return Some(name);
            }
            let n = producer(graph, name).filter(|n| matches!(n.op_type.as_str(), "Cast" | "Identity"))?;
            name = n.input.first()?;
        }
        None
    }
    // The dimensions of a stored table, through dequantization and casts.
    fn table_dims<'g>(graph: &'g GraphProto, mut name: &'g str) -> Option<&'g [i64]> {
        for _ in 0..8 {
            if let Some(t) = graph.initializer.iter().find(|t| t.name == name) {
                return Some(&t.dims);
            }
            let n = producer(graph, name)?;
            match n.op_type.as_str() {
                "DequantizeLinear" | "Cast" | "Identity" => name = n.input.first()?,
                "Constant" => {
                    let value = n.attribute.iter().find(|a| a.name == "value")?;
                    return value.t.as_ref().map(|t| t.dims.as_slice());
                }
                _ => return None,
            }
        }
        None
    }
    let Some(graph) = &proto.graph else { return Vec::new() };
    let mut out: Vec<(String, i64)> = Vec::new();
    for n in graph.node.iter().filter(|n| n.op_type == "Gather" && n.input.len() == 2) {
        let (Some(input), Some(dims)) = (source_input(graph, &n.input[1]), table_dims(graph, &n.input[0])) else {
            continue;
        };
        let axis = n.attribute.iter().find(|a| a.name == "axis").map_or(0, |a| a.i);
        let axis = if axis < 0 { axis + dims.len() as i64 } else { axis };
        let Some(&size) = usize::try_from(axis).ok().and_then(|a| dims.get(a)) else { continue };
        match out.iter_mut().find(|(name, _)| name == input) {
            Some((_, bound)) => *bound = (*bound).min(size),
            None => out.push((input.to_owned(), size)),
        }
    }
    out
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("signature", &self.signature).finish_non_exhaustive()
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

fn datatype_of(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::String => DataType::Bytes,
        // Integer results computed from shapes (e.g. a label from ArgMax) come out as TDim;
        // they are converted to INT64 on the way out.
        DatumType::TDim => DataType::I64,
        _ => return None,
    })
}

/// Classifies a tract error chain: an unknown operator becomes `Unsupported` with its name.
fn classify(e: TractError) -> LoadError {
    let full = format!("{e:?}");
    for line in full.lines() {
        if let Some(pos) = line.find("Unimplemented(") {
            let rest = &line[pos + "Unimplemented(".len()..];
            let op = rest.split(')').next().unwrap_or(rest);
            return LoadError::Unsupported(op.to_owned());
        }
    }
    let short = format!("{e:#}");
    if let Some(pos) = short.find("Unimplemented(") {
        let rest = &short[pos + "Unimplemented(".len()..];
        return LoadError::Unsupported(rest.split(')').next().unwrap_or(rest).to_owned());
    }
    LoadError::Parse(first_line(&short, 400))
}

/// The first line of an engine message, cut to `max` characters (tract's errors can embed
/// whole graph dumps).
fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

impl LoadedModel {
    /// Parses and declutters an ONNX model. Blocking; call off the async workers.
    pub fn load(onnx: &[u8], plan_capacity: usize) -> Result<LoadedModel, LoadError> {
        let proto = Self::parse(onnx)?;
        Self::load_proto(&proto, super::rewrite::Variant::Published, plan_capacity)
    }

    /// Decodes the ONNX protobuf (no tract graph yet).
    pub fn parse(onnx: &[u8]) -> Result<tract_onnx::pb::ModelProto, LoadError> {
        match catch_unwind(AssertUnwindSafe(|| tract_onnx::onnx().proto_model_for_read(&mut &onnx[..]))) {
            Ok(r) => r.map_err(classify),
            Err(p) => Err(LoadError::Panic(panic_message(p))),
        }
    }

    /// Loads a decoded model (as published, or a rewritten variant of it).
    pub fn load_proto(
        proto: &tract_onnx::pb::ModelProto,
        variant: super::rewrite::Variant,
        plan_capacity: usize,
    ) -> Result<LoadedModel, LoadError> {
        match catch_unwind(AssertUnwindSafe(|| Self::load_inner(proto, variant, plan_capacity))) {
            Ok(r) => r,
            Err(p) => Err(LoadError::Panic(panic_message(p))),
        }
    }

    fn load_inner(
        proto: &tract_onnx::pb::ModelProto,
        variant: super::rewrite::Variant,
        plan_capacity: usize,
    ) -> Result<LoadedModel, LoadError> {
        let mut model =
            tract_onnx::onnx().with_ignore_value_info(true).model_for_proto_model(proto).map_err(classify)?;
        let mut inputs = Vec::new();
        let mut symbols: Vec<Symbol> = Vec::new();
        let input_outlets = model.input_outlets().map_err(classify)?.to_vec();
        for (i, outlet) in input_outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let fact = model.input_fact(i).map_err(classify)?.clone();
            let dt = fact
                .datum_type
                .concretize()
                .ok_or_else(|| LoadError::Signature(format!("input '{name}' declares no type")))?;
            let datatype = datatype_of(dt)
                .ok_or_else(|| LoadError::Signature(format!("input '{name}' has unsupported type {dt:?}")))?;
            if fact.shape.is_open() {
                return Err(LoadError::Signature(format!("input '{name}' declares no rank")));
            }
            let mut dims = Vec::new();
            let mut tdims = Vec::new();
            for (j, d) in fact.shape.dims().enumerate() {
                let (dim, td) = match d.concretize() {
                    Some(TDim::Val(v)) if v >= 0 => {
                        let v = v as usize;
                        (Dim::Fixed(v), TDim::Val(v as i64))
                    }
                    Some(TDim::Sym(s)) => (Dim::Dynamic(format!("{s}")), TDim::Sym(s)),
                    _ => {
                        let label = if j == 0 { "N".to_owned() } else { format!("{name}_{j}") };
                        let s = model.sym(&label);
                        (Dim::Dynamic(label), TDim::Sym(s))
                    }
                };
                if let TDim::Sym(s) = &td {
                    if !symbols.contains(s) {
                        symbols.push(s.clone());
                    }
                }
                dims.push(dim);
                tdims.push(td);
            }
            model.set_input_fact(i, InferenceFact::dt_shape(dt, tdims)).map_err(classify)?;
            inputs.push(TensorSpec { name, datatype, dims });
        }
        let output_outlets = model.output_outlets().map_err(classify)?.to_vec();
        let output_names: Vec<String> = output_outlets
            .iter()
            .map(|o| model.outlet_label(*o).map(str::to_owned).unwrap_or_else(|| model.node(o.node).name.clone()))
            .collect();
        let typed = model.into_typed().map_err(classify)?.into_decluttered().map_err(classify)?;
        let mut outputs = Vec::new();
        for (i, name) in output_names.into_iter().enumerate() {
            let fact = typed.output_fact(i).map_err(classify)?;
            let datatype = datatype_of(fact.datum_type).ok_or_else(|| {
                LoadError::Signature(format!("output '{name}' has unsupported type {:?}", fact.datum_type))
            })?;
            let dims = fact
                .shape
                .iter()
                .map(|d| match d.to_i64() {
                    Ok(v) if v >= 0 => Dim::Fixed(v as usize),
                    _ => Dim::Dynamic(format!("{d}")),
                })
                .collect();
            outputs.push(TensorSpec { name, datatype, dims });
        }
        Ok(LoadedModel {
            signature: Signature { inputs, outputs },
            variant,
            candidates: Vec::new(),
            typed,
            symbols,
            plans: Mutex::new(PlanCache { tick: 0, plans: Vec::new(), built: 0 }),
            plan_capacity: plan_capacity.max(1),
            symbolic: std::sync::RwLock::new(None),
            index_bounds: index_bounds(proto),
            allow_non_finite: false,
            rows_depend: None,
        })
    }

    /// Checks inputs against the signature and orders them as the model declares.
    pub fn validate(&self, mut inputs: Vec<V2Tensor>) -> Result<Vec<V2Tensor>, RunError> {
        let bad = |m: String| Err(RunError::InvalidInput(m));
        if inputs.len() != self.signature.inputs.len() {
            let want: Vec<&str> = self.signature.inputs.iter().map(|s| s.name.as_str()).collect();
            return bad(format!("expected {} inputs {:?}, got {}", want.len(), want, inputs.len()));
        }
        let mut ordered = Vec::with_capacity(inputs.len());
        let mut bound: HashMap<&str, usize> = HashMap::new();
        for spec in &self.signature.inputs {
            let Some(pos) = inputs.iter().position(|t| t.name == spec.name) else {
                let got: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
                return bad(format!("missing input '{}' (got {:?})", spec.name, got));
            };
            let t = inputs.swap_remove(pos);
            if t.datatype() != spec.datatype {
                return bad(format!("input '{}' must be {}, got {}", spec.name, spec.datatype, t.datatype()));
            }
            if t.shape.len() != spec.dims.len() {
                return bad(format!(
                    "input '{}' must have rank {} (shape {:?}), got shape {:?}",
                    spec.name,
                    spec.dims.len(),
                    spec.v2_shape(),
                    t.shape
                ));
            }
            for (axis, (d, &got)) in spec.dims.iter().zip(&t.shape).enumerate() {
                match d {
                    Dim::Fixed(n) if *n != got => {
                        return bad(format!(
                            "input '{}' dimension {axis} must be {n} (shape {:?}), got shape {:?}",
                            spec.name,
                            spec.v2_shape(),
                            t.shape
                        ))
                    }
                    Dim::Dynamic(sym) => {
                        if got == 0 {
                            return bad(format!("input '{}' dimension {axis} must not be 0", spec.name));
                        }
                        if let Some(&prev) = bound.get(sym.as_str()) {
                            if prev != got {
                                return bad(format!(
                                    "input '{}' dimension {axis} is {got} but another input set {sym} = {prev}",
                                    spec.name
                                ));
                            }
                        } else {
                            bound.insert(sym.as_str(), got);
                        }
                    }
                    Dim::Fixed(_) => {}
                }
            }
            if Some(t.data.len()) != V2Tensor::shape_elements(&t.shape) {
                return bad(format!("input '{}' data does not match its shape {:?}", spec.name, t.shape));
            }
            if !self.allow_non_finite {
                if let Some(i) = t.data.first_non_finite() {
                    return bad(format!(
                        "input '{}' element {i} is not a finite number (NaN or infinite); this model does not \
                         accept them (models.<name>.allow_non_finite)",
                        spec.name
                    ));
                }
            }
            if let Some((_, size)) = self.index_bounds.iter().find(|(name, _)| *name == spec.name) {
                if let Some((i, v)) = t.data.first_outside(0, *size) {
                    return bad(format!(
                        "input '{}' element {i} is {v}: an index into a table of {size}, so it must be in [0, {size})",
                        spec.name
                    ));
                }
            }
            ordered.push(t);
        }
        if let Some(extra) = inputs.first() {
            return bad(format!("unknown input '{}'", extra.name));
        }
        Ok(ordered)
    }

    fn symbol_values(&self, inputs: &[V2Tensor]) -> Vec<usize> {
        self.symbol_values_with_rows(inputs, None)
    }

    /// As [`Self::symbol_values`], with `rows` in place of the inputs' first dimension.
    fn symbol_values_with_rows(&self, inputs: &[V2Tensor], rows: Option<usize>) -> Vec<usize> {
        self.symbols
            .iter()
            .map(|sym| {
                let name = format!("{sym}");
                self.signature
                    .inputs
                    .iter()
                    .zip(inputs)
                    .find_map(|(spec, t)| {
                        spec.dims.iter().position(|d| matches!(d, Dim::Dynamic(s) if *s == name)).map(|axis| match rows
                        {
                            Some(r) if axis == 0 => r,
                            _ => t.shape[axis],
                        })
                    })
                    .unwrap_or(1)
            })
            .collect()
    }

    fn plan(&self, key: &[usize]) -> Result<Arc<TypedRunnableModel>, RunError> {
        if let Some(p) = self.symbolic.read().ok().and_then(|s| s.clone()) {
            return Ok(p);
        }
        {
            let mut cache = self.plans.lock().map_err(|_| RunError::Engine("plan cache poisoned".into()))?;
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(entry) = cache.plans.iter_mut().find(|(k, _, _)| k == key) {
                entry.2 = tick;
                return Ok(entry.1.clone());
            }
        }
        // Built outside the lock: two workers may build the same plan once; both are correct.
        let subs: HashMap<Symbol, TDim> =
            self.symbols.iter().cloned().zip(key.iter().map(|&v| TDim::Val(v as i64))).collect();
        let built = catch_unwind(AssertUnwindSafe(|| -> TractResult<Arc<TypedRunnableModel>> {
            let concrete = if subs.is_empty() { self.typed.clone() } else { self.typed.set_symbols(&subs)? };
            concrete.into_optimized()?.into_runnable()
        }));
        let plan = match built {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(RunError::Engine(format!("cannot build plan for {key:?}: {e:#}"))),
            Err(p) => return Err(RunError::Engine(format!("engine panicked building a plan: {}", panic_message(p)))),
        };
        let mut cache = self.plans.lock().map_err(|_| RunError::Engine("plan cache poisoned".into()))?;
        let tick = cache.tick;
        if cache.plans.len() >= self.plan_capacity {
            if let Some(oldest) = cache.plans.iter().enumerate().min_by_key(|(_, e)| e.2).map(|(i, _)| i) {
                cache.plans.swap_remove(oldest);
            }
        }
        cache.plans.push((key.to_vec(), plan.clone(), tick));
        cache.built += 1;
        Ok(plan)
    }

    /// Whether a run of these (validated) inputs finds its plan built: no plan building on a
    /// thread that must not block for long.
    pub fn has_plan(&self, inputs: &[V2Tensor]) -> bool {
        if self.symbolic() {
            return true;
        }
        self.has_plan_key(&self.symbol_values(inputs))
    }

    /// Whether [`Self::has_plan`] holds for `inputs` joined with others into `rows` rows (the
    /// first dimension of every input).
    pub fn has_plan_for(&self, inputs: &[V2Tensor], rows: usize) -> bool {
        if self.symbolic() {
            return true;
        }
        self.has_plan_key(&self.symbol_values_with_rows(inputs, Some(rows)))
    }

    fn has_plan_key(&self, key: &[usize]) -> bool {
        self.plans.lock().is_ok_and(|c| c.plans.iter().any(|(k, _, _)| k == key))
    }

    /// How many plans were built since load: a run during which this changed paid for a build.
    pub fn plans_built(&self) -> u64 {
        self.plans.lock().map_or(0, |c| c.built)
    }

    /// The symbol values (batch size first) of the optimized plans kept now, in order.
    pub fn plan_shapes(&self) -> Vec<Vec<usize>> {
        let mut shapes: Vec<Vec<usize>> =
            self.plans.lock().map(|c| c.plans.iter().map(|(k, _, _)| k.clone()).collect()).unwrap_or_default();
        shapes.sort();
        shapes
    }

    /// Switches to one plan with symbolic dimensions for every shape (dropping the concrete
    /// plans), or back to concrete plans with `false`. Returns whether the symbolic plan is in
    /// use; building it can fail (then nothing changes).
    pub fn set_symbolic(&self, on: bool) -> Result<bool, RunError> {
        if !on || self.symbols.is_empty() {
            if let Ok(mut s) = self.symbolic.write() {
                *s = None;
            }
            return Ok(false);
        }
        let built = catch_unwind(AssertUnwindSafe(|| self.typed.clone().into_optimized()?.into_runnable()));
        let plan = match built {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(RunError::Engine(format!("cannot build a symbolic plan: {e:#}"))),
            Err(p) => return Err(RunError::Engine(format!("engine panicked building a plan: {}", panic_message(p)))),
        };
        if let Ok(mut s) = self.symbolic.write() {
            *s = Some(plan);
        }
        if let Ok(mut c) = self.plans.lock() {
            c.plans.clear();
        }
        Ok(true)
    }

    /// Whether one symbolic plan serves every shape.
    pub fn symbolic(&self) -> bool {
        self.symbolic.read().is_ok_and(|s| s.is_some())
    }

    /// Builds the plan for these symbol values ahead of traffic (e.g. batch 1 at load).
    pub fn prepare(&self, key: &[usize]) -> Result<(), RunError> {
        self.plan(key).map(|_| ())
    }

    /// Whether requests can be batched: every input and output has the same dynamic first
    /// dimension.
    pub fn batch_axis(&self) -> bool {
        let Some(sym) = self.signature.batch_symbol() else { return false };
        !self.signature.outputs.is_empty()
            && self.signature.outputs.iter().all(|o| matches!(o.dims.first(), Some(Dim::Dynamic(s)) if s == sym))
    }

    pub fn symbol_count(&self) -> usize {
        self.symbols.len()
    }

    /// Runs inputs already checked by [`LoadedModel::validate`], on the calling thread.
    /// Blocking and CPU-bound.
    pub fn run(&self, inputs: Vec<V2Tensor>) -> Result<Vec<V2Tensor>, RunError> {
        self.run_on(inputs, 1)
    }

    /// As [`LoadedModel::run`], with the matrix products split over `threads` threads (the
    /// caller holds that many CPU slots): the run moves to a pool of that many threads and the
    /// caller waits for it. Falls back to the calling thread alone if a pool cannot be started.
    pub fn run_on(&self, inputs: Vec<V2Tensor>, threads: usize) -> Result<Vec<V2Tensor>, RunError> {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        let _running = super::progress::Running::start();
        // A request whose first float is this marker hangs here when the failpoint is on (the
        // watchdog's test); golden vectors and warm-up never carry it.
        if matches!(inputs.first().map(|t| &t.data), Some(TensorData::F32(v)) if v.first() == Some(&-12345.0)) {
            crate::failpoint::hang("worker-hang");
        }
        let key = self.symbol_values(&inputs);
        let plan = self.plan(&key)?;
        let mut tv: TVec<TValue> = TVec::new();
        for t in inputs {
            tv.push(to_tract(t)?.into());
        }
        let pool = if threads > 1 { executor(threads) } else { None };
        let out = match catch_unwind(AssertUnwindSafe(|| match pool {
            // The whole plan runs on one of the pool's threads, and the pool's other threads
            // stay awake for the length of the run (they hold its CPU slots), taking shares of
            // each split product as it comes: no hand-off to the pool and no wake-up per product
            // (both measured slower; BENCHMARKS.md history).
            Some(Executor::MultiThread(workers)) => {
                let executor = Executor::MultiThread(workers.clone());
                with_helpers(&workers, || multithread_tract_scope(executor, || plan.run(tv)))
            }
            Some(pool) => multithread_tract_scope(pool, || plan.run(tv)),
            None => plan.run(tv),
        })) {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(RunError::Engine(format!("{e:#}"))),
            Err(p) => return Err(RunError::Engine(format!("engine panicked: {}", panic_message(p)))),
        };
        out.into_iter()
            .zip(&self.signature.outputs)
            .map(|(v, spec)| from_tract(spec.name.clone(), &v.into_tensor()))
            .collect()
    }
}

/// Runs `run` on one of `pool`'s threads while the pool's other threads help it: each takes
/// shares of the work `run` splits (rayon jobs) until `run` ends, by return or by panic (a
/// panic reaches the caller once the helpers have let go).
fn with_helpers<R: Send>(pool: &rayon_core::ThreadPool, run: impl FnOnce() -> R + Send) -> R {
    let running = std::sync::atomic::AtomicBool::new(true);
    pool.scope(|scope| {
        let runner = pool.current_thread_index();
        let running = &running;
        for _ in 1..pool.current_num_threads() {
            scope.spawn(move |_| help_while_running(pool, runner, running));
        }
        let _stop = StopHelping(running);
        run()
    })
}

/// How long a helper thread of a split run waits, spinning, for a share of the next product
/// before it lets go: long enough to span the operators between two products of a large model
/// (with 1 ms, eight-row MiniLM runs lost most of the gain: their helpers let go mid-run).
const HELPER_IDLE: std::time::Duration = std::time::Duration::from_millis(10);

/// A helper of a split run on `pool`: takes shares of the run's products as they are split
/// until the run ends (`running`), or until it found none for [`HELPER_IDLE`]: then a helper
/// that ended up waiting above work of its own run (nested work-stealing) cannot hold that run
/// up for longer. The runner itself may take this job back while it waits inside a split
/// product: it has the run to finish, so it returns at once.
fn help_while_running(pool: &rayon_core::ThreadPool, runner: Option<usize>, running: &std::sync::atomic::AtomicBool) {
    if pool.current_thread_index() == runner {
        return;
    }
    let mut idle_since = None;
    while running.load(std::sync::atomic::Ordering::Acquire) {
        match pool.yield_now() {
            None => return,
            Some(rayon_core::Yield::Executed) => idle_since = None,
            Some(_) => {
                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= HELPER_IDLE {
                    return;
                }
                std::hint::spin_loop();
            }
        }
    }
}

/// Ends the helpers' wait for shares of a split run when the run ends, by return or by panic.
struct StopHelping<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopHelping<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// The size, in matrix panels, from which a split run shares a product between its threads
/// (tract's default: 64). Low enough that a one-row transformer's attention projections (60
/// panels for MiniLM at 14 tokens) are shared too (BENCHMARKS.md, engine). Set when the first
/// pool starts; a run on one thread never consults it.
const SPLIT_MIN_PANELS: usize = 32;

static SPLIT_PANELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(SPLIT_MIN_PANELS);

/// Sets the size, in matrix panels, from which split runs share a product (benchmarks).
pub fn set_split_min_panels(panels: usize) {
    SPLIT_PANELS.store(panels, std::sync::atomic::Ordering::Relaxed);
    tract_linalg::multithread::set_threading_panel_threshold(panels);
}

/// The process's thread pool of `threads` threads for split runs, started on first use.
fn executor(threads: usize) -> Option<tract_linalg::multithread::Executor> {
    use tract_linalg::multithread::Executor;
    /// Pools by thread count (`None`: it could not be started).
    type Pools = Mutex<Vec<(usize, Option<Executor>)>>;
    static POOLS: std::sync::OnceLock<Pools> = std::sync::OnceLock::new();
    let mut pools = POOLS.get_or_init(|| Mutex::new(Vec::new())).lock().ok()?;
    if let Some((_, e)) = pools.iter().find(|(n, _)| *n == threads) {
        return e.clone();
    }
    // tract's threshold is process-wide; only runs with a pool consult it.
    tract_linalg::multithread::set_threading_panel_threshold(SPLIT_PANELS.load(std::sync::atomic::Ordering::Relaxed));
    // tract panics when the threads cannot be spawned: then runs stay on one thread.
    let made = catch_unwind(|| Executor::multithread_with_name(threads, "infer-pool")).ok();
    if made.is_none() {
        tracing::warn!(threads, "cannot start an inference thread pool: runs use one thread");
    }
    pools.push((threads, made.clone()));
    made
}

fn to_tract(t: V2Tensor) -> Result<Tensor, RunError> {
    fn arr<T: Datum>(shape: &[usize], v: Vec<T>) -> Result<Tensor, RunError> {
        tract_ndarray::ArrayD::from_shape_vec(tract_ndarray::IxDyn(shape), v)
            .map(|a| a.into_tensor())
            .map_err(|e| RunError::InvalidInput(format!("data does not fit shape {shape:?}: {e}")))
    }
    let s = &t.shape;
    match t.data {
        TensorData::Bool(v) => arr(s, v),
        TensorData::U8(v) => arr(s, v),
        TensorData::U16(v) => arr(s, v),
        TensorData::U32(v) => arr(s, v),
        TensorData::U64(v) => arr(s, v),
        TensorData::I8(v) => arr(s, v),
        TensorData::I16(v) => arr(s, v),
        TensorData::I32(v) => arr(s, v),
        TensorData::I64(v) => arr(s, v),
        TensorData::F16(v) => arr(s, v.into_iter().map(f16::from_f32).collect()),
        TensorData::F32(v) => arr(s, v),
        TensorData::F64(v) => arr(s, v),
        TensorData::Bytes(v) => arr(s, v.into_iter().map(|b| String::from_utf8_lossy(&b).into_owned()).collect()),
    }
}

fn from_tract(name: String, t: &Tensor) -> Result<V2Tensor, RunError> {
    fn slice<T: Datum + Clone>(t: &Tensor) -> Result<Vec<T>, RunError> {
        t.try_as_plain_ram()
            .and_then(|v| v.as_slice::<T>().map(|s| s.to_vec()))
            .map_err(|e| RunError::Engine(format!("reading output: {e:#}")))
    }
    let data = match t.datum_type() {
        DatumType::Bool => TensorData::Bool(slice(t)?),
        DatumType::U8 => TensorData::U8(slice(t)?),
        DatumType::U16 => TensorData::U16(slice(t)?),
        DatumType::U32 => TensorData::U32(slice(t)?),
        DatumType::U64 => TensorData::U64(slice(t)?),
        DatumType::I8 => TensorData::I8(slice(t)?),
        DatumType::I16 => TensorData::I16(slice(t)?),
        DatumType::I32 => TensorData::I32(slice(t)?),
        DatumType::I64 => TensorData::I64(slice(t)?),
        DatumType::F16 => TensorData::F16(slice::<f16>(t)?.into_iter().map(|x| x.to_f32()).collect()),
        DatumType::F32 => TensorData::F32(slice(t)?),
        DatumType::F64 => TensorData::F64(slice(t)?),
        DatumType::String => TensorData::Bytes(slice::<String>(t)?.into_iter().map(String::into_bytes).collect()),
        DatumType::TDim => {
            let cast =
                t.cast_to::<i64>().map_err(|e| RunError::Engine(format!("output '{name}' is not integral: {e:#}")))?;
            TensorData::I64(slice(&cast)?)
        }
        other => return Err(RunError::Engine(format!("output '{name}' has unsupported type {other:?}"))),
    };
    Ok(V2Tensor { name, shape: t.shape().to_vec(), data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> rayon_core::ThreadPool {
        rayon_core::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool of two threads")
    }

    fn spec(name: &str, dims: &[Dim]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype: DataType::F32, dims: dims.to_vec() }
    }

    #[test]
    fn a_dynamic_dimension_besides_the_batch_is_a_free_one() {
        let n = || Dim::Dynamic("N".into());
        let batch_only = Signature { inputs: vec![spec("x", &[n(), Dim::Fixed(64)])], outputs: vec![] };
        assert!(!batch_only.has_free_dimension());
        let fixed = Signature { inputs: vec![spec("x", &[Dim::Fixed(1), Dim::Fixed(64)])], outputs: vec![] };
        assert!(!fixed.has_free_dimension());
        let text = Signature {
            inputs: vec![spec("ids", &[n(), Dim::Dynamic("S".into())]), spec("mask", &[n(), Dim::Dynamic("S".into())])],
            outputs: vec![],
        };
        assert!(text.has_free_dimension());
        // A dynamic first dimension the inputs do not share is not a batch: it is free too.
        let unshared = Signature {
            inputs: vec![spec("a", &[n(), Dim::Fixed(3)]), spec("b", &[Dim::Fixed(2), Dim::Fixed(3)])],
            outputs: vec![],
        };
        assert!(unshared.has_free_dimension());
    }

    #[test]
    fn a_panic_in_a_split_run_reaches_the_caller_and_the_pool_serves_on() {
        let pool = pool();
        let caught = catch_unwind(AssertUnwindSafe(|| with_helpers(&pool, || -> u64 { panic!("kernel fault") })));
        let msg = panic_message(caught.expect_err("the panic reaches the caller"));
        assert!(msg.contains("kernel fault"), "{msg}");
        // The helpers let go: the next run on the same pool is served, its work shared.
        let (a, b) =
            with_helpers(&pool, || rayon_core::join(|| (0..1000u64).sum::<u64>(), || (1000..2000u64).sum::<u64>()));
        assert_eq!(a + b, (0..2000u64).sum::<u64>());
    }

    #[test]
    fn a_split_run_s_work_is_taken_by_another_pool_thread() {
        // The first half waits (bounded) until the second half has started: on the run's own
        // thread that could never happen, so the second half must be taken by the other thread.
        let pool = pool();
        let (tx, rx) = std::sync::mpsc::channel();
        let (runner, other) = with_helpers(&pool, || {
            let runner = rayon_core::current_thread_index();
            let first = move || rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the second half started");
            let second = move || {
                let _ = tx.send(());
                rayon_core::current_thread_index()
            };
            let ((), other) = rayon_core::join(first, second);
            (runner, other)
        });
        assert!(runner.is_some() && other.is_some(), "both halves ran in the pool");
        assert_ne!(runner, other);
    }
}
