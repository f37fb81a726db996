#!/usr/bin/env bash
# The whole test suite. Installs what it needs first (scripts/setup-test.sh).
#   scripts/test.sh                      everything that is fast
#   OUTPOST_TEST_FULL=1 scripts/test.sh  everything (what CI runs): missing tools are errors,
#                                        formatting and clippy (warnings denied) are checked,
#                                        and cargo deny checks licences, bans and sources
. "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup-test.sh"
export OUTPOST_TEST_PYTHON="$TEST_VENV/bin/python"
cd "$ROOT"
if [ "${OUTPOST_TEST_FULL:-}" = 1 ]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
  # Licences, bans and sources (deny.toml); the advisory database is not reachable here.
  cargo deny --locked check licenses bans sources
fi
cargo test --workspace --locked "$@"
