#!/usr/bin/env python3
"""How fast this disk makes small writes durable, one at a time and several at once: the fact
the audit log's group commit rests on. Each thread overwrites 300-byte records in its own part
of one zero-filled, synced file (as the audit log's segments are) and `fdatasync`s after each.
Prints syncs/s, p50 and p99 per thread count. Bounded: --count syncs per thread, at most 10 s
per point.

    scripts/bench-fsync.py [--dir .cache/bench-fsync] [--count 2000] [--threads 1,2,4] [--rounds 2]
"""
import argparse
import os
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGION = 16 << 20


def point(fd, threads, count):
    deadline = time.monotonic() + 10
    lat = [[] for _ in range(threads)]

    def worker(t):
        base = t * REGION
        for i in range(count):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            os.pwrite(fd, b"x" * 299 + b"\n", base + (i * 512) % REGION)
            os.fdatasync(fd)
            lat[t].append(time.perf_counter() - start)

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    elapsed = time.perf_counter() - t0
    all_lat = sorted(x for l in lat for x in l)
    n = len(all_lat)
    return n / elapsed, all_lat[n // 2] * 1e6, all_lat[min(n - 1, int(n * 0.99))] * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(ROOT / ".cache" / "bench-fsync"))
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    if not (1 <= args.count <= 100_000 and all(1 <= t <= 16 for t in counts) and 1 <= args.rounds <= 10):
        raise SystemExit("--count 1-100000, --threads 1-16 each, --rounds 1-10")
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "records.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, b"\0" * (REGION * max(counts)), 0)
        os.fsync(fd)
        print("| threads | syncs/s | p50 µs | p99 µs |")
        print("|---|---|---|---|")
        for _ in range(args.rounds):
            for t in counts:
                rate, p50, p99 = point(fd, t, args.count)
                print(f"| {t} | {rate:,.0f} | {p50:.0f} | {p99:.0f} |", flush=True)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
