#!/usr/bin/env bash
# Release packages for the distributions branch servers run (RHEL 8/9, Debian 11/12, Ubuntu
# 20.04+): the agent built against glibc 2.28 with cargo-zigbuild (crates.io) and Zig (PyPI
# `ziglang`), for x86_64 and aarch64; each binary's glibc floor checked, reproduced on the demo
# models' golden vectors (aarch64 under qemu-aarch64-static), then packaged as .deb and .rpm.
# Outside .ci/run: every target compiles tract again (10-30 minutes each here).
#   scripts/release.sh [--out dist/release] [--arch x86_64|aarch64|all]
# Needs: the aarch64 standard library (`rustup target add aarch64-unknown-linux-gnu`, which
# downloads from static.rust-lang.org), Debian's qemu-user-static and libc6-arm64-cross for the
# aarch64 check. Each is installed when missing; a step that cannot be reached says so and
# that architecture is skipped.
. "$(dirname "$0")/lib.sh"
out="$ROOT/dist/release" arches="all"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --arch) arches="$2"; shift 2 ;;
    *) echo "usage: $0 [--out DIR] [--arch x86_64|aarch64|all]" >&2; exit 64 ;;
  esac
done
[ "$arches" = all ] && arches="x86_64 aarch64"
GLIBC_FLOOR=2.28
command -v cargo-zigbuild >/dev/null || { log "installing cargo-zigbuild"; cargo install --locked cargo-zigbuild; }
venv "$CACHE/venv-release" "$ROOT/scripts/requirements-release.txt"
# cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on PATH.
export PATH="$CACHE/venv-release/bin:$PATH"
mkdir -p "$out"
cd "$ROOT"

# A configuration that checks the committed demo models (golden vectors) and nothing else.
check_dir="$(mktemp -d)"
trap 'rm -rf "$check_dir"' EXIT
cat > "$check_dir/check.toml" <<TOML
[node]
state_dir = "$check_dir/state"
[local_models]
dirs = ["$ROOT/models"]
TOML

glibc_needed() {
  # The highest GLIBC_x.y symbol version the binary needs.
  objdump -T "$1" | grep -oE 'GLIBC_[0-9]+\.[0-9]+(\.[0-9]+)?' | sed 's/GLIBC_//' | sort -V | tail -1
}

built=()
for arch in $arches; do
  triple="$arch-unknown-linux-gnu"
  if [ "$arch" = aarch64 ] && ! rustup target list --installed | grep -qx "$triple"; then
    if ! rustup target add "$triple"; then
      echo "SKIPPED aarch64: the aarch64 standard library could not be installed (rustup target add $triple needs static.rust-lang.org)" >&2
      continue
    fi
  fi
  log "building $triple against glibc $GLIBC_FLOOR"
  cargo zigbuild --release --locked -p outpost --target "$triple.$GLIBC_FLOOR"
  bin="target/$triple/release/outpost"
  need="$(glibc_needed "$bin")"
  log "$triple needs GLIBC_$need"
  if [ "$(printf '%s\n%s\n' "$need" "$GLIBC_FLOOR" | sort -V | tail -1)" != "$GLIBC_FLOOR" ]; then
    echo "$bin needs GLIBC_$need, above the $GLIBC_FLOOR floor" >&2; exit 1
  fi
  if [ "$arch" = "$(uname -m)" ]; then
    "$bin" check-models --config "$check_dir/check.toml"
  else
    command -v qemu-aarch64-static >/dev/null || apt_install qemu-user-static
    [ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || apt_install libc6-arm64-cross
    log "checking the aarch64 binary under qemu-aarch64-static"
    qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" check-models --config "$check_dir/check.toml"
  fi
  "$ROOT/scripts/package.sh" --bin "$bin" --arch "$arch" --out "$out"
  built+=("$arch")
done
log "release packages in $out for: ${built[*]:-nothing}"
ls -l "$out"
