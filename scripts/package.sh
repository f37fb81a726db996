#!/usr/bin/env bash
# Builds outpost_<version>_<arch>.deb and outpost-<version>-1.<arch>.rpm from an already-built
# binary, with Debian's dpkg-deb and rpmbuild: no compile step (cargo-deb and
# cargo-generate-rpm would each take minutes to install on a fresh machine).
#   scripts/package.sh --bin target/release/outpost --out dist [--version 0.1.0] [--no-rpm]
#                      [--arch x86_64|aarch64]   (default: this machine's; for cross builds)
#                      [--collector target/release/outpost-collector]   (its packages too;
#                      --bin may then be left out)
. "$(dirname "$0")/lib.sh"
bin="" out="$ROOT/dist" version="" rpm=1 arch="$(uname -m)" collector=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --no-rpm) rpm=0; shift ;;
    --arch) arch="$2"; shift 2 ;;
    --collector) collector="$2"; shift 2 ;;
    *) echo "usage: $0 --bin BINARY [--out DIR] [--version V] [--no-rpm] [--arch x86_64|aarch64] [--collector BINARY]" >&2; exit 64 ;;
  esac
done
[ -n "$bin" ] || [ -n "$collector" ] || { echo "$0: --bin must name the built outpost binary" >&2; exit 64; }
[ -z "$bin" ] || [ -x "$bin" ] || { echo "$0: --bin must name the built outpost binary" >&2; exit 64; }
# The version: --version, else the newest released section of CHANGELOG.md, else Cargo's.
if [ -z "$version" ]; then
  version="$(grep -m1 -oE '^## \[[0-9]+\.[0-9]+\.[0-9]+\]' "$ROOT/CHANGELOG.md" | grep -oE '[0-9.]+' || true)"
  [ -n "$version" ] || version="$(grep -m1 -E '^version = ' "$ROOT/Cargo.toml" | cut -d'"' -f2)"
fi
case "$arch" in
  x86_64) deb_arch=amd64; rpm_arch=x86_64 ;;
  aarch64) deb_arch=arm64; rpm_arch=aarch64 ;;
  *) echo "unsupported architecture $arch" >&2; exit 1 ;;
esac
mkdir -p "$out"
if [ -n "$collector" ]; then
  norpm=""; [ "$rpm" = 1 ] || norpm="--no-rpm"
  "$ROOT/scripts/package-collector.sh" --bin "$collector" --out "$out" --version "$version" --arch "$arch" $norpm
fi
[ -n "$bin" ] || exit 0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The file tree, shared by both formats.
stage="$work/stage"
install -d "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/outpost" "$stage/usr/share/outpost" \
  "$stage/usr/share/doc/outpost" "$stage/usr/share/man/man1"
install -m 0755 "$bin" "$stage/usr/bin/outpost"
strip --strip-unneeded "$stage/usr/bin/outpost" 2>/dev/null || true
install -m 0644 "$ROOT/packaging/outpost.service" "$stage/lib/systemd/system/outpost.service"
install -m 0640 "$ROOT/packaging/outpost.toml" "$stage/etc/outpost/outpost.toml"
for d in "$ROOT"/models/*/; do
  n="$(basename "$d")"
  [ -f "$d/model.onnx" ] || continue
  install -d "$stage/usr/share/outpost/models/$n"
  # The model, its golden vectors and, for a package, its declaration and the files its
  # steps read (symlinked demo models are copied as files).
  install -m 0644 "$d"/* "$stage/usr/share/outpost/models/$n/"
done
install -m 0644 "$ROOT/models/pipelines.json" "$stage/usr/share/outpost/models/pipelines.json"
cp -r "$ROOT/models/registry" "$stage/usr/share/outpost/registry"
find "$stage/usr/share/outpost" -type d -exec chmod 0755 {} + ; find "$stage/usr/share/outpost" -type f -exec chmod 0644 {} +
install -m 0644 "$ROOT/README.md" "$stage/usr/share/doc/outpost/README.md"
install -m 0644 "$ROOT/models/PROVENANCE.md" "$stage/usr/share/doc/outpost/PROVENANCE.md"
install -d "$stage/usr/share/doc/outpost/examples"
install -m 0644 "$ROOT/packaging/keepalived/keepalived.conf" "$stage/usr/share/doc/outpost/examples/keepalived.conf"
gzip -9n -c "$ROOT/packaging/outpost.1" > "$stage/usr/share/man/man1/outpost.1.gz"
copyright_file outpost "$stage/usr/share/doc/outpost/copyright"

# --- .deb ---
deb="$work/deb"
cp -a "$stage" "$deb"
mv "$deb/usr/share/doc/outpost/README.md" "$deb/usr/share/doc/outpost/README.md.keep"
deb_changelog outpost "$version" "$ROOT/CHANGELOG.md" | gzip -9n > "$deb/usr/share/doc/outpost/changelog.gz"
mv "$deb/usr/share/doc/outpost/README.md.keep" "$deb/usr/share/doc/outpost/README.md"
deb_config_override "$deb" outpost /etc/outpost/outpost.toml
install -d "$deb/DEBIAN"
size="$(du -sk --exclude=DEBIAN "$deb" | cut -f1)"
cat > "$deb/DEBIAN/control" <<CTRL
Package: outpost
Version: $version
Architecture: $deb_arch
Maintainer: Outpost maintainers <team@outpost.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.34), adduser, init-system-helpers (>= 1.54~)
Section: net
Priority: optional
Homepage: https://example.invalid/outpost
Description: edge inference agent for CPU-only branch servers
 Outpost serves signed, quantized ONNX models over the Open Inference Protocol
 (KServe V2 REST) and MQTT v5 request/response, with zero-downtime updates,
 canary rollouts, a tamper-evident audit log and store-and-forward upstream.
CTRL
echo "/etc/outpost/outpost.toml" > "$deb/DEBIAN/conffiles"
deb_scripts "$ROOT/packaging/debian" outpost.service "$deb/DEBIAN"
deb_finish "$deb" "$out/outpost_${version}_${deb_arch}.deb"

# --- .rpm ---
[ "$rpm" = 1 ] && rpm_build outpost "$ROOT/packaging/rpm/outpost.spec.in" "$stage" "$version" "$rpm_arch" "$work" "$out"
exit 0
