import BrokerCore
import BrokerProtocol
import CLinux
import Glibc

/// A plugin's shared page area, mapped read-only here: decisions name bytes in it.
final class SharedArea {
  let bytes: UnsafeRawBufferPointer

  /// Maps `fd`, which must be a memfd sealed against shrinking (else a
  /// truncation could make our copies fault). At most 256 MiB.
  init(fd: CInt) throws(BrokerError) {
    let size = clinux_sealed_memfd_size(fd)
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

/// The runtime's side of one plugin connection: its socket, the batch of
/// events being collected for it, packets waiting for its socket to drain.
final class PluginLink {
  let id: PluginID
  let socket: PacketSocket
  let events = EventBatchEncoder()
  /// Packets the socket refused (EAGAIN), sent first on EPOLLOUT. Empty on the fast path.
  var backlog = PacketQueue()
  /// Packets of this plugin handled so far (told back to it: shared bytes may be reused).
  var packetsApplied: UInt64 = 0
  var sharedArea: SharedArea?
  /// Queued for a flush at the end of this loop iteration.
  var isDirty = false

  init(id: PluginID, socket: PacketSocket) {
    self.id = id
    self.socket = socket
  }
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
