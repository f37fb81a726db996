#!/usr/bin/env bash
# Rebuilds the demo registry in models/registry from the committed demo models, signed with
# the demo keys in models/registry-keys (demo-only: only the dev profile trusts this root).
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
cargo build -q -p outpost --locked
bin="$ROOT/target/debug/outpost"
keys="$ROOT/models/registry-keys"
mkdir -p "$keys"
[ -f "$keys/demo-root.key" ] || "$bin" keygen --out "$keys/demo-root" --note "DEMO ONLY: published with the repository"
[ -f "$keys/demo-index.key" ] || "$bin" keygen --out "$keys/demo-index" --note "DEMO ONLY: published with the repository"
rm -rf "$ROOT/models/registry"
"$bin" registry init --registry "$ROOT/models/registry" --root-key "$keys/demo-root.key" \
  --index-key "$keys/demo-index.key" --expires 3650d --demo-only
for d in "$ROOT"/models/*/; do
  name="$(basename "$d")"
  [ -f "$d/model.onnx" ] || continue
  case "$name" in
    *-int8-qdq) q=int8-qdq ;;
    *-int8-dyn) q=int8-dynamic ;;
    *) q=fp32 ;;
  esac
  # A directory with package.json publishes the model with its processing steps.
  package=()
  [ -f "$d/package.json" ] && package=(--package "$d/package.json")
  "$bin" model publish "$d/model.onnx" --name "$name" --version 1.0.0 --key "$keys/demo-index.key" \
    --registry "$ROOT/models/registry" --golden "$d/golden.json" --quantization "$q" --expires 3650d \
    "${package[@]}"
done
# The demo pipelines (models/pipelines.json), signed like the index.
"$bin" registry pipelines --registry "$ROOT/models/registry" --key "$keys/demo-index.key" \
  --file "$ROOT/models/pipelines.json" --expires 3650d
