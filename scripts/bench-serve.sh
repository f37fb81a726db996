#!/usr/bin/env bash
# Serving benchmark: Outpost vs Seldon MLServer + ONNX Runtime vs KServe's Python server + ONNX
# Runtime on the same demo models and inputs, alternately in one run, at concurrency 1, 8 and 64,
# with wrk; prints req/s, p50, p99, errors and RSS per server, and Outpost's health-endpoint
# ceiling. Installs what it needs: wrk (Debian), the peers in venvs under .cache/.
#   scripts/bench-serve.sh [--seconds 5] [--models mlp,cnn,minilm] [--concurrency 1,8,64]
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
apt_install wrk
venv "$CACHE/venv-mlserver" "$ROOT/scripts/requirements-mlserver.txt"
venv "$CACHE/venv-kserve" "$ROOT/scripts/requirements-kserve.txt"
cd "$ROOT"
# The bench profile: release without link-time optimization (BENCHMARKS.md says so).
cargo build -q --profile bench -p outpost --locked
exec python3 "$ROOT/scripts/bench-serve.py" --outpost "$ROOT/target/release/outpost" \
  --mlserver-python "$CACHE/venv-mlserver/bin/python" --kserve-python "$CACHE/venv-kserve/bin/python" "$@"
