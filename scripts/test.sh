#!/usr/bin/env bash
# The test command of the README: set-up, the fuzzing corpus (seeds and past
# crash inputs) replayed through the decoders, the engine's simulation, then
# the whole test suite.
# Tests use real userfaultfds: run as root (or with vm.unprivileged_userfaultfd=1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build --product uffd-fuzz >/dev/null
"$(swift build --show-bin-path)/uffd-fuzz" Tests/Fuzz/corpus
# The engine's deterministic simulation, 10 million steps over 1,000 seeds
# (release build: seconds); a failure prints its seed, trace and replay command.
swift build -c release --product uffd-sim >/dev/null
"$(swift build -c release --show-bin-path)/uffd-sim" --seeds 1000 --steps 10000
# Serial: the kernel tests time blocked threads, and the integration tests run
# whole processes; on a 2-core machine they must not share the cores.
swift test --no-parallel "$@"
