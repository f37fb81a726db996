#!/usr/bin/env python3
"""Serving benchmark: the same demo models served by Outpost, Seldon MLServer + ONNX Runtime and
KServe's Python server + ONNX Runtime, loaded alternately in one run by wrk at several
concurrencies; req/s, p50, p99, errors and RSS per server, with Outpost's ratios. Loopback
only; every run bounded by --seconds. Run through scripts/bench-serve.sh, which installs the
peers and wrk.

    bench-serve.py --outpost BIN --mlserver-python PY --kserve-python PY [--seconds 5]
                   [--models mlp,cnn,minilm] [--concurrency 1,8,64] [--baseline BIN] [--peers none]

--baseline BIN adds the same agent built from another commit (audit log on), alternated with
the others in the same run: a before/after comparison. --peers none leaves out MLServer and
KServe (and the agent with the audit log off).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(url, proc, log, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early; log:\n{Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"not ready within {timeout} s: {url}; log:\n{Path(log).read_text()[-3000:]}")


def rss_mb(pid):
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    todo = [pid]
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return total / 1024


def wrk(url, body, conc, seconds, lua_dir):
    script = Path(lua_dir) / "post.lua"
    if body is None:
        script.write_text("")
    else:
        payload = json.dumps(body).replace("]]", "] ]")
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{payload}]]\n"
        )
    threads = 1 if conc == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout

    def latency(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": errors,
    }


def model_dir(name):
    for base in (ROOT / "models", ROOT / ".cache" / "models"):
        if (base / name / "model.onnx").is_file():
            return base / name
    sys.exit(f"model {name} not found (run scripts/setup-test.sh for MiniLM)")


class Server:
    def __init__(self, label, cmd, ready_url, infer_url, env=None, cwd=None, log=None):
        self.label, self.ready_url, self.infer_url = label, ready_url, infer_url
        self.log = log
        self.proc = subprocess.Popen(
            cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        wait_ready(ready_url, self.proc, log)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_outpost(binary, name, src, work, audit=True, label=None):
    tag = f"{audit}-{label or ''}".replace(" ", "-").replace(",", "")
    models = work / f"outpost-models-{tag}"
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(src, models / name)
    port = free_port()
    cfg = work / f"outpost-{tag}.toml"
    cfg.write_text(
        f'[node]\nsite = "bench"\nname = "bench"\nstate_dir = "{work / f"outpost-state-{tag}"}"\n\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n\n[local_models]\ndirs = ["{models}"]\n\n'
        f"[audit]\nenabled = {'true' if audit else 'false'}\n\n"
        f'[models.{name}]\nmax_queue = 1024\nmax_batch = 8\nmax_queue_delay = "0s"\n'
    )
    env = dict(os.environ, RUST_LOG="warn")
    base = f"http://127.0.0.1:{port}"
    return Server(
        label or ("Outpost" if audit else "Outpost, audit off"),
        [binary, "run", "--config", str(cfg)],
        f"{base}/v2/models/{name}/ready",
        f"{base}/v2/models/{name}/infer",
        env=env,
        log=work / f"outpost-{tag}.log",
    ), base


def start_mlserver(python, name, src, work):
    d = work / "mlserver"
    shutil.rmtree(d, ignore_errors=True)
    (d / name).mkdir(parents=True)
    port = free_port()
    # parallel_workers = 0: inference in the server process. MLServer 1.7.1's worker pool dies
    # at start on Python 3.11 here ("There is no current event loop in thread 'MainThread'").
    (d / "settings.json").write_text(
        json.dumps(
            {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "debug": False, "parallel_workers": 0}
        )
    )
    (d / name / "model-settings.json").write_text(
        json.dumps(
            {"name": name, "implementation": "onnx_runtime.OnnxModel", "parameters": {"uri": str(src / "model.onnx")}}
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts" / "mlserver"))
    mlserver = str(Path(python).parent / "mlserver")
    base = f"http://127.0.0.1:{port}"
    return Server(
        "MLServer",
        [mlserver, "start", str(d)],
        f"{base}/v2/models/{name}/ready",
        f"{base}/v2/models/{name}/infer",
        env=env,
        log=work / "mlserver.log",
    )


def start_kserve(python, name, src, work):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    return Server(
        "KServe",
        [python, str(ROOT / "scripts" / "kserve-onnx.py"), "--model-dir", str(src), "--name", name, "--http-port", str(port)],
        f"{base}/v2/models/{name}/ready",
        f"{base}/v2/models/{name}/infer",
        log=work / "kserve.log",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outpost", required=True)
    ap.add_argument("--mlserver-python")
    ap.add_argument("--kserve-python")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--models", default="mlp,cnn,minilm")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--baseline", help="the agent built from another commit, for a before/after run")
    ap.add_argument("--peers", default="all", choices=["all", "none"])
    args = ap.parse_args()
    if args.peers == "all" and not (args.mlserver_python and args.kserve_python):
        sys.exit("--mlserver-python and --kserve-python are needed unless --peers none")
    if not 1 <= args.seconds <= 60:
        sys.exit("--seconds must be 1-60")
    concs = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            src = model_dir(name)
            golden = json.loads((src / "golden.json").read_text())
            body = {"id": "bench", "inputs": golden["cases"][0]["inputs"]}
            outpost, base = start_outpost(args.outpost, name, src, work)
            servers = [outpost]
            try:
                if args.baseline:
                    servers.append(start_outpost(args.baseline, name, src, work, label="Outpost, baseline")[0])
                if args.peers == "all":
                    servers.append(start_outpost(args.outpost, name, src, work, audit=False)[0])
                    servers.append(start_mlserver(args.mlserver_python, name, src, work))
                    servers.append(start_kserve(args.kserve_python, name, src, work))
                # Warm every server, then alternate servers at each concurrency.
                for s in servers:
                    wrk(s.infer_url, body, 1, 1, work)
                for c in concs:
                    for s in servers:
                        r = wrk(s.infer_url, body, c, args.seconds, work)
                        r.update(model=name, server=s.label, conc=c, rss=rss_mb(s.proc.pid))
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                    if name == args.models.split(",")[0]:
                        r = wrk(f"{base}/v2/health/ready", None, c, args.seconds, work)
                        r.update(model="(health ceiling)", server="Outpost", conc=c, rss=rss_mb(outpost.proc.pid))
                        rows.append(r)
                        print(json.dumps(r), flush=True)
            finally:
                for s in servers:
                    s.stop()
    print()
    print("| model | concurrency | server | req/s | p50 ms | p99 ms | errors | RSS MB | Outpost req/s ÷ this | this p99 ÷ Outpost p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mine = next((x for x in rows if x["model"] == r["model"] and x["conc"] == r["conc"] and x["server"] == "Outpost"), r)
        ratio = mine["rps"] / r["rps"] if r["rps"] else float("inf")
        p99r = r["p99"] / mine["p99"] if mine["p99"] else float("nan")
        print(
            f"| {r['model']} | {r['conc']} | {r['server']} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['errors']} | {r['rss']:.0f} | {ratio:.1f}× | {p99r:.1f}× |"
        )


if __name__ == "__main__":
    main()
