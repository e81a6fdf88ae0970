import BrokerProtocol
import Glibc

extension FixtureClient {
  /// Drops to uid/gid 65534 (nobody), then connects to both broker sockets
  /// and reads what the broker sends unprompted: with the default config
  /// (only the broker's own uid allowed) each must be an Error `notAuthorized`.
  func foreignUID() -> Int32 {
    guard setgroups(0, nil) == 0, setgid(65534) == 0, setuid(65534) == 0 else {
      print("cannot drop privileges: \(errno)")
      return 2
    }
    var refused = 0
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
    defer { buffer.deallocate() }
    guard let client = try? SocketPaths.client, let plugin = try? SocketPaths.plugin else {
      print("no socket paths in the environment")
      return 2
    }
    for (role, path) in [("client", client), ("plugin", plugin)] {
      do {
        let socket = try PacketSocket.connect(path: path)
        socket.setReceiveTimeout(milliseconds: 5000)
        var fds: [CInt] = []
        guard case .packet(let count) = try socket.receive(into: buffer, fds: &fds, blocking: true) else {
          print("\(role): no answer")
          continue
        }
        let bytes = UnsafeRawBufferPointer(rebasing: buffer[..<count])
        let error: BrokerError?
        if role == "client" {
          if case .error(let value) = try ClientWire.decodeReply(bytes, arena: WireArena(capacity: 64 << 10)).body { error = value } else { error = nil }
        } else {
          let decoder = EventBatchDecoder()
          try decoder.decode(bytes)
          error = decoder.error
        }
        print("\(role): \(error.map { "\($0.code) \($0)" } ?? "no error")")
        if error?.code == .notAuthorized { refused += 1 }
      } catch {
        print("\(role): \(error)")
      }
    }
    print("foreign uid refused on \(refused) of 2 sockets")
    return refused == 2 ? 0 : 1
  }
}
