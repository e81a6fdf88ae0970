import BrokerProtocol

/// One connection on the control socket: a command read, its reply sent, closed.
final class ControlLink {
  let id: UInt64
  let socket: PacketSocket
  /// When it connected: a peer that neither asks nor reads is closed after `ControlLink.timeout`.
  let openedAt: UInt64
  /// The reply's packets not yet sent; nil until the command is read.
  var reply: PacketQueue?

  /// Connections at once; more are refused (a peer must not hold the broker's memory).
  static let maxConnections = 8
  static let timeout: UInt64 = 5_000_000_000

  init(id: UInt64, socket: PacketSocket, openedAt: UInt64) {
    self.id = id
    self.socket = socket
    self.openedAt = openedAt
  }
}
