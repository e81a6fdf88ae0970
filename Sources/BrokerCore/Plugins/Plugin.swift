import BrokerProtocol

/// What the engine knows of one plugin connection. Its socket, the batch of
/// events being collected for it and its shared area's mapping are the runtime's.
final class Plugin {
  let id: PluginID
  let peer: PeerCredentials
  /// When it connected: regions announced before then reached it at connection.
  let connectedAt: UInt64
  /// Set once its Hello was accepted.
  var route: PluginRoute?
  /// Faults sent to it and not answered (kept by the `FaultLedger`).
  var inFlight = 0
  var invalidDecisions = 0
  /// The size of the shared area it mapped for the broker (0: none).
  var sharedAreaSize = 0
  var isClosed = false
  /// For a plugin the broker spawned (connected through a socket pair, not
  /// the plugin socket): the one name its Hello may give.
  let spawnedAs: String?

  init(id: PluginID, peer: PeerCredentials, connectedAt: UInt64, spawnedAs: String? = nil) {
    self.id = id
    self.peer = peer
    self.connectedAt = connectedAt
    self.spawnedAs = spawnedAs
  }

  var name: String { route?.name ?? "(unnamed)" }
}
