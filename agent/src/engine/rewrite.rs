//! Candidate graphs for quantized models. tract's integer kernels (MatMulInteger, ConvInteger)
//! are far slower than its float ones, and one of its QDQ rewrites is wrong (see
//! ARCHITECTURE.md). So for a quantized model the loader builds up to three variants besides the
//! graph as published, checks each against the golden vectors and serves the fastest that
//! passes; an int8 artifact keeps its small download without paying for slow kernels.
//!
//! - `integer-ops-as-float`: `MatMulInteger`/`ConvInteger` become `MatMul`/`Conv` on
//!   `float(x) - zero_point`, with constant weights dequantized once here (integer-valued floats,
//!   so the products are the integer ones up to float rounding of large sums). The int32 result
//!   is cast back for its consumers, and a consumer casting it to float reads the float directly.
//! - `qdq-folded`: each activation `QuantizeLinear → DequantizeLinear` pair with the same scale
//!   and zero point becomes an identity: the float value passes unrounded.
//! - both together.
//!
//! Rewrites are on the ONNX protobuf, before tract parses it. A node the rewrite cannot prove
//! safe (e.g. a per-row activation zero point, weights computed at run time) is left as is.

use std::collections::HashMap;

use tract_onnx::data_resolver::FopenDataResolver;
use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::tract_ndarray::{Array, IxDyn};

const FLOAT: i64 = 1;
const INT32: i64 = 6;

/// A way of running a quantized model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Published,
    IntegerAsFloat,
    QdqFolded,
    IntegerAsFloatQdqFolded,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Published => "as-published",
            Variant::IntegerAsFloat => "integer-ops-as-float",
            Variant::QdqFolded => "qdq-folded",
            Variant::IntegerAsFloatQdqFolded => "integer-ops-as-float+qdq-folded",
        }
    }
}

/// How one candidate graph of a quantized model fared at load.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub variant: Variant,
    /// Median run time on the first golden case, or why the candidate was rejected.
    pub outcome: Result<std::time::Duration, String>,
}

/// Whether the graph holds anything a variant would change.
pub fn is_quantized(proto: &ModelProto) -> bool {
    proto.graph.as_ref().is_some_and(|g| {
        g.node.iter().any(|n| {
            n.domain.is_empty()
                && matches!(n.op_type.as_str(), "MatMulInteger" | "ConvInteger" | "QuantizeLinear" | "DequantizeLinear")
        })
    })
}

/// The variants that differ from the published graph, each with its rewritten model.
pub fn variants(proto: &ModelProto) -> Vec<(Variant, ModelProto)> {
    let mut out = Vec::new();
    let Some(graph) = proto.graph.as_ref() else { return out };
    let float = integer_as_float(graph);
    let folded = fold_qdq(graph);
    let both = float.as_ref().and_then(fold_qdq);
    for (variant, g) in
        [(Variant::IntegerAsFloat, float), (Variant::QdqFolded, folded), (Variant::IntegerAsFloatQdqFolded, both)]
    {
        if let Some(g) = g {
            out.push((variant, with_graph(proto, g)));
        }
    }
    out
}

/// The model around another graph, without copying the published graph's weights again.
fn with_graph(proto: &ModelProto, graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: proto.ir_version,
        opset_import: proto.opset_import.clone(),
        producer_name: proto.producer_name.clone(),
        producer_version: proto.producer_version.clone(),
        domain: proto.domain.clone(),
        model_version: proto.model_version,
        doc_string: proto.doc_string.clone(),
        graph: Some(graph),
        metadata_props: proto.metadata_props.clone(),
        training_info: proto.training_info.clone(),
        functions: proto.functions.clone(),
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i, ..Default::default() }
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto { op_type: op.into(), name, input: inputs, output: vec![output], attribute, ..Default::default() }
}

/// Names not yet used in the graph, for the nodes and tensors a rewrite adds.
struct Names(usize);

impl Names {
    fn fresh(&mut self, base: &str, what: &str) -> String {
        self.0 += 1;
        format!("{base}__outpost_{what}_{}", self.0)
    }
}

fn present(inputs: &[String], i: usize) -> Option<&str> {
    inputs.get(i).map(String::as_str).filter(|s| !s.is_empty())
}

struct Ctx<'a> {
    initializers: HashMap<&'a str, &'a TensorProto>,
    /// Tensor name → (op type, output index) of the node producing it.
    producers: HashMap<&'a str, (&'a str, usize)>,
}

