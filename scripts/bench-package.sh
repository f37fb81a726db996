#!/usr/bin/env bash
# The cost of each processing step of a model package against the model run it feeds: text
# through MiniLM's tokenizer (16 and 128 tokens), a 640×480 JPEG through the digits package's
# image step, a row of named fields through the tabular step. One process, one thread.
#   scripts/bench-package.sh [--iters N]
. "$(dirname "$0")/lib.sh"
iters=300
if [ "${1:-}" = "--iters" ]; then iters="$2"; shift 2; fi
"$ROOT/scripts/setup-test.sh"
log "building the package benchmark (release profile)"
(cd "$ROOT" && cargo bench -p outpost --bench package --no-run --locked 2>&1 | tail -1 >&2)
out="$CACHE/bench-package.jsonl"
(cd "$ROOT" && cargo bench -q -p outpost --bench package --locked -- --iters "$iters" --minilm "$CACHE/models/minilm-text") > "$out"
"$TEST_VENV/bin/python" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("| package | raw input | step before p50 µs | p99 µs | model run p50 µs | p99 µs | step after p50 µs | before/model |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['case']} | {r['input']} | {r['pre_p50_us']:.1f} | {r['pre_p99_us']:.1f} | {r['model_p50_us']:.1f} | {r['model_p99_us']:.1f} | {r['post_p50_us']:.1f} | {r['pre_p50_us']/r['model_p50_us']:.2f} |")
PY
