import BrokerProtocol
import Glibc
import LinuxSupport
import Userfaultfd

/// What a Firecracker-style VMM sends its page-fault handler when it restores
/// a snapshot (`mem_backend: Uffd`): it connects to the handler's SOCK_STREAM
/// socket and sends one JSON array of GuestRegionUffdMapping with its
/// userfaultfd attached (SCM_RIGHTS). Shared by the fake VMM and the KVM VMM.
struct FirecrackerHandshake {
  let socketPath: String

  /// One guest region: where it is mapped in the VMM, how long, and where its
  /// bytes start in the snapshot's memory file. `legacyPageSize` names its page
  /// size `page_size_kib` (the deprecated field, which also counts bytes).
  struct Region {
    var address: UInt
    var size: Int
    var offset: UInt64
    var legacyPageSize = false
    var pageSize = systemPageSize
  }

  /// The mappings as Firecracker writes them.
  static func json(_ regions: [Region]) -> String {
    let objects = regions.map { region in
      let key = region.legacyPageSize ? "page_size_kib" : "page_size"
      return #"{"base_host_virt_addr": \#(region.address), "size": \#(region.size), "offset": \#(region.offset), "\#(key)": \#(region.pageSize)}"#
    }
    return "[" + objects.joined(separator: ",\n ") + "]"
  }

  /// Connects and sends `message` with `uffd` attached; returns the connection,
  /// which the VMM keeps open for the guest's life.
  func send(_ message: String, uffd: UserfaultFD) throws -> PacketSocket {
    let connection = try connect()
    let sent = Array(message.utf8).withUnsafeBytes { bytes in
      [uffd.fileDescriptor.rawValue].withUnsafeBufferPointer { fds in try? connection.send(bytes, fds: fds) }
    }
    guard sent == .sent else { throw BrokerError(.io, "cannot send the mappings") }
    return connection
  }

  private func connect() throws -> PacketSocket {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { path in
      for (index, byte) in socketPath.utf8.prefix(path.count - 1).enumerated() { path[index] = byte }
    }
    let connected = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard fd >= 0, connected == 0 else { throw BrokerError(.io, "cannot connect to \(socketPath): errno \(errno)") }
    return PacketSocket(adopting: fd)
  }
}
