#!/usr/bin/env bash
# gRPC against HTTP on one agent (MLP and CNN, 1, 8 and 64 clients), and against KServe's
# Python server over gRPC, same model and load generator, same run. The agent and KServe are
# pinned to CPU 0 (inside the bench), the load generator to CPU 1; it reports its own CPU.
# Installs what it needs: KServe in a venv under .cache/. Loopback only; bounded in time.
# With --callgrind: the agent runs under callgrind instead, and each client's requests are
# counted in the agent's instructions (inside and outside the model run), not timed.
#   scripts/bench-grpc.sh [--seconds 5] [--models mlp,cnn] [--concurrency 1,8,64] [--rounds 3]
#   scripts/bench-grpc.sh --callgrind [--models mlp,cnn]
# With --trace: the agent's syscalls are traced (perf) during the one-client comparison, for
# its own time from reading a request to writing the answer.
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
case " $* " in *" --callgrind "*) command -v callgrind_control >/dev/null || apt_install valgrind ;; esac
case " $* " in *" --trace "*) command -v perf >/dev/null || apt_install linux-perf ;; esac
venv "$CACHE/venv-kserve" "$ROOT/scripts/requirements-kserve.txt"
cd "$ROOT"
cargo bench --no-run -q -p outpost-tests --bench grpc --locked
exec taskset -c 1 cargo bench -q -p outpost-tests --bench grpc --locked -- \
  --kserve-python "$CACHE/venv-kserve/bin/python" "$@"