impl Ctx<'_> {
    fn load(&self, name: &str) -> Option<Tensor> {
        let t = self.initializers.get(name)?;
        tract_onnx::tensor::load_tensor(&FopenDataResolver, t, None).ok()
    }

    /// A zero point known to be one value for the whole tensor.
    fn scalar_zero_point(&self, name: &str) -> bool {
        match self.load(name) {
            Some(t) => t.len() == 1,
            None => self.producers.get(name) == Some(&("DynamicQuantizeLinear", 2)),
        }
    }

    /// Float weights `w - zp`, the zero point per output channel on `axis` (or one value).
    fn dequantized(&self, w: &str, zp: Option<&str>, axis: usize) -> Option<Tensor> {
        let w = self.load(w)?.cast_to::<f32>().ok()?.into_owned();
        let Some(zp) = zp else { return Some(w) };
        let z = self.load(zp)?.cast_to::<f32>().ok()?.into_owned();
        let wv = w.to_plain_array_view::<f32>().ok()?;
        let zv = z.to_plain_array_view::<f32>().ok()?;
        let shape = if z.len() == 1 {
            vec![1; w.rank()]
        } else {
            if z.rank() != 1 || w.shape().get(axis) != Some(&z.len()) {
                return None;
            }
            let mut s = vec![1; w.rank()];
            s[axis] = z.len();
            s
        };
        let zb = zv.to_shape(IxDyn(&shape)).ok()?;
        let out: Array<f32, IxDyn> = &wv - &zb;
        Some(out.into_tensor())
    }
}

fn float_initializer(name: String, t: &Tensor) -> Option<TensorProto> {
    Some(TensorProto {
        name,
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: FLOAT as i32,
        float_data: t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec(),
        ..Default::default()
    })
}

/// `float(x) - float(zp)` as new nodes; returns the float tensor's name.
fn float_activation(x: &str, zp: Option<&str>, names: &mut Names, nodes: &mut Vec<NodeProto>) -> String {
    let xf = names.fresh(x, "f");
    nodes.push(node("Cast", names.fresh(x, "cast"), vec![x.into()], xf.clone(), vec![attr_int("to", FLOAT)]));
    let Some(zp) = zp else { return xf };
    let zf = names.fresh(zp, "f");
    nodes.push(node("Cast", names.fresh(zp, "cast"), vec![zp.into()], zf.clone(), vec![attr_int("to", FLOAT)]));
    let centred = names.fresh(x, "centred");
    nodes.push(node("Sub", names.fresh(x, "sub"), vec![xf, zf], centred.clone(), vec![]));
    centred
}

/// Rewrites MatMulInteger/ConvInteger to float; `None` when nothing changed.
fn integer_as_float(graph: &GraphProto) -> Option<GraphProto> {
    let ctx = Ctx {
        initializers: graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
        producers: graph
            .node
            .iter()
            .flat_map(|n| n.output.iter().enumerate().map(move |(i, o)| (o.as_str(), (n.op_type.as_str(), i))))
            .collect(),
    };
    let mut names = Names(0);
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut new_init = Vec::new();
    // int32 result → its float twin, for consumers that cast it to float anyway.
    let mut twins: HashMap<String, String> = HashMap::new();
    for n in &graph.node {
        let op = n.op_type.as_str();
        if !n.domain.is_empty() || !matches!(op, "MatMulInteger" | "ConvInteger") || n.output.len() != 1 {
            nodes.push(n.clone());
            continue;
        }
        let (Some(x), Some(w)) = (present(&n.input, 0), present(&n.input, 1)) else {
            nodes.push(n.clone());
            continue;
        };
        let x_zp = present(&n.input, 2);
        let w_zp = present(&n.input, 3);
        // Weights on their output-channel axis: MatMul's last (columns), Conv's first.
        let axis = if op == "MatMulInteger" {
            ctx.initializers.get(w).map_or(1, |t| t.dims.len().saturating_sub(1))
        } else {
            0
        };
        let weights = ctx.dequantized(w, w_zp, axis);
        if x_zp.is_some_and(|z| !ctx.scalar_zero_point(z)) || weights.is_none() {
            nodes.push(n.clone());
            continue;
        }
        let mut added = Vec::new();
        let xf = float_activation(x, x_zp, &mut names, &mut added);
        let wname = names.fresh(w, "dequantized");
        let Some(init) = weights.as_ref().and_then(|t| float_initializer(wname.clone(), t)) else {
            nodes.push(n.clone());
            continue;
        };
        new_init.push(init);
        let y = &n.output[0];
        let yf = names.fresh(y, "f");
        let float_op = if op == "MatMulInteger" { "MatMul" } else { "Conv" };
        let attrs = if op == "ConvInteger" { n.attribute.clone() } else { vec![] };
        added.push(node(float_op, names.fresh(&n.name, "float"), vec![xf, wname], yf.clone(), attrs));
        added.push(node("Cast", names.fresh(y, "cast"), vec![yf.clone()], y.clone(), vec![attr_int("to", INT32)]));
        twins.insert(y.clone(), yf);
        nodes.extend(added);
    }
    if twins.is_empty() {
        return None;
    }
    for n in &mut nodes {
        let casts_to_float =
            n.op_type == "Cast" && n.attribute.iter().any(|a| a.name == "to" && a.i == FLOAT) && n.domain.is_empty();
        if casts_to_float {
            if let Some(twin) = n.input.first().and_then(|i| twins.get(i)) {
                n.input[0] = twin.clone();
            }
        }
    }
    let mut g = graph.clone();
    g.node = nodes;
    g.initializer.extend(new_init);
    Some(g)
}

