import BrokerSimulator
import Glibc

/// `uffd-sim`: runs the broker engine's deterministic simulation over many
/// seeds. `uffd-sim --seeds 1000 --steps 10000` (default: 200 seeds of 5,000
/// steps); `uffd-sim --seed N [--steps S] [--full]` replays one seed and
/// prints the trace of its shortest failing prefix (its last 80 lines, or all).
let arguments = CommandLine.arguments.dropFirst()
func value(_ flag: String) -> UInt64? {
  guard let index = arguments.firstIndex(of: flag), arguments.index(after: index) < arguments.endIndex else { return nil }
  return UInt64(arguments[arguments.index(after: index)])
}
let steps = Int(value("--steps") ?? 5_000)
if let seed = value("--seed") {
  if let failure = SimulationRunner.minimalFailure(seed: seed, steps: steps) {
    if arguments.contains("--full") { print(failure.trace.joined(separator: "\n")) }
    print(failure)
    exit(1)
  }
  print("seed \(seed): \(steps) steps, no failure")
} else {
  let first = value("--first") ?? 1
  let seeds = value("--seeds") ?? 200
  let report = SimulationRunner.run(seeds: first..<first + seeds, steps: steps)
  print(report.summary)
  if let failure = report.failure {
    print(failure)
    exit(1)
  }
}
