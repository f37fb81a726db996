#!/usr/bin/env python3
"""Compute golden vectors for a model with ONNX Runtime (an independent runtime: never tract).

    scripts/make-golden.py MODEL.onnx --inputs CASES.json --out golden.json [--atol-floor 1e-4] [--cosine-min 0.99]

CASES.json is a list of cases, each a list of V2 tensors:
    [[{"name": "X", "datatype": "FP32", "shape": [1, 30], "data": [...]}], ...]
The tolerance is max(floor, 4 x the spread between ONNX Runtime with and without graph
optimizations), as for the demo models (models/PROVENANCE.md).
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
    args = ap.parse_args()
    cases = []
    for case in json.loads(args.inputs.read_text()):
        cases.append({t["name"]: np.array(t["data"], dtype=NP[t["datatype"]]).reshape(t["shape"]) for t in case})
    tmp = args.out.parent
    tmp.mkdir(parents=True, exist_ok=True)
    atol, spread = gen.write_golden(tmp, args.model, cases, args.atol_floor, cosine_min=args.cosine_min)
    written = tmp / "golden.json"
    if written != args.out:
        written.replace(args.out)
    print(f"{args.out}: {len(cases)} cases, atol {atol:g} (ONNX Runtime spread {spread:.2e})")


if __name__ == "__main__":
    main()
