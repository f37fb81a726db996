#!/usr/bin/env bash
# Fuzzes the parsers of untrusted bytes (outpost-proto) with cargo-fuzz / libFuzzer on the
# stable toolchain (--sanitizer none: Rust's own bounds and overflow checks are the oracle,
# plus each target's assertions). Outside .ci/run: it runs for minutes per target.
#   scripts/fuzz.sh                  every target for FUZZ_SECONDS (default 600) each
#   scripts/fuzz.sh v2_json 60       one target for 60 s
# Seeds: fuzz/seeds/<target>/ plus the demo models' golden files and the demo registry's
# signed metadata. Crashes land in fuzz/artifacts/<target>/: copy each to
# proto/tests/fuzz-regressions/<target>-<what> (replayed by the normal suite), then fix it.
. "$(dirname "$0")/lib.sh"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cd "$ROOT/fuzz"
targets=("${1:-v2_json binary_tensor v2_response mqtt_request dsse_manifest grpc_request}")
seconds="${2:-${FUZZ_SECONDS:-600}}"
cargo fuzz build --sanitizer none -O
for t in ${targets[@]}; do
  corpus="corpus/$t"
  mkdir -p "$corpus"
  cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  case "$t" in
    v2_json|mqtt_request|v2_response) for g in "$ROOT"/models/*/golden.json; do
        cp -n "$g" "$corpus/golden-$(basename "$(dirname "$g")").json"; done ;;
    dsse_manifest) for f in "$ROOT"/models/registry/root.json "$ROOT"/models/registry/index.json \
        "$ROOT"/models/registry/manifests/*.json; do cp -n "$f" "$corpus/"; done ;;
  esac
  log "fuzzing $t for ${seconds}s"
  start=$(date +%s)
  rc=0
  cargo fuzz run --sanitizer none -O "$t" "$corpus" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    -max_len=65536 >"$ROOT/fuzz/$t.log" 2>&1 || rc=$?
  grep -E '^#[0-9]+.*DONE|ERROR|panicked' "$ROOT/fuzz/$t.log" || true
  runs=$(grep -oE '^#[0-9]+' "$ROOT/fuzz/$t.log" | tail -1 | tr -d '#')
  log "$t: exit $rc, ${runs:-0} runs in $(( $(date +%s) - start ))s, corpus $(ls "$corpus" | wc -l) inputs"
  [ "$rc" = 0 ] || { echo "$t found a crash: see fuzz/artifacts/$t/ and fuzz/$t.log" >&2; exit 1; }
done