/// Folds activation Q→DQ pairs into identities; `None` when there is none.
fn fold_qdq(graph: &GraphProto) -> Option<GraphProto> {
    let producer: HashMap<&str, &NodeProto> =
        graph.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let mut g = graph.clone();
    let mut folded = 0;
    for (i, n) in g.node.iter_mut().enumerate() {
        if n.op_type != "DequantizeLinear" || !n.domain.is_empty() {
            continue;
        }
        let Some(q) = n.input.first().and_then(|i| producer.get(i.as_str())) else { continue };
        let same_params = q.input.get(1) == n.input.get(1)
            && q.input.get(2).filter(|s| !s.is_empty()) == n.input.get(2).filter(|s| !s.is_empty());
        let same_axis = q.attribute.iter().find(|a| a.name == "axis").map(|a| a.i)
            == n.attribute.iter().find(|a| a.name == "axis").map(|a| a.i);
        if q.op_type != "QuantizeLinear" || !q.domain.is_empty() || !same_params || !same_axis {
            continue;
        }
        let Some(x) = q.input.first().cloned() else { continue };
        *n = node("Identity", format!("{}__outpost_folded_{i}", n.name), vec![x], n.output[0].clone(), vec![]);
        folded += 1;
    }
    (folded > 0).then_some(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor_i8(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 3,
            raw_data: v.iter().map(|&x| x as u8).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn matmul_integer_becomes_float_with_dequantized_weights() {
        let g = GraphProto {
            node: vec![
                node(
                    "MatMulInteger",
                    "mm".into(),
                    vec!["x".into(), "w".into(), "".into(), "wzp".into()],
                    "y".into(),
                    vec![],
                ),
                node("Cast", "c".into(), vec!["y".into()], "yf".into(), vec![attr_int("to", FLOAT)]),
            ],
            initializer: vec![tensor_i8("w", &[2, 2], &[1, 2, 3, 4]), tensor_i8("wzp", &[2], &[1, -1])],
            ..Default::default()
        };
        let out = integer_as_float(&g).expect("rewritten");
        assert!(!out.node.iter().any(|n| n.op_type == "MatMulInteger"));
        let w = out.initializer.iter().find(|t| t.name.contains("dequantized")).expect("float weights");
        // Column zero points: [1-1, 2+1, 3-1, 4+1].
        assert_eq!(w.float_data, vec![0.0, 3.0, 2.0, 5.0]);
        let cast = out.node.iter().find(|n| n.name == "c").unwrap();
        assert!(cast.input[0].contains("__outpost_f"), "the float consumer reads the float result");
    }

    #[test]
    fn only_matching_qdq_pairs_fold() {
        let g = GraphProto {
            node: vec![
                node("QuantizeLinear", "q".into(), vec!["x".into(), "s".into(), "z".into()], "xq".into(), vec![]),
                node("DequantizeLinear", "d".into(), vec!["xq".into(), "s".into(), "z".into()], "xd".into(), vec![]),
                node("DequantizeLinear", "d2".into(), vec!["xq".into(), "s2".into(), "z".into()], "xe".into(), vec![]),
            ],
            ..Default::default()
        };
        let out = fold_qdq(&g).expect("folded");
        assert_eq!(out.node[1].op_type, "Identity");
        assert_eq!(out.node[1].input, vec!["x".to_owned()]);
        assert_eq!(out.node[2].op_type, "DequantizeLinear", "a different scale is not the pair's");
    }
}
