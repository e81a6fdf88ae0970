import BrokerProtocol
import CUserfaultfd
import Glibc
import Userfaultfd

/// A plugin's shared page area, mapped read-only here: decisions name bytes in it.
final class SharedArea {
  let bytes: UnsafeRawBufferPointer

  /// Maps `fd`, which must be a memfd sealed against shrinking (else a
  /// truncation could make our copies fault). At most 256 MiB.
  init(fd: CInt) throws(BrokerError) {
    let size = cuffd_sealed_memfd_size(fd)
    guard size > 0, size <= 256 << 20 else {
      throw BrokerError(.malformed, "the shared area must be a memfd sealed against shrinking, of at most 256 MiB")
    }
    guard let pointer = mmap(nil, Int(size), PROT_READ, MAP_SHARED, fd, 0), pointer != MAP_FAILED else {
      throw BrokerError(.io, "cannot map the plugin's shared area")
    }
    bytes = UnsafeRawBufferPointer(start: pointer, count: Int(size))
  }

  deinit { munmap(UnsafeMutableRawPointer(mutating: bytes.baseAddress), bytes.count) }
}

/// One connected plugin process: its socket, the batch of events being
/// collected for it, and packets waiting for its socket to drain.
final class PluginConnection {
  let id: UInt64
  /// When it connected: regions announced before then reached it at connection.
  let connectedAt = monotonicNanoseconds()
  let socket: PacketSocket
  let peer: PeerCredentials
  /// Set once its Hello was accepted.
  @exclusivity(unchecked) var route: PluginRoute?
  let events = EventBatchEncoder()
  /// Packets the socket refused (EAGAIN), sent first on EPOLLOUT. Empty on the fast path.
  @exclusivity(unchecked) var backlog = PacketQueue()
  @exclusivity(unchecked) var inFlight = 0
  @exclusivity(unchecked) var invalidDecisions = 0
  /// Packets of this plugin handled so far (told back to it: shared bytes may be reused).
  @exclusivity(unchecked) var packetsApplied: UInt64 = 0
  @exclusivity(unchecked) var sharedArea: SharedArea?
  /// Queued for a flush at the end of this loop iteration.
  @exclusivity(unchecked) var isDirty = false
  @exclusivity(unchecked) var isClosed = false

  init(id: UInt64, socket: PacketSocket, peer: PeerCredentials) {
    self.id = id
    self.socket = socket
    self.peer = peer
  }

  var name: String { route?.name ?? "(unnamed)" }
}

/// Packets in order, each taken from the front in O(1) (amortized).
struct PacketQueue {
  private var packets: [[UInt8]] = []
  private var head = 0
  /// Bytes queued.
  private(set) var bytes = 0

  var isEmpty: Bool { head == packets.count }
  var first: [UInt8]? { isEmpty ? nil : packets[head] }

  mutating func append(_ packet: UnsafeRawBufferPointer) {
    packets.append(Array(packet))
    bytes += packet.count
  }

  mutating func removeFirst() {
    bytes -= packets[head].count
    head += 1
    // Compact once the sent half dominates, so the array does not grow while it never empties.
    if head == packets.count {
      packets.removeAll(keepingCapacity: true)
      head = 0
    } else if head > 1024 && head * 2 > packets.count {
      packets.removeFirst(head)
      head = 0
    }
  }
}
