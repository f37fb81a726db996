#!/usr/bin/env bash
# Shadow traffic's cost to live requests: the MLP with a shadow candidate copying every
# request against the same setup without one, same run. Both agents pinned to CPU 0 (inside
# the bench), the load generator to CPU 1. Loopback only; bounded in time.
#   scripts/bench-shadow.sh [--seconds 5] [--rounds 3] [--concurrency 1,8]
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
cd "$ROOT"
cargo bench --no-run -q -p outpost-tests --bench shadow --locked
exec taskset -c 1 cargo bench -q -p outpost-tests --bench shadow --locked -- "$@"
