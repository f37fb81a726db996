#!/usr/bin/env bash
# Batch jobs: a job's rows per second on the MLP, and live MLP latency with a job running
# against without one, same agent, same run. The agent on CPU 0 (inside the bench), the load
# generator on CPU 1. Loopback only; bounded in time.
#   scripts/bench-batch.sh [--seconds 5] [--rounds 3] [--clients 1]
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
cd "$ROOT"
cargo bench --no-run -q -p outpost-tests --bench batch --locked
exec taskset -c 1 cargo bench -q -p outpost-tests --bench batch --locked -- "$@"
