#!/usr/bin/env python3
"""Drive a running Outpost with NVIDIA's tritonclient (HTTP), unchanged.

For every model under --models-dir: server live/ready, model metadata, then every golden case
through client.infer(); outputs are compared with the ONNX Runtime golden vectors within the
tolerance stated in golden.json. A model package (package.json) is checked on its own golden
vectors: raw inputs (strings, encoded images) sent as BYTES tensors, as any Triton client
sends them. Exits non-zero on any mismatch.

    scripts/tritonclient-check.py --url 127.0.0.1:8080 --models-dir models [--binary]
"""
import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

NP = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
      "INT8": np.int8, "BOOL": np.bool_}


def array(t):
    """A golden tensor as numpy: BYTES as an object array of bytes (base64-decoded when the
    tensor says so)."""
    if t["datatype"] == "BYTES":
        items = [base64.b64decode(x) if t.get("encoding") == "base64" else x.encode() for x in t["data"]]
        arr = np.empty(len(items), dtype=np.object_)
        arr[:] = items
        return arr.reshape(t["shape"])
    return np.array(t["data"], dtype=NP[t["datatype"]]).reshape(t["shape"])


def load_golden(d):
    """The golden vectors a client checks a model directory with: its package's when it has one."""
    if (d / "package.json").is_file():
        return json.loads((d / "package.json").read_text())["golden"]
    return json.loads((d / "golden.json").read_text())


def compare(name, i, golden, result):
    """Checks one answer (anything with as_numpy) against golden case i; returns the largest
    absolute error of its float outputs. The gRPC check uses it too."""
    tol = golden["tolerance"]
    worst = 0.0
    for t in golden["cases"][i]["outputs"]:
        got = result.as_numpy(t["name"])
        if got is not None and got.dtype == np.object_:
            # BYTES come back as bytes (binary) or str (JSON): compare as bytes.
            got = np.array([x.encode() if isinstance(x, str) else x for x in got.reshape(-1)],
                           dtype=np.object_).reshape(got.shape)
        want = array(t)
        if got is None or got.shape != want.shape:
            raise AssertionError(f"{name} case {i} {t['name']}: shape {None if got is None else got.shape} != {want.shape}")
        if want.dtype.kind == "f":
            err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            limit = tol["atol"] + tol.get("rtol", 0.0) * float(np.max(np.abs(want))) if want.size else 0.0
            if err > limit:
                raise AssertionError(f"{name} case {i} {t['name']}: max abs error {err} > {limit}")
            worst = max(worst, err)
        elif not np.array_equal(got, want):
            raise AssertionError(f"{name} case {i} {t['name']}: {got} != {want}")
    return worst


def check_model(client, name, golden, binary):
    meta = client.get_model_metadata(name)
    assert meta["name"] == name, meta
    assert client.is_model_ready(name), f"{name} not ready"
    worst = 0.0
    for i, case in enumerate(golden["cases"]):
        inputs = []
        for t in case["inputs"]:
            arr = array(t)
            inp = httpclient.InferInput(t["name"], t["shape"], t["datatype"])
            # JSON carries text only: binary BYTES (an image) go as binary data, as Triton asks.
            inp.set_data_from_numpy(arr, binary_data=binary or t.get("encoding") == "base64")
            inputs.append(inp)
        outputs = [httpclient.InferRequestedOutput(t["name"], binary_data=binary) for t in case["outputs"]]
        result = client.infer(name, inputs, outputs=outputs, request_id=f"tc-{i}")
        worst = max(worst, compare(name, i, golden, result))
    # Triton's model configuration and statistics extensions.
    cfg = client.get_model_config(name)
    assert cfg["name"] == name and len(cfg["input"]) == len(meta["inputs"]), cfg
    stats = client.get_inference_statistics(name)["model_stats"]
    served = sum(int(s["inference_count"]) for s in stats)
    assert served >= len(golden["cases"]), f"{name} statistics count {served}: {stats}"
    assert all(int(s["inference_stats"]["success"]["ns"]) > 0 for s in stats if int(s["inference_count"])), stats
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8080")
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    ap.add_argument("--binary", action="store_true", help="use the binary tensor extension")
    args = ap.parse_args()
    client = httpclient.InferenceServerClient(url=args.url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    meta = client.get_server_metadata()
    print(f"server: {meta['name']} {meta['version']} extensions={meta['extensions']}")
    for ext in ("model_configuration", "statistics"):
        assert ext in meta["extensions"], meta
    failures = 0
    for d in sorted(p for p in args.models_dir.iterdir() if (p / "golden.json").is_file()):
        golden = load_golden(d)
        try:
            worst = check_model(client, d.name, golden, args.binary)
            print(f"{d.name}: {len(golden['cases'])} cases match (max abs error {worst:.3g})")
        except Exception as e:  # report every model, then fail
            failures += 1
            print(f"{d.name}: MISMATCH: {e}")
    if failures:
        print(f"{failures} models mismatched")
        sys.exit(1)
    print("all models match")


if __name__ == "__main__":
    main()
