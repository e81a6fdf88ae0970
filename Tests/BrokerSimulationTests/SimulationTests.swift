import BrokerSimulator
import Foundation
import Testing

/// The engine under the deterministic simulation (`BrokerSimulator`): the
/// regression seeds, and a sample of fresh ones. The volume run (10 million
/// steps) is `uffd-sim` built for release, from `scripts/test.sh`.
@Suite("Simulation")
struct SimulationTests {
  static let regressions: [(seed: UInt64, steps: Int, caught: String)] = {
    let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("regressions.txt").path
    let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
    return text.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: "#", maxSplits: 1)
      let numbers = fields.first?.split(separator: " ").compactMap { UInt64($0) } ?? []
      guard numbers.count == 2 else { return nil }
      return (numbers[0], Int(numbers[1]), fields.count > 1 ? fields[1].trimmingCharacters(in: .whitespaces) : "")
    }
  }()

  @Test("every regression seed passes (each once caught a bug of the engine, reintroduced on purpose or found)")
  func regressionSeeds() {
    #expect(Self.regressions.count >= 5)
    for regression in Self.regressions {
      let simulation = Simulation(seed: regression.seed)
      #expect(throws: Never.self, "seed \(regression.seed) (\(regression.caught))") { try simulation.run(steps: regression.steps) }
    }
  }

  @Test("fresh seeds (SIM_SEEDS, SIM_STEPS for more) run clean, and the schedules reach what they are for")
  func freshSeeds() {
    let environment = ProcessInfo.processInfo.environment
    let seeds = UInt64(environment["SIM_SEEDS"] ?? "") ?? 20
    let steps = Int(environment["SIM_STEPS"] ?? "") ?? 3_000
    let report = SimulationRunner.run(seeds: 1_000..<1_000 + seeds, steps: steps)
    #expect(report.failure == nil, "\(report.failure.map { "\($0)" } ?? "")")
    // A schedule that never faulted, moved memory, forked or crashed a plugin would check nothing.
    #expect(report.statistics.faults > Int(seeds) * 20 && report.statistics.mapChanges > Int(seeds) * 20, "\(report.summary)")
    #expect(report.statistics.forks > 0 && report.statistics.grows > 0 && report.statistics.balloons > 0 && report.statistics.brokerRestarts > 0 && report.statistics.pluginCrashes > 0
            && report.statistics.unreadableFills > 0 && report.statistics.minorFaults > 0, "\(report.summary)")
  }

  @Test("a run is a function of its seed: the same seed twice gives the same trace")
  func deterministic() throws {
    let first = Simulation(seed: 7, tracing: true)
    let second = Simulation(seed: 7, tracing: true)
    try first.run(steps: 1_500)
    try second.run(steps: 1_500)
    #expect(first.trace == second.trace && first.trace.count > 300, "\(first.trace.count) lines: \(first.trace.suffix(30).joined(separator: "\n"))")
  }
}
