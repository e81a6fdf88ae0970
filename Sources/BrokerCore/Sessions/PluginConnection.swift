import BrokerProtocol
import Userfaultfd

/// One connected plugin process: its socket, the batch of events being
/// collected for it, and packets waiting for its socket to drain.
final class PluginConnection {
  let id: UInt64
  let socket: PacketSocket
  let peer: PeerCredentials
  /// Set once its Hello was accepted.
  var route: PluginRoute?
  let events = EventBatchEncoder()
  /// Packets the socket refused (EAGAIN), sent first on EPOLLOUT. Empty on the fast path.
  var backlog: [[UInt8]] = []
  var backlogBytes = 0
  var inFlight = 0
  var invalidDecisions = 0
  /// Queued for a flush at the end of this loop iteration.
  var isDirty = false
  var isClosed = false

  init(id: UInt64, socket: PacketSocket, peer: PeerCredentials) {
    self.id = id
    self.socket = socket
    self.peer = peer
  }

  var name: String { route?.name ?? "(unnamed)" }
}
