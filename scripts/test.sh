#!/usr/bin/env bash
# The test command of the README: set-up, then the whole test suite.
# Tests use real userfaultfds: run as root (or with vm.unprivileged_userfaultfd=1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift test "$@"
