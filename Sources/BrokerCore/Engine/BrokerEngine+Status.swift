import BrokerProtocol
import Logging

extension BrokerEngine {
  /// What the broker is doing now: its clients, plugins and counters (the
  /// runtime adds what only it knows: its pid, uptime, spawned processes).
  public func status() -> BrokerStatus {
    var status = BrokerStatus()
    status.faults = statistics
    status.faultsInFlight = ledger.ids { if case .inFlight = $0.state { true } else { false } }.count
    status.faultsParked = ledger.ids { if case .parked = $0.state { true } else { false } }.count
    status.tally = tally
    status.clients = clients.values.sorted { $0.id < $1.id }.map { client in
      var entry = BrokerStatus.ClientStatus()
      entry.id = client.id
      entry.pid = client.pid
      entry.parent = client.parentID
      entry.phase = "\(client.phase)"
      entry.regions = client.regions.pieces.count
      entry.faultsOut = client.faultsOut
      return entry
    }
    status.plugins = routes.values.sorted { $0.name < $1.name }.map { route in
      var entry = BrokerStatus.PluginStatus()
      entry.name = route.name
      entry.state = route.failover != nil ? "failedOver" : route.failed ? "failed" : route.connection != nil ? "connected" : "away"
      entry.fallback = route.failover?.name
      entry.connectedPID = route.connection?.peer.pid ?? 0
      entry.connection = route.connection?.id ?? 0
      entry.faultsSent = route.faultsSent
      entry.decisionsApplied = route.decisionsApplied
      entry.faultsInFlight = route.connection?.inFlight ?? 0
      entry.missedEvents = route.missedEvents.count
      entry.faultsRequeued = route.faultsRequeued
      entry.tally = route.tally
      return entry
    }
    return status
  }

  /// Logs an incident and counts it, in total and for the plugin it concerns.
  func report(_ level: Logger.Level, _ message: Logger.Message, _ kind: Tally.Kind, cause: String? = nil, plugin route: PluginRoute? = nil,
              _ metadata: Logger.Metadata = [:]) {
    tally.count(kind, cause)
    route?.tally.count(kind, cause)
    log(level, message, metadata)
  }
}
