#!/usr/bin/env bash
# Overflow under load: MiniLM offered beyond one box's capacity, overflow off vs on, same run;
# the box pinned to CPU 0, the overflow target (and the load generator) to CPU 1.
#   scripts/bench-overflow.sh [--rate 180] [--seconds 10] [--slo-ms 100] [--kserve]
# --kserve also runs the same load with KServe's Python V2 server (onnxruntime) as the target,
# installed into .cache/venv-kserve by this script.
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
command -v taskset >/dev/null || apt_install util-linux
cd "$ROOT"
args=()
kserve=0
for a in "$@"; do
  if [ "$a" = --kserve ]; then kserve=1; else args+=("$a"); fi
done
cargo bench -q -p outpost-tests --bench overflow --locked --no-run
bench="$(ls -t target/release/deps/overflow-* | grep -v '\.d$' | head -1)"
peer_pid=""
trap '[ -n "$peer_pid" ] && kill "$peer_pid" 2>/dev/null || true' EXIT
if [ "$kserve" = 1 ]; then
  venv "$CACHE/venv-kserve" "$ROOT/scripts/requirements-kserve.txt"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  taskset -c 1 "$CACHE/venv-kserve/bin/python" "$ROOT/scripts/kserve-onnx.py" \
    --model-dir "$CACHE/models/minilm" --http-port "$port" >"$CACHE/kserve.log" 2>&1 &
  peer_pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/v2/models/minilm/ready" >/dev/null && break
    kill -0 "$peer_pid" 2>/dev/null || { cat "$CACHE/kserve.log" >&2; exit 1; }
    sleep 1
  done
  args+=(--peer-url "http://127.0.0.1:$port" --peer-model minilm)
fi
taskset -c 1 "$bench" "${args[@]}"
