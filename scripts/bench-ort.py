#!/usr/bin/env python3
"""ONNX Runtime latency of one model on the same inputs the tract bench uses (first golden
case at batch 1, and tiled to batch 8), one thread, default optimizations. JSON lines out.
`--gap-us N` leaves the core idle N µs before each timed run, as the tract bench's option does."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

NP = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--gap-us", type=int, default=0)
    args = ap.parse_args()
    if not (1 <= args.iters <= 1_000_000 and 0 <= args.gap_us <= 1_000_000):
        raise SystemExit("--iters 1-1000000, --gap-us 0-1000000")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(args.model / "model.onnx"), so, providers=["CPUExecutionProvider"])
    case = json.loads((args.model / "golden.json").read_text())["cases"][0]
    for batch in (1, 8):
        feeds = {}
        for t in case["inputs"]:
            arr = np.array(t["data"], dtype=NP[t["datatype"]]).reshape(t["shape"])
            feeds[t["name"]] = np.concatenate([arr] * batch, axis=0)
        for _ in range(min(args.iters, 50)):
            sess.run(None, feeds)
        samples = []
        for _ in range(args.iters):
            if args.gap_us:
                time.sleep(args.gap_us / 1e6)
            t0 = time.perf_counter()
            sess.run(None, feeds)
            samples.append((time.perf_counter() - t0) * 1e6)
        samples.sort()
        p = lambda q: samples[round((len(samples) - 1) * q)]
        print(json.dumps({"runtime": "onnxruntime " + ort.__version__, "kind": "engine", "model": args.model.name,
                          "batch": batch, "gap_us": args.gap_us, "p50_us": round(p(0.5), 1), "p99_us": round(p(0.99), 1),
                          "mean_us": round(sum(samples) / len(samples), 1), "iters": args.iters}))


if __name__ == "__main__":
    main()
