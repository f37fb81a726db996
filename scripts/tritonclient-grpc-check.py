#!/usr/bin/env python3
"""Drive a running Outpost over gRPC with NVIDIA's tritonclient[grpc], unchanged.

    serve:   every golden case of every model under --models-dir, through the sync client,
             the asyncio client and one bidirectional stream; outputs within the golden
             tolerance and equal to tritonclient.http's answers (--http-url); metadata,
             model config, statistics and the repository index.
    stream:  --count requests on one stream (models and cases in turn); each answer comes
             back exactly once, matched by its id, and equals the golden outputs.
    errors:  each status code provoked on purpose (see --expect).

Credentials: --token (sent as authorization metadata), --ca/--cert/--key (TLS, mTLS).
Exits non-zero on any mismatch; prints one line per check.
"""
import argparse
import asyncio
import importlib.util
import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

# The golden comparison and datatypes of the HTTP check, shared (its file name has a dash).
_spec = importlib.util.spec_from_file_location("tritonclient_check", Path(__file__).with_name("tritonclient-check.py"))
_http_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_http_check)
NP = _http_check.NP
compare = _http_check.compare
array = _http_check.array


def load_models(models_dir, only=None):
    out = []
    for d in sorted(p for p in models_dir.iterdir() if (p / "golden.json").is_file()):
        if only and d.name not in only:
            continue
        out.append((d.name, _http_check.load_golden(d)))
    return out


def grpc_inputs(module, case):
    inputs = []
    for t in case["inputs"]:
        arr = array(t)
        inp = module.InferInput(t["name"], t["shape"], t["datatype"])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    outputs = [module.InferRequestedOutput(t["name"]) for t in case["outputs"]]
    return inputs, outputs


def client_args(args):
    kw = {"url": args.url}
    if args.ca:
        kw.update(ssl=True, root_certificates=args.ca, private_key=args.key, certificate_chain=args.cert)
    return kw


def headers(args):
    return {"authorization": f"Bearer {args.token}"} if args.token else None


def serve(args):
    c = grpcclient.InferenceServerClient(**client_args(args))
    h = headers(args)
    assert c.is_server_live(headers=h) and c.is_server_ready(headers=h), "server not live and ready"
    meta = c.get_server_metadata(headers=h, as_json=True)
    print(f"server: {meta['name']} {meta['version']} extensions={meta['extensions']}")
    for ext in ("model_repository", "model_configuration", "statistics"):
        assert ext in meta["extensions"], meta
    http = httpclient.InferenceServerClient(url=args.http_url) if args.http_url else None
    models = load_models(args.models_dir, args.model)
    index = c.get_model_repository_index(headers=h, as_json=True)
    names = {m["name"] for m in index.get("models", [])}
    for name, golden in models:
        assert name in names, f"{name} missing from the repository index {index}"
        assert c.is_model_ready(name, headers=h), f"{name} not ready"
        md = c.get_model_metadata(name, headers=h, as_json=True)
        assert md["name"] == name, md
        cfg = c.get_model_config(name, headers=h, as_json=True)["config"]
        assert cfg["name"] == name and len(cfg["input"]) == len(md["inputs"]), cfg
        for i, case in enumerate(golden["cases"]):
            inputs, outputs = grpc_inputs(grpcclient, case)
            result = c.infer(name, inputs, outputs=outputs, request_id=f"g-{i}", headers=h)
            assert result.get_response().id == f"g-{i}", result.get_response().id
            compare(name, i, golden, result)
            if http is not None:
                hin = []
                for t in case["inputs"]:
                    arr = array(t)
                    x = httpclient.InferInput(t["name"], t["shape"], t["datatype"])
                    x.set_data_from_numpy(arr, binary_data=True)
                    hin.append(x)
                hres = http.infer(name, hin, outputs=[httpclient.InferRequestedOutput(t["name"], binary_data=True)
                                                      for t in case["outputs"]])
                for t in case["outputs"]:
                    a, b = result.as_numpy(t["name"]), hres.as_numpy(t["name"])
                    assert a.dtype == b.dtype and np.array_equal(a, b), f"{name} case {i}: gRPC and HTTP differ"
        print(f"{name}: sync {len(golden['cases'])} cases match (and equal HTTP's)")
    stats = c.get_inference_statistics(headers=h, as_json=True)
    counted = {s["name"]: int(s.get("inference_count", 0)) for s in stats.get("model_stats", [])}
    for name, golden in models:
        assert counted.get(name, 0) >= len(golden["cases"]), f"statistics for {name}: {stats}"
    print("statistics count every request")

    async def aio():
        ac = aioclient.InferenceServerClient(**client_args(args))
        try:
            jobs = []
            for name, golden in models:
                for i, case in enumerate(golden["cases"]):
                    inputs, outputs = grpc_inputs(aioclient, case)
                    jobs.append((name, golden, i, ac.infer(name, inputs, outputs=outputs, request_id=f"a-{name}-{i}", headers=h)))
            results = await asyncio.gather(*(j[3] for j in jobs))
            for (name, golden, i, _), r in zip(jobs, results):
                compare(name, i, golden, r)
            return len(results)
        finally:
            await ac.close()
    n = asyncio.run(aio())
    print(f"asyncio: {n} concurrent requests match")
    got = run_stream(args, models, len(sum((g["cases"] for _, g in models), [])))
    print(f"stream: {got} answers match")
    print("all models match")


