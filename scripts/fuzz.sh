#!/usr/bin/env bash
# Fuzzes the decoding of both sockets (ClientToBroker, BrokerToClient,
# PluginToBroker, BrokerToPlugin) with libFuzzer: Tests/Fuzz/uffd-fuzz.
#
#   scripts/fuzz.sh [seconds] [extra libFuzzer args...]
#
# seconds: how long to fuzz (default 60; 0 = no time limit, e.g. with -runs=N).
# Exits non-zero if libFuzzer finds a crash, a trap, a sanitizer report, a
# timeout or an out-of-memory; the input that did it is left in fuzz-crashes/
# (outside git). Replay one, with a symbolized stack, with:
#   SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=handle_sigill=1 .build-fuzz/release/uffd-fuzz fuzz-crashes/crash-...
# See Tests/Fuzz/README.md.
#
# Corpus: Tests/Fuzz/corpus (committed) holds the seeds, valid packets of every
# message type written by the real encoders (rewritten here before each run, so
# they follow the schema), and the inputs of past crashes (regressions). New
# interesting inputs go to .build-fuzz/corpus, which grows across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
(($# > 0)) && shift
scratch=.build-fuzz
corpus=Tests/Fuzz/corpus
work=$scratch/corpus
crashes=fuzz-crashes

# The build, in its own scratch path (the project's .build is left alone).
# - `--sanitize=fuzzer` tells SwiftPM that libFuzzer provides `main`: it then
#   links with -sanitize=fuzzer (libFuzzer's runtime and its `main`) and drops
#   the `--defsym main=uffd_fuzz_main` it otherwise adds to an executable (it
#   compiles an executable's entry point as uffd_fuzz_main). -DFUZZING removes
#   the target's `@main`, so with -parse-as-library the module defines no entry
#   point at all and libFuzzer's `main` is the program's.
# - `-Xswiftc -sanitize=fuzzer,address`: coverage + comparison instrumentation
#   and ASan, in ONE flag: swiftc honours only the last -sanitize= it is given,
#   so `--sanitize=fuzzer --sanitize=address` would silently drop one of the two
#   (whichever SwiftPM happens to list first). -Xswiftc flags come last.
# - `-Xcc -fsanitize=address`: ASan for the C targets too (CBrokerWire, the
#   generated descriptors; `--sanitize=fuzzer` already gives them coverage).
# - release: -O keeps Swift's overflow and bounds traps, and runs several
#   times faster than debug.
# libprotobuf-c itself is Debian's shared library: it runs uninstrumented (no
# coverage feedback from inside it; its memcpy calls are still checked by ASan).
scripts/setup.sh
swift build --scratch-path "$scratch" -c release --product uffd-fuzz \
  --sanitize=fuzzer -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=address -Xswiftc -DFUZZING
fuzzer=$scratch/release/uffd-fuzz
# A fuzzer without instrumentation runs happily and finds nothing: check it.
objects=$scratch/release/BrokerProtocol.build
undefined=$(nm -u "$objects/PluginWire.swift.o")
if [[ $undefined != *__sanitizer_cov_trace* || $undefined != *__asan_* ]]; then
  echo "fuzz.sh: $objects is not instrumented (coverage and ASan); the build flags did not take" >&2
  exit 2
fi

mkdir -p "$corpus" "$work" "$crashes"
"$fuzzer" --write-seeds "$corpus"

# One input is a selector byte, then the packet: the packet limit is
# PacketSocket.maxPacketSize = 262144 bytes, so inputs are at most 262145.
# A Swift trap (overflow, bounds, fatalError) is a SIGILL: handle_sigill makes
# ASan report it with a symbolized stack (file:line); Swift's own backtracer
# is switched off (its memory reader trips ASan). -len_control=100 is
# libFuzzer's default, which a custom mutator (Fuzz.swift has one) turns off:
# without it inputs jump to -max_len at once and runs are 10x slower.
before=$(ls "$crashes" | wc -l)
status=0
SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:handle_sigill=1} \
"$fuzzer" "$work" "$corpus" \
  -max_total_time="$seconds" \
  -max_len=262145 \
  -len_control=100 \
  -dict=Tests/Fuzz/protobuf.dict \
  -rss_limit_mb=2048 \
  -timeout=10 \
  -artifact_prefix="$crashes/" \
  -print_final_stats=1 \
  "$@" || status=$?

# With -fork=N -ignore_crashes=1 libFuzzer goes on (and exits 0) after a crash:
# a new file in the crash directory fails the run all the same.
found=$(($(ls "$crashes" | wc -l) - before))
if ((status == 0 && found > 0)); then status=1; fi
if ((status != 0)); then
  echo "fuzz.sh: libFuzzer exited with status $status, $found new input(s) in $crashes/:" >&2
  ls -t "$crashes" | head -5 >&2
  echo "fuzz.sh: minimize it with: $fuzzer -minimize_crash=1 -runs=100000 -artifact_prefix=$crashes/min- $crashes/<file>" >&2
  exit "$status"
fi
echo "fuzz.sh: no crash (corpus: $work, $corpus)"
