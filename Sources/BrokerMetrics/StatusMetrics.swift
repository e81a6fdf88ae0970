import BrokerProtocol
import CoreMetrics
import Prometheus

/// The broker's status as swift-metrics counters and gauges in one Prometheus
/// registry: each `update` moves the counters by what grew since the last
/// snapshot and sets the gauges to the snapshot's values.
///
/// 1. Totals have names of their own (`uffd_broker_faults_sent_total`), per
///    plugin figures a `plugin` label (`uffd_broker_plugin_faults_sent_total{plugin=...}`):
///    a Prometheus family is all labelled or not at all.
/// 2. A series appears when it is first set; core totals from the first update.
/// 3. The series of a plugin name the engine forgot (`maxPluginNames`) are
///    destroyed, so the registry stays bounded.
/// 4. A counter that went back (a plugin name forgotten and seen again) counts
///    from its new value, as Prometheus reads a counter reset.
///
/// Not thread-safe: its owner (`MetricsExporter`) holds it under a lock.
struct StatusMetrics {
  private let factory: PrometheusMetricsFactory
  private var counters: [SeriesKey: (counter: CoreMetrics.Counter, last: UInt64)] = [:]
  private var gauges: [SeriesKey: CoreMetrics.Gauge] = [:]
  /// The series of each plugin name, to destroy when the name goes.
  private var pluginSeries: [String: Set<SeriesKey>] = [:]

  struct SeriesKey: Hashable {
    var name: String
    var labels: [String]
  }

  init(registry: PrometheusCollectorRegistry) {
    factory = PrometheusMetricsFactory(registry: registry)
  }

  /// The percentiles the status keeps, as summary quantiles ("1": the maximum).
  static func quantiles(_ latency: BrokerStatus.Latency) -> [(label: String, microseconds: UInt64)] {
    [("0.5", latency.p50), ("0.9", latency.p90), ("0.99", latency.p99), ("0.999", latency.p999), ("1", latency.max)]
  }

  mutating func update(from status: BrokerStatus) {
    let faults = status.faults
    count("faults_sent_total", UInt64(faults.faultsSent))
    count("faults_resolved_total", faults.faultsResolved)
    count("faults_resolved_locally_total", UInt64(faults.resolvedLocally))
    count("faults_new_memory_total", UInt64(faults.newMemoryFills))
    count("faults_minor_total", faults.minorFaultsResolved)
    count("faults_failed_closed_total", UInt64(faults.failedClosed))
    count("fault_redeliveries_total", faults.redeliveries)
    count("decisions_invalid_total", UInt64(faults.invalidDecisions))
    count("decisions_stale_total", UInt64(faults.staleDecisionsDropped))
    count("decisions_retry_total", UInt64(faults.retries))
    decisions("decisions_applied_total", faults.decisionsAppliedByKind, [])
    count("swap_stored_bytes_total", faults.swapStoredBytes)
    count("swapped_out_bytes_total", faults.swappedOutBytes)
    count("swapped_lost_bytes_total", faults.swappedBytesLost)
    for (cause, value) in causes(of: .decisionRefused, in: status.tally) { count("decisions_refused_total", value, ["cause", cause]) }
    for kind in Tally.Kind.allCases where status.tally[kind] > 0 { count("incidents_total", status.tally[kind], ["kind", kind.rawValue]) }

    gauge("faults_in_flight", Double(status.faultsInFlight))
    gauge("faults_parked", Double(status.faultsParked))
    gauge("clients", Double(status.clients.count))
    gauge("regions", Double(status.clients.reduce(0) { $0 + $1.regions }))
    gauge("plugins_connected", Double(status.plugins.filter { $0.state == "connected" }.count))
    gauge("open_descriptors", Double(status.descriptors))
    gauge("descriptor_limit", Double(status.descriptorLimit))
    gauge("uptime_seconds", status.uptimeSeconds)
    let latency = status.faultLatencyMicroseconds
    count("fault_latency_observations_total", latency.count)
    for quantile in Self.quantiles(latency) { gauge("fault_latency_seconds", Double(quantile.microseconds) / 1e6, ["quantile", quantile.label]) }

    var seen = Set<String>()
    for plugin in status.plugins {
      seen.insert(plugin.name)
      let name = ["plugin", plugin.name]
      count("plugin_faults_sent_total", plugin.faultsSent, name)
      decisions("plugin_decisions_applied_total", plugin.decisionsAppliedByKind, name)
      count("plugin_decisions_invalid_total", plugin.invalidDecisions, name)
      count("plugin_decisions_stale_total", plugin.staleDecisionsDropped, name)
      count("plugin_decisions_retry_total", plugin.retries, name)
      count("plugin_fault_redeliveries_total", plugin.redeliveries, name)
      count("plugin_faults_requeued_total", plugin.faultsRequeued, name)
      count("plugin_swap_stored_bytes_total", plugin.swapStoredBytes, name)
      // Every start after the first, failed or not.
      let starts = plugin.tally[.pluginSpawned] + plugin.tally[.pluginSpawnFailed]
      count("plugin_restarts_total", starts > 0 ? starts - 1 : 0, name)
      count("plugin_failovers_total", plugin.tally[.pluginFailedOver], name)
      for (cause, value) in causes(of: .decisionRefused, in: plugin.tally) { count("plugin_decisions_refused_total", value, name + ["cause", cause]) }
      for kind in Tally.Kind.allCases where plugin.tally[kind] > 0 { count("plugin_incidents_total", plugin.tally[kind], name + ["kind", kind.rawValue]) }
      gauge("plugin_up", plugin.state == "connected" ? 1 : 0, name)
      gauge("plugin_faults_in_flight", Double(plugin.faultsInFlight), name)
      gauge("plugin_faults_parked", Double(plugin.faultsParked), name)
      gauge("plugin_missed_events", Double(plugin.missedEvents), name)
    }
    for (plugin, series) in pluginSeries where !seen.contains(plugin) {
      for key in series {
        counters.removeValue(forKey: key)?.counter.destroy()
        gauges.removeValue(forKey: key)?.destroy()
      }
      pluginSeries[plugin] = nil
    }
  }

