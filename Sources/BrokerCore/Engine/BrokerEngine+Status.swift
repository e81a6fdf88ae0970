import BrokerProtocol
import Logging

extension BrokerEngine {
  /// What the broker is doing now: its clients, plugins and counters.
  public func status() -> BrokerStatus {
    let inFlight = ledger.ids { if case .inFlight = $0.state { true } else { false } }.count
    let parked = ledger.ids { if case .parked = $0.state { true } else { false } }.count
    let clients = self.clients.values.sorted { $0.id < $1.id }.map { client in
      BrokerStatus.ClientStatus(id: client.id, pid: client.pid, parent: client.parentID, phase: "\(client.phase)",
                                regions: client.regions.pieces.count, faultsOut: client.faultsOut)
    }
    let plugins = routes.values.sorted { $0.name < $1.name }.map { route in
      BrokerStatus.PluginStatus(
        name: route.name, state: route.failover != nil ? "failedOver" : route.failed ? "failed" : route.connection != nil ? "connected" : "away",
        fallback: route.failover?.name, connectedPID: route.connection?.peer.pid ?? 0,
        faultsSent: route.faultsSent, decisionsApplied: route.decisionsApplied, faultsInFlight: route.connection?.inFlight ?? 0,
        missedEvents: route.missedEvents.count, tally: route.tally)
    }
    return BrokerStatus(faults: statistics, faultsInFlight: inFlight, faultsParked: parked, tally: tally, clients: clients, plugins: plugins)
  }

  /// Logs an incident and counts it, in total and for the plugin it concerns.
  func report(_ level: Logger.Level, _ message: Logger.Message, _ kind: Tally.Kind, cause: String? = nil, plugin route: PluginRoute? = nil,
              _ metadata: Logger.Metadata = [:]) {
    tally.count(kind, cause)
    route?.tally.count(kind, cause)
    log(level, message, metadata)
  }
}
