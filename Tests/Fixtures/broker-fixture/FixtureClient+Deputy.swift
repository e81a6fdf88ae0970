import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import Userfaultfd

extension FixtureClient {
  /// The confused-deputy attack (issue 12): drops to uid/gid 65534 (nobody),
  /// says whether it can read FIXTURE_FILE itself ("readable by uid 65534:
  /// yes/no"), then registers one page served by PLUGIN with that file's path
  /// as the region's argument and reads the page. Prints "refused: CODE
  /// MESSAGE" (exit 3) when the broker refuses the Register, or "read: HEX"
  /// (the page's first 16 bytes, exit 0) when it was served. The uffd and its
  /// registration are made before the drop (as a sandboxed program would):
  /// the broker sees a client of uid 65534 all the same (SO_PEERCRED).
  func deputy() throws -> Int32 {
    guard let path = getenv("FIXTURE_FILE").map({ String(cString: $0) }) else {
      print("FIXTURE_FILE is not set")
      return 2
    }
    let memory = try AnonymousMemory(length: pageSize)
    let uffd = try UserfaultFD.create(features: BrokerClient.features, required: BrokerClient.features)
    _ = try uffd.register(address: memory.address, length: memory.length, mode: .missing)
    guard setgroups(0, nil) == 0, setgid(65534) == 0, setuid(65534) == 0 else {
      print("cannot drop privileges: \(errno)")
      return 2
    }
    let own = open(path, O_RDONLY)
    print("readable by uid 65534: \(own >= 0 ? "yes" : "no")")
    if own >= 0 { close(own) }
    let socket = try PacketSocket.connect(path: try SocketPaths.client)
    socket.setReceiveTimeout(milliseconds: 10_000)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
    defer { buffer.deallocate() }
    let arena = WireArena(capacity: 64 << 10)
    func exchange(_ body: ClientRequest.Body, fds: [CInt] = []) throws -> BrokerReply.Body? {
      let bytes = ClientWire.encode(ClientRequest(requestID: 1, body))
      _ = try bytes.withUnsafeBytes { raw in try fds.withUnsafeBufferPointer { try socket.send(raw, fds: $0) } }
      var received: [CInt] = []
      defer { received.forEach { close($0) } }
      guard case .packet(let count) = try socket.receive(into: buffer, fds: &received, blocking: true) else { return nil }
      return try ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: arena).body
    }
    _ = try exchange(.hello(Hello(role: .client, name: "fixture-deputy")))
    let spec = RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin, argument: path)
    let register = RegisterRequest(pid: getpid(), features: uffd.features, ioctls: uffd.ioctls, regions: [spec], token: 0x5EC2E7)
    switch try exchange(.register(register), fds: [uffd.fileDescriptor.rawValue]) {
    case .error(let error):
      print("refused: \(error.code) \(error.message)")
      return 3
    case .ack:
      _ = clinux_touch(UnsafeRawPointer(bitPattern: memory.address))
      let first = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: memory.address), count: 16)
      let hex = first.map { byte in String(byte >> 4, radix: 16) + String(byte & 0xF, radix: 16) }.joined()
      print("read: \(hex)")
      return 0
    case let other:
      print("unexpected reply: \(other.map { "\($0)" } ?? "none")")
      return 1
    }
  }
}
