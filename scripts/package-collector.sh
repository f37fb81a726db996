#!/usr/bin/env bash
# Builds outpost-collector_<version>_<arch>.deb and outpost-collector-<version>-1.<arch>.rpm
# from an already-built binary. Called by scripts/package.sh --collector BIN.
#   scripts/package-collector.sh --bin BIN --out DIR --version V --arch x86_64|aarch64 [--no-rpm]
. "$(dirname "$0")/lib.sh"
bin="" out="" version="" rpm=1 arch="$(uname -m)"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --no-rpm) rpm=0; shift ;;
    --arch) arch="$2"; shift 2 ;;
    *) echo "usage: $0 --bin BINARY --out DIR --version V [--arch A] [--no-rpm]" >&2; exit 64 ;;
  esac
done
[ -x "$bin" ] && [ -n "$out" ] && [ -n "$version" ] || { echo "$0: --bin, --out and --version are required" >&2; exit 64; }
case "$arch" in
  x86_64) deb_arch=amd64; rpm_arch=x86_64 ;;
  aarch64) deb_arch=arm64; rpm_arch=aarch64 ;;
  *) echo "unsupported architecture $arch" >&2; exit 1 ;;
esac
P="$ROOT/packaging/collector"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/stage"
install -d "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/outpost-collector" \
  "$stage/usr/share/doc/outpost-collector" "$stage/usr/share/man/man1"
install -m 0755 "$bin" "$stage/usr/bin/outpost-collector"
strip --strip-unneeded "$stage/usr/bin/outpost-collector" 2>/dev/null || true
install -m 0644 "$P/outpost-collector.service" "$stage/lib/systemd/system/outpost-collector.service"
install -m 0640 "$P/collector.toml" "$stage/etc/outpost-collector/collector.toml"
install -m 0644 "$ROOT/README.md" "$stage/usr/share/doc/outpost-collector/README.md"
gzip -9n -c "$P/outpost-collector.1" > "$stage/usr/share/man/man1/outpost-collector.1.gz"
copyright_file outpost-collector "$stage/usr/share/doc/outpost-collector/copyright"

# --- .deb ---
deb="$work/deb"
cp -a "$stage" "$deb"
{
  echo "outpost-collector ($version) stable; urgency=medium"
  echo
  echo "  * Release $version; see README.md."
  echo
  echo " -- Outpost maintainers <team@outpost.invalid>  $(date -R -d @0)"
} | gzip -9n > "$deb/usr/share/doc/outpost-collector/changelog.gz"
deb_config_override "$deb" outpost-collector /etc/outpost-collector/collector.toml
install -d "$deb/DEBIAN"
size="$(du -sk --exclude=DEBIAN "$deb" | cut -f1)"
cat > "$deb/DEBIAN/control" <<CTRL
Package: outpost-collector
Version: $version
Architecture: $deb_arch
Maintainer: Outpost maintainers <team@outpost.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.34), adduser, init-system-helpers (>= 1.54~)
Recommends: postgresql
Section: net
Priority: optional
Homepage: https://example.invalid/outpost
Description: fleet collector for Outpost edge inference agents
 Receives the agents' audit chains, heartbeats and telemetry into PostgreSQL,
 witnesses each node's hash chain and signed checkpoints, and shows the fleet
 as JSON, a table, a web page and Prometheus metrics.
CTRL
echo "/etc/outpost-collector/collector.toml" > "$deb/DEBIAN/conffiles"
deb_scripts "$P" outpost-collector.service "$deb/DEBIAN"
deb_finish "$deb" "$out/outpost-collector_${version}_${deb_arch}.deb"

# --- .rpm ---
[ "$rpm" = 1 ] && rpm_build outpost-collector "$P/outpost-collector.spec.in" "$stage" "$version" "$rpm_arch" "$work" "$out"
exit 0
