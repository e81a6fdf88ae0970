#!/usr/bin/env bash
# The main job of the README: set-up, then the demo (broker + plugins + client workload).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The demo starts the broker and plugins from beside its own executable: build them all.
for product in uffd-broker snapshot-plugin swap-plugin zero-fill-plugin uffd-demo; do
  swift build -c release --product "$product" >&2
done
exec "$(swift build -c release --show-bin-path)/uffd-demo" "$@"