  private mutating func decisions(_ name: String, _ counts: DecisionCounts, _ labels: [String]) {
    for (kind, value) in [("copy", counts.copy), ("zero", counts.zero), ("poison", counts.poison)] { count(name, value, labels + ["kind", kind]) }
  }

  /// The tally's `kind.cause` entries of `kind`.
  private func causes(of kind: Tally.Kind, in tally: Tally) -> [(String, UInt64)] {
    let prefix = kind.rawValue + "."
    return tally.counts.filter { $0.key.hasPrefix(prefix) }.map { (String($0.key.dropFirst(prefix.count)), $0.value) }
  }

  /// `labels`: names and values, alternating.
  private mutating func count(_ name: String, _ value: UInt64, _ labels: [String] = []) {
    let key = SeriesKey(name: "uffd_broker_" + name, labels: labels)
    var entry = counters[key] ?? (CoreMetrics.Counter(label: key.name, dimensions: Self.dimensions(labels), factory: factory), 0)
    if counters[key] == nil { remember(key) }
    let delta = value >= entry.last ? value - entry.last : value
    if delta > 0 { entry.counter.increment(by: delta) }
    entry.last = value
    counters[key] = entry
  }

  private mutating func gauge(_ name: String, _ value: Double, _ labels: [String] = []) {
    let key = SeriesKey(name: "uffd_broker_" + name, labels: labels)
    let gauge = gauges[key] ?? CoreMetrics.Gauge(label: key.name, dimensions: Self.dimensions(labels), factory: factory)
    if gauges[key] == nil {
      gauges[key] = gauge
      remember(key)
    }
    gauge.record(value)
  }

  private mutating func remember(_ key: SeriesKey) {
    if key.labels.first == "plugin", key.labels.count >= 2 { pluginSeries[key.labels[1], default: []].insert(key) }
  }

  private static func dimensions(_ labels: [String]) -> [(String, String)] {
    stride(from: 0, to: labels.count - 1, by: 2).map { (labels[$0], labels[$0 + 1]) }
  }
}
