#!/usr/bin/env bash
# The main job of the README: set-up, then the demo (broker + plugins + client workload).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build -c release --product uffd-demo >&2
exec swift run -c release --skip-build uffd-demo "$@"
