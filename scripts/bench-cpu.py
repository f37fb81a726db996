#!/usr/bin/env python3
"""Where the agent's CPU goes per request at concurrency 1: starts the agent on loopback (demo
models, audit log off unless --audit), sends --count requests of each kind on one kept-alive
connection, alternating in --rounds blocks, and prints per kind the wall time per request and
the CPU time the agent's threads spent per request (from /proc, by thread name). The health
request is the floor every request pays (reading, routing and answering a request; waking an
idle core); what an inference adds over it is the agent's own work plus the model's run.
Bounded: --count requests per block, at most 20 s per block.

    scripts/bench-cpu.py --outpost target/release/outpost [--model mlp] [--models DIR] [--count 5000] [--rounds 2] [--audit]

--models: the directory of model directories to serve (default: the demo models in models/; e.g.
.cache/models for MiniLM). Each inference block also prints the model's own average run time
(`run_us` in its metadata), so what serving adds over the engine's run shows in one run.
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_by_thread(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--outpost", required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--audit", action="store_true")
    ap.add_argument("--models", default=str(ROOT / "models"))
    a = ap.parse_args()
    models = Path(a.models).resolve()
    golden = json.loads((models / a.model / "golden.json").read_text())
    body = json.dumps({"inputs": golden["cases"][0]["inputs"]}).encode()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "outpost.toml"
        cfg.write_text(
            f'[node]\nstate_dir = "{tmp}/state"\n[http]\nlisten = "127.0.0.1:{port}"\n'
            f'[local_models]\ndirs = ["{models}"]\n[audit]\nenabled = {"true" if a.audit else "false"}\n'
        )
        agent = subprocess.Popen([a.outpost, "run", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            conn = None
            while time.monotonic() < deadline:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    c.request("GET", "/v2/health/ready")
                    r = c.getresponse()
                    r.read()
                    if r.status == 200:
                        conn = c
                        break
                    c.close()
                except OSError:
                    pass
                if agent.poll() is not None:
                    sys.exit(f"the agent exited with {agent.returncode}")
                time.sleep(0.2)
            if conn is None:
                sys.exit("the agent did not get ready in 60 s")

            def call(kind):
                if kind == "infer":
                    conn.request("POST", f"/v2/models/{a.model}/infer", body, {"Content-Type": "application/json"})
                else:
                    conn.request("GET", "/v2/health/ready")
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    sys.exit(f"{kind}: HTTP {r.status}")

            hz = os.sysconf("SC_CLK_TCK")
            for rnd in range(a.rounds):
                for kind in ("health", "infer"):
                    for _ in range(200):
                        call(kind)
                    before, t0, n = cpu_by_thread(agent.pid), time.perf_counter(), 0
                    stop = time.monotonic() + 20
                    while n < a.count and time.monotonic() < stop:
                        call(kind)
                        n += 1
                    wall = time.perf_counter() - t0
                    after = cpu_by_thread(agent.pid)
                    per = {k: (after[k] - before.get(k, 0)) * 1e6 / hz / n for k in after}
                    total = sum(per.values())
                    run_us = None
                    if kind == "infer":
                        conn.request("GET", f"/v2/models/{a.model}")
                        r = conn.getresponse()
                        run_us = json.loads(r.read()).get("parameters", {}).get("run_us")
                    threads = ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0)
                    print(
                        json.dumps(
                            {
                                "round": rnd + 1,
                                "kind": kind,
                                "model": a.model,
                                "audit": a.audit,
                                "requests": n,
                                "wall_us_per_request": round(wall * 1e6 / n, 1),
                                "agent_cpu_us_per_request": round(total, 1),
                                "model_run_us": run_us,
                                "by_thread": threads,
                            }
                        ),
                        flush=True,
                    )
        finally:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()


if __name__ == "__main__":
    main()