def run_stream(args, models, count):
    """Sends `count` requests on one stream; every answer exactly once, each matching."""
    c = grpcclient.InferenceServerClient(**client_args(args))
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers(args))
    plan = {}
    cases = [(name, golden, i) for name, golden in models for i in range(len(golden["cases"]))]
    for k in range(count):
        name, golden, i = cases[k % len(cases)]
        rid = f"s-{k}"
        plan[rid] = (name, golden, i)
        inputs, outputs = grpc_inputs(grpcclient, golden["cases"][i])
        c.async_stream_infer(name, inputs, outputs=outputs, request_id=rid)
    seen = set()
    for _ in range(count):
        result, error = answers.get(timeout=120)
        if error is not None:
            raise AssertionError(f"stream error: {error}")
        rid = result.get_response().id
        assert rid in plan, f"unknown id {rid}"
        assert rid not in seen, f"id {rid} answered twice"
        seen.add(rid)
        name, golden, i = plan[rid]
        compare(name, i, golden, result)
    c.stop_stream()
    assert answers.empty(), "answers beyond the requests"
    assert seen == set(plan), f"missing answers: {sorted(set(plan) - seen)[:5]}"
    return len(seen)


def expect(args):
    """Provokes one status; prints it. --expect CODE --case NAME."""
    c = grpcclient.InferenceServerClient(**client_args(args))
    h = headers(args)
    case = args.case
    mlp = None if case in ("slow", "load", "unload") else load_models(args.models_dir, ["mlp"])[0][1]["cases"][0]
    try:
        if case == "bad-shape":
            inputs, outputs = grpc_inputs(grpcclient, mlp)
            bad = grpcclient.InferInput(inputs[0].name(), [1, 3], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
            c.infer("mlp", [bad], headers=h)
        elif case == "unknown-model":
            inputs, _ = grpc_inputs(grpcclient, mlp)
            c.infer("no-such-model", inputs, headers=h)
        elif case == "infer":
            inputs, outputs = grpc_inputs(grpcclient, mlp)
            for _ in range(args.repeat):
                c.infer(args.model[0] if args.model else "mlp", inputs, outputs=outputs, headers=h,
                        client_timeout=args.timeout)
        elif case == "slow":
            name, golden = load_models(args.models_dir, args.model)[0]
            inputs, outputs = grpc_inputs(grpcclient, golden["cases"][0])
            c.infer(name, inputs, outputs=outputs, headers=h, client_timeout=args.timeout)
        elif case == "load":
            c.load_model(args.model[0], headers=h)
        elif case == "unload":
            c.unload_model(args.model[0], headers=h)
        else:
            raise SystemExit(f"unknown case {case}")
    except InferenceServerException as e:
        print(f"status {e.status()}: {e.message()}")
        if args.expect and not str(e.status()).endswith(args.expect):
            sys.exit(1)
        return
    print("status OK")
    if args.expect and args.expect != "OK":
        sys.exit(1)


def health(args):
    """The standard grpc.health.v1 service: the server and the inference service SERVING."""
    import grpc
    if args.ca:
        read = lambda p: Path(p).read_bytes() if p else None
        creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
        channel = grpc.secure_channel(args.url, creds)
    else:
        channel = grpc.insecure_channel(args.url)
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    for service in ("", "inference.GRPCInferenceService"):
        name = service.encode()
        request = bytes([0x0A, len(name)]) + name if name else b""
        answer = check(request, timeout=10)
        status = answer[1] if len(answer) >= 2 and answer[0] == 0x08 else 0
        print(f"health {service or '(server)'}: {'SERVING' if status == 1 else status}")
        assert status == 1, answer
    try:
        check(bytes([0x0A, 4]) + b"nope", timeout=10)
        raise AssertionError("an unknown service has a health status")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print("health nope: NOT_FOUND")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["serve", "stream", "expect", "health"])
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--http-url")
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    ap.add_argument("--model", action="append", help="only these models (repeatable)")
    ap.add_argument("--token")
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--case", default="infer")
    ap.add_argument("--expect", help="the status code the call must end with (e.g. INVALID_ARGUMENT, OK)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float)
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args)
    elif args.mode == "stream":
        models = load_models(args.models_dir, args.model)
        print(f"stream: {run_stream(args, models, args.count)} answers, each exactly once")
    elif args.mode == "health":
        health(args)
    else:
        expect(args)


if __name__ == "__main__":
    main()
