#!/usr/bin/env bash
# tract (through Outpost's engine) vs ONNX Runtime, same models, same inputs, same run, one
# thread each, batch 1 and 8; plus end-to-end HTTP+JSON latency at concurrency 1, and the
# loopback round trip of /v2/health/ready beside it (the transport's own share).
# Models alternate between the two runtimes so background load hits both alike.
#   scripts/bench-engine.sh [--iters N] [MODEL_DIR...]
. "$(dirname "$0")/lib.sh"
iters=1000
if [ "${1:-}" = "--iters" ]; then iters="$2"; shift 2; fi
"$ROOT/scripts/setup-test.sh"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=("$ROOT"/models/*/ "$CACHE"/models/minilm*/)
fi
log "building the engine benchmark (release profile)"
(cd "$ROOT" && cargo bench -p outpost --bench engine --no-run --locked 2>&1 | tail -1 >&2)
out="$CACHE/bench-engine.jsonl"
: > "$out"
for m in "${models[@]}"; do
  m="${m%/}"
  [ -f "$m/model.onnx" ] || continue
  log "$(basename "$m")"
  (cd "$ROOT" && cargo bench -q -p outpost --bench engine --locked -- --model "$m" --iters "$iters" --http 2>/dev/null) >> "$out"
  OMP_NUM_THREADS=1 "$TEST_VENV/bin/python" "$ROOT/scripts/bench-ort.py" --model "$m" --iters "$iters" >> "$out"
done
"$TEST_VENV/bin/python" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
models = list(dict.fromkeys(r["model"] for r in rows))
def get(m, rt, kind, b):
    for r in rows:
        if r["model"] == m and r["runtime"].startswith(rt) and r["kind"] == kind and r["batch"] == b:
            return r
print("| model | batch | tract p50 µs | ORT p50 µs | tract/ORT | tract p99 µs | ORT p99 µs |")
print("|---|---|---|---|---|---|---|")
for m in models:
    for b in (1, 8):
        t, o = get(m, "tract", "engine", b), get(m, "onnxruntime", "engine", b)
        if t and o:
            print(f"| {m} | {b} | {t['p50_us']} | {o['p50_us']} | {t['p50_us']/o['p50_us']:.2f} | {t['p99_us']} | {o['p99_us']} |")
print()
print("| model | engine p50 µs (batch 1) | HTTP+JSON p50 µs | overhead p50 µs | health round trip p50 µs | overhead less the round trip µs | HTTP p99 µs |")
print("|---|---|---|---|---|---|---|")
for m in models:
    e, h, r = get(m, "tract", "engine", 1), get(m, "tract", "http", 1), get(m, "tract", "health", 1)
    if e and h and r:
        over = h['p50_us'] - e['p50_us']
        print(f"| {m} | {e['p50_us']} | {h['p50_us']} | {over:.1f} | {r['p50_us']} | {over - r['p50_us']:.1f} | {h['p99_us']} |")
PY
