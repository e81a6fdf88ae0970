/// Mean and percentiles of one round's fault latencies (ns), as the C reference computes them.
struct LatencySummary {
  var count = 0
  var mean = 0.0
  var p50: UInt64 = 0
  var p99: UInt64 = 0

  init() {}

  /// Sorts `samples` in place.
  init(_ samples: inout [UInt64]) {
    count = samples.count
    guard count > 0 else { return }
    samples.sort()
    mean = Double(samples.reduce(0, &+)) / Double(count)
    p50 = samples[count / 2]
    p99 = samples[Int(Double(count) * 0.99)]
  }
}

/// Everything measured in one round of one mode.
struct RoundResult {
  var mode: String
  var round: Int
  var pages: Int
  /// Faults resolved: by the handler (in-process), by the plugins (brokered),
  /// or the process's minor faults (plain).
  var faults: Int
  var wallNs: UInt64
  var latency: LatencySummary
  /// This process (faulting threads, and the handler thread in-process): CPU time and malloc calls in the timed window.
  var benchUserNs: UInt64
  var benchSystemNs: UInt64
  var benchMallocCalls: UInt64
  /// Deltas over the timed window, when a broker served the round.
  var broker: ChildStats?
  var plugins: ChildStats?
  var wrongPages: Int

  var pagesPerSecond: Double { Double(pages) / (Double(wallNs) / 1e9) }
  var faultsPerSecond: Double { Double(faults) / (Double(wallNs) / 1e9) }
  /// Per fault, in µs / calls.
  var benchCPUPerFault: Double { perFault(benchUserNs &+ benchSystemNs) }
  var benchUserPerFault: Double { perFault(benchUserNs) }
  var benchSystemPerFault: Double { perFault(benchSystemNs) }
  var benchMallocsPerFault: Double { Double(benchMallocCalls) / Double(max(faults, 1)) }
  var brokerCPUPerFault: Double? { broker.map { perFault($0.cpuNs) } }
  var brokerUserPerFault: Double? { broker.map { perFault($0.userNs) } }
  var brokerSystemPerFault: Double? { broker.map { perFault($0.systemNs) } }
  var brokerMallocsPerFault: Double? { broker.map { Double($0.mallocCalls) / Double(max(faults, 1)) } }
  var pluginCPUPerFault: Double? { plugins.map { perFault($0.cpuNs) } }
  var pluginUserPerFault: Double? { plugins.map { perFault($0.userNs) } }
  var pluginSystemPerFault: Double? { plugins.map { perFault($0.systemNs) } }
  var pluginMallocsPerFault: Double? { plugins.map { Double($0.mallocCalls) / Double(max(faults, 1)) } }
  /// ns → µs per fault.
  private func perFault(_ ns: UInt64) -> Double { Double(ns) / 1e3 / Double(max(faults, 1)) }
  var totalCPUPerFault: Double { benchCPUPerFault + (brokerCPUPerFault ?? 0) + (pluginCPUPerFault ?? 0) }
}

enum Statistics {
  static func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return .nan }
    let sorted = values.sorted()
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
  }
}
