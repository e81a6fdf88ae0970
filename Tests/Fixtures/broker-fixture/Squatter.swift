import BrokerProtocol
import Glibc

/// Another user's fake broker: drops to uid/gid 65534 (nobody), listens at
/// `path` (bound beside it and renamed into place once listening, so whoever
/// sees the path can connect), accepts `connections` connections one after
/// the other, reads each until its peer closes it, and counts what the peers
/// sent. The last line of stdout says it; a peer that checks who listens sends nothing.
struct Squatter {
  let path: String
  let connections: Int

  func run() -> Int32 {
    alarm(60)  // never outlive a test that forgot it
    guard setgroups(0, nil) == 0, setgid(65534) == 0, setuid(65534) == 0 else {
      print("cannot drop privileges: \(errno)")
      return 2
    }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
    defer { buffer.deallocate() }
    var packets = 0
    var descriptors = 0
    do {
      let listener = try PacketListener(path: path + ".new", mode: 0o666)
      guard rename(path + ".new", path) == 0 else {
        print("cannot rename the socket into place: \(errno)")
        return 2
      }
      for _ in 0..<connections {
        var poller = pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, 30_000) == 1, let peer = try listener.accept() else {
          print("no connection within 30 s")
          return 1
        }
        _ = fcntl(peer.fd, F_SETFL, fcntl(peer.fd, F_GETFL) & ~O_NONBLOCK)  // accepted non-blocking
        peer.setReceiveTimeout(milliseconds: 30_000)
        while true {
          var fds: [CInt] = []
          let result = try peer.receive(into: buffer, fds: &fds, blocking: true)
          descriptors += fds.count
          fds.forEach { close($0) }
          guard case .packet = result else { break }
          packets += 1
        }
      }
    } catch {
      print("error: \(error)")
      return 1
    }
    unlink(path)
    print("squatter: \(connections) connections, \(packets) packets, \(descriptors) descriptors")
    return 0
  }
}
