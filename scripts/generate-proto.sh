#!/usr/bin/env bash
# Regenerates the protobuf-c code from proto/ into Sources/CBrokerWire.
# With --check, fails if the committed code differs from what protoc-c makes now.
set -euo pipefail
cd "$(dirname "$0")/.."
out=Sources/CBrokerWire
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
protoc-c --proto_path=proto --c_out="$tmp" proto/*.proto
if [[ "${1:-}" == "--check" ]]; then
  for f in "$tmp"/*.pb-c.c; do diff -u "$f" "$out/$(basename "$f")" || { echo "generated code is stale: run scripts/generate-proto.sh" >&2; exit 1; }; done
  for f in "$tmp"/*.pb-c.h; do diff -u "$f" "$out/include/$(basename "$f")" || { echo "generated code is stale: run scripts/generate-proto.sh" >&2; exit 1; }; done
  echo "generated protobuf-c code is current"
  exit 0
fi
mkdir -p "$out/include"
cp "$tmp"/*.pb-c.c "$out/"
cp "$tmp"/*.pb-c.h "$out/include/"
echo "regenerated $out from proto/"
