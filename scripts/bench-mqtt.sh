#!/usr/bin/env bash
# MQTT round trips through a real Mosquitto: the MLP through Outpost vs an echo responder on
# the same client stack, 1 and 32 in flight, same run. Loopback only; bounded in count and time.
#   scripts/bench-mqtt.sh [--requests N]
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
cd "$ROOT"
cargo bench -q -p outpost-tests --bench mqtt --locked -- "$@"
