/// Runs simulations over many seeds, and shrinks a failure to the shortest
/// failing prefix of its schedule (the runs of one seed are prefixes of each other).
public enum SimulationRunner {
  public struct Report {
    public var seeds = 0
    public var steps = 0
    public var statistics = Simulation.Statistics()
    public var failure: Simulation.Failure?
    public var summary: String {
      "\(seeds) seeds, \(steps) steps: \(statistics.faults) faults, \(statistics.fills) fills, \(statistics.mapChanges) map changes, "
        + "\(statistics.grows) grows, \(statistics.balloons) balloons, \(statistics.forks) forks, \(statistics.brokerRestarts) broker restarts, \(statistics.pluginCrashes) plugin crashes, \(statistics.unreadableFills) EFAULT fills, \(statistics.minorFaults) minor faults, \(statistics.streamedBlocks) streamed blocks, \(statistics.clientsServed) clients served to the end, "
        + "\(statistics.failedClosed) pages failed closed by design, \(statistics.exposedByKeepers) exposed by keepers (a known hole)"
        + (failure.map { ": FAILED at seed \($0.seed) (replay: swift run -c release uffd-sim --seed \($0.seed) --steps \($0.scheduleSteps))" } ?? ": no failure")
    }
  }

  /// Runs each seed for `steps` steps; stops at the first failure, shrunk.
  public static func run(seeds: Range<UInt64>, steps: Int) -> Report {
    var report = Report()
    for seed in seeds {
      let simulation = Simulation(seed: seed)
      do {
        try simulation.run(steps: steps)
      } catch {
        report.failure = minimalFailure(seed: seed, steps: steps) ?? error
        return report
      }
      report.seeds += 1
      report.steps += simulation.statistics.steps
      report.statistics.add(simulation.statistics)
    }
    return report
  }

  /// The failure of `seed` with the fewest schedule steps (before settling),
  /// traced; nil if `steps` steps do not fail.
  public static func minimalFailure(seed: UInt64, steps: Int) -> Simulation.Failure? {
    func failure(_ steps: Int, tracing: Bool = false) -> Simulation.Failure? {
      do {
        try Simulation(seed: seed, tracing: tracing).run(steps: steps)
        return nil
      } catch {
        return error
      }
    }
    guard failure(steps) != nil else { return nil }
    var low = 0, high = steps  // high fails
    while low < high {
      let middle = (low + high) / 2
      if failure(middle) != nil { high = middle } else { low = middle + 1 }
    }
    return failure(high, tracing: true)
  }
}
