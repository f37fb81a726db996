#!/usr/bin/env bash
# Two-box failover with keepalived in network namespaces: failover time and failed requests per
# kill -9 of the active agent, at VRRP advertisement intervals of 1, 2 and 3 s. Needs root.
#   scripts/bench-failover.sh [--kills 10] [--intervals 1,2,3]
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
cd "$ROOT"
cargo bench --no-run -q -p outpost-tests --bench failover --locked
exec cargo bench -q -p outpost-tests --bench failover --locked -- "$@"
