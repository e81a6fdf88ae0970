import BrokerProtocol

/// The plugin a region is routed to. One per plugin name, kept across the
/// plugin's reconnects, so the fault path follows a reference, not a name lookup.
final class PluginRoute {
  let name: String
  /// The live connection serving `name`, or nil while it is away.
  var connection: Plugin?
  /// Non-fault events that happened while no plugin was connected, for its return.
  var missedEvents: [BrokerEvent] = []
  /// When the connection went away (or the route was made without one); nil while connected.
  var lostAt: UInt64?
  /// The plugin that took over this one's regions when it failed (its policy's fallback).
  var failover: PluginRoute?
  /// Gone for good with no fallback: faults of its regions fail closed.
  var failed = false
  /// The supervisor stopped restarting it.
  var givenUp = false
  /// Its counters, across its connections (for the status).
  var faultsSent: UInt64 = 0
  var decisionsApplied: UInt64 = 0
  var faultsRequeued: UInt64 = 0
  var decisionsAppliedByKind = DecisionCounts()
  var invalidDecisions: UInt64 = 0
  var staleDecisionsDropped: UInt64 = 0
  var retries: UInt64 = 0
  var redeliveries: UInt64 = 0
  var swapStoredBytes: UInt64 = 0
  var tally = Tally()

  init(name: String, now: UInt64) {
    self.name = name
    lostAt = now
  }

  /// The events kept for the plugin's return, handed over once.
  func takeMissedEvents() -> [BrokerEvent] {
    defer { missedEvents.removeAll() }
    return missedEvents
  }

  /// The route that serves this one's regions now: itself, or its failover (followed a few levels).
  var effective: PluginRoute {
    var route = self
    for _ in 0..<Self.failoverDepth {
      guard let next = route.failover else { break }
      route = next
    }
    return route
  }

  /// Whether `other` is this route or on its way to `effective`.
  func passes(through other: PluginRoute) -> Bool {
    var route = self
    for _ in 0...Self.failoverDepth {
      if route === other { return true }
      guard let next = route.failover else { return false }
      route = next
    }
    return false
  }

  private static let failoverDepth = 4
}

