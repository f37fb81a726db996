#!/usr/bin/env python3
"""Compute golden vectors for a model with ONNX Runtime (an independent runtime: never tract).

    scripts/make-golden.py MODEL.onnx --inputs CASES.json --out golden.json [--atol-floor 1e-4]
        [--cosine-min 0.99] [--kind OUTPUT=label|probability|embedding|regression ...]

CASES.json is a list of cases, each a list of V2 tensors:
    [[{"name": "X", "datatype": "FP32", "shape": [1, 30], "data": [...]}], ...]
The absolute tolerance is max(floor, 4 x the spread between ONNX Runtime with and without graph
optimizations), as for the demo models (models/PROVENANCE.md). Each output is checked by its
kind, guessed from ONNX Runtime's outputs unless --kind names it: integer outputs are labels
(exact); rows of values in [0, 1] summing to 1 are probabilities (the absolute tolerance); other
rows of 8 or more values are embeddings (cosine similarity per row, --cosine-min, 0.99 by
default); the rest are regression values (relative tolerance 1e-3 on top of the absolute one).
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("gen_models", HERE / "gen-models.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

NP = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
      "INT8": np.int8, "BOOL": np.bool_}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--atol-floor", type=float, default=1e-4)
    ap.add_argument("--cosine-min", type=float)
    ap.add_argument("--kind", action="append", default=[], metavar="OUTPUT=KIND",
                    help="label, probability, embedding or regression (default: guessed)")
    args = ap.parse_args()
    kinds = {}
    for k in args.kind:
        name, _, kind = k.partition("=")
        if kind not in ("label", "probability", "embedding", "regression"):
            ap.error(f"--kind {k}: the kind must be label, probability, embedding or regression")
        kinds[name] = kind
    cases = []
    for case in json.loads(args.inputs.read_text()):
        cases.append({t["name"]: np.array(t["data"], dtype=NP[t["datatype"]]).reshape(t["shape"]) for t in case})
    tmp = args.out.parent
    tmp.mkdir(parents=True, exist_ok=True)
    atol, spread = gen.write_golden(tmp, args.model, cases, args.atol_floor, cosine_min=args.cosine_min)
    written = tmp / "golden.json"
    golden = json.loads(written.read_text())
    checks = {}
    for out in golden["cases"][0]["outputs"]:
        name = out["name"]
        values = [np.array(c_out["data"], dtype=np.float64).reshape(c_out["shape"])
                  for case in golden["cases"] for c_out in case["outputs"] if c_out["name"] == name]
        kind = kinds.get(name) or guess_kind(out["datatype"], values)
        check = {"kind": kind}
        if kind == "embedding":
            check["cosine_min"] = args.cosine_min if args.cosine_min is not None else 0.99
        checks[name] = check
    golden["tolerance"]["outputs"] = checks
    written.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    if written != args.out:
        written.replace(args.out)
    described = ", ".join(f"{n}: {c['kind']}" for n, c in checks.items())
    print(f"{args.out}: {len(cases)} cases, atol {atol:g} (ONNX Runtime spread {spread:.2e}); {described}")


def guess_kind(datatype, values):
    """What an output is, from its type and ONNX Runtime's values for every case."""
    if not datatype.startswith("FP"):
        return "label"
    rows = [v.reshape(-1, v.shape[-1]) if v.ndim else v.reshape(1, 1) for v in values]
    width = rows[0].shape[-1]
    if width > 1 and all(((r >= 0) & (r <= 1)).all() and np.allclose(r.sum(axis=-1), 1, atol=1e-3) for r in rows):
        return "probability"
    if width >= 8:
        return "embedding"
    return "regression"


if __name__ == "__main__":
    main()
