import BrokerProtocol
import Glibc
import Logging
import Userfaultfd

/// One client process from accept to cleanup: its socket, its userfaultfd and
/// the dispatcher that orders its events, its live regions, its pidfd.
///
/// As the dispatcher's handler it routes each fault to the region's plugin
/// (`.inFlight`: the decision arrives later), and forwards removes, unmaps and
/// remaps to the plugins after updating the region table.
final class ClientSession: UserfaultFDHandler {
  enum Phase {
    case awaitingHello
    case awaitingRegister
    /// Register received; waiting for the plugins to accept its regions.
    case opening
    case active
    case closed
  }

  /// Regions announced to plugins and waiting for their replies.
  struct PendingOpen {
    var requestID: UInt64
    var regions: [RegionSpec]
    var awaiting: Set<UInt64>
    var deadline: UInt64
  }

  let id: UInt64
  let socket: PacketSocket
  let peer: PeerCredentials
  unowned let broker: Broker
  var phase = Phase.awaitingHello
  var pid: Int32 = 0
  var uffd: UserfaultFD?
  var dispatcher: EventDispatcher?
  var regions = RegionTable()
  var pidfd: CInt = -1
  var pendingOpen: PendingOpen?

  init(id: UInt64, socket: PacketSocket, peer: PeerCredentials, broker: Broker) {
    self.id = id
    self.socket = socket
    self.peer = peer
    self.broker = broker
  }

  deinit { closeDescriptor(pidfd) }

  // MARK: UserfaultFDHandler

  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    guard let piece = regions.piece(containing: fault.address) else {
      // Not in a live region: it was unmapped or removed just now. Wake the
      // thread; its access re-faults against the new mappings.
      _ = uffd.wake(address: fault.address, length: systemPageSize)
      return .resolved
    }
    return broker.sendFault(fault, piece: piece, session: self)
  }

  func removed(_ range: Range<UInt>) {
    for part in regions.overlapping(range) {
      broker.sendEvent(.removed(RangeEvent(clientID: id, regionID: part.piece.spec.id, range: part.range, startOffset: part.piece.offset(of: part.range.lowerBound))), to: part.piece.route)
    }
  }

  func unmapped(_ range: Range<UInt>) {
    for part in regions.cut(range) {
      broker.sendEvent(.unmapped(RangeEvent(clientID: id, regionID: part.piece.spec.id, range: part.range, startOffset: part.piece.offset(of: part.range.lowerBound))), to: part.piece.route)
    }
  }

  func remapped(from: UInt, to: UInt, length: Int) {
    for piece in regions.move(from: from, to: to, length: length) {
      let newBase = piece.live.lowerBound &- UInt(piece.offset)
      broker.sendEvent(.remapped(RemapEvent(clientID: id, regionID: piece.spec.id, from: from + (piece.live.lowerBound - to), to: piece.live.lowerBound, length: piece.live.count, newBase: newBase)), to: piece.route)
    }
  }

  func forked(_ child: UserfaultFD) {
    // Fork events are not requested by the client SDK; a child uffd we did not
    // ask for is dropped (its ranges then fault as plain anonymous memory).
    broker.logger.notice("client forked; the child's userfaultfd is not served", metadata: ["client.id": "\(id)"])
  }

  func closed(_ error: UserfaultFDError?) {
    if let error, phase != .closed {
      broker.logger.warning("client userfaultfd failed", metadata: ["client.id": "\(id)", "error": "\(error)"])
    }
  }
}
