#!/usr/bin/env bash
# Regenerates the Python SDK's protobuf module (sdk/python/uffd_plugin/broker_pb2.py)
# from proto/broker.proto with protoc (Debian's protobuf-compiler; its runtime
# is python3-protobuf, the same release, which the generated code needs at least).
# With --check, fails if the committed module differs from what protoc makes now.
set -euo pipefail
cd "$(dirname "$0")/.."
out=sdk/python/uffd_plugin/broker_pb2.py
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
protoc --proto_path=proto --python_out="$tmp" proto/broker.proto
if [[ "${1:-}" == "--check" ]]; then
  diff -u "$tmp/broker_pb2.py" "$out" || { echo "generated Python code is stale: run scripts/generate-python-proto.sh" >&2; exit 1; }
  echo "generated Python protobuf code is current"
  exit 0
fi
cp "$tmp/broker_pb2.py" "$out"
echo "regenerated $out from proto/"
