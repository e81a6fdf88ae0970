import BrokerProtocol
import Histogram

/// How long faults took, from the broker's read to the fill that resolved them,
/// on the loop's clock (stamped once per wakeup: a fault read and filled in one
/// wakeup took 0). An HdrHistogram: its counts are allocated once, so recording
/// on the fault path allocates nothing.
struct FaultLatency {
  /// Microseconds; a fault that took longer counts as this.
  static let highest: UInt64 = 60_000_000
  private var histogram = Histogram<UInt64>(highestTrackableValue: highest, numberOfSignificantValueDigits: .two)

  mutating func record(_ nanoseconds: UInt64) {
    _ = histogram.record(min(nanoseconds / 1000, Self.highest))
  }

  var summary: BrokerStatus.Latency {
    var summary = BrokerStatus.Latency()
    summary.count = histogram.totalCount
    guard summary.count > 0 else { return summary }
    summary.p50 = histogram.valueAtPercentile(50)
    summary.p90 = histogram.valueAtPercentile(90)
    summary.p99 = histogram.valueAtPercentile(99)
    summary.p999 = histogram.valueAtPercentile(99.9)
    summary.max = histogram.max
    return summary
  }
}
