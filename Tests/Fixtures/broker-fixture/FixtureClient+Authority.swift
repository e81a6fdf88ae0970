import BrokerProtocol
import Glibc
import Userfaultfd

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

  /// Identity bound to the connection (issue 12): connects to the client
  /// socket and says Hello, then forks. The parent prints "parent PID" and
  /// exits; the child keeps the connection, opens the FIFO named by
  /// FIXTURE_GO (blocking until the test has put another process at the
  /// parent's pid and opened it too; the child leaves the parent's process
  /// group so that pid can be reused), then registers a userfaultfd of its own
  /// under the parent's pid, the one the broker saw connect, and reads until
  /// the broker closes the connection.
  func handoff() throws -> Int32 {
    guard let go = getenv("FIXTURE_GO").map({ String(cString: $0) }) else { print("FIXTURE_GO is not set"); return 2 }
    let socket = try PacketSocket.connect(path: SocketPaths.client)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
    defer { buffer.deallocate() }
    func send(_ request: ClientRequest, fds: [CInt] = []) throws {
      let bytes = ClientWire.encode(request)
      _ = try bytes.withUnsafeBytes { raw in try fds.withUnsafeBufferPointer { try socket.send(raw, fds: $0) } }
    }
    func receive() throws -> BrokerReply? {
      var fds: [CInt] = []
      guard case .packet(let count) = try socket.receive(into: buffer, fds: &fds, blocking: true) else { return nil }
      return try ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: WireArena(capacity: 64 << 10))
    }
    try send(ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "handoff"))))
    guard try receive() != nil else { print("no Hello from the broker"); return 1 }  // accepted: the broker has its peer now
    let parent = getpid()
    let child = fork()
    guard child >= 0 else { print("fork failed: \(errno)"); return 2 }
    if child > 0 {
      print("parent \(parent)")
      return 0
    }
    setpgid(0, 0)  // a pid that still names a process group is never reused
    let fifo = open(go, O_RDONLY)
    guard fifo >= 0 else { print("cannot open \(go): \(errno)"); _exit(2) }
    close(fifo)
    let uffd = try UserfaultFD.create(features: [.eventRemove, .eventUnmap, .eventRemap])
    let register = RegisterRequest(pid: parent, features: uffd.features, ioctls: uffd.ioctls, regions: [])
    try send(ClientRequest(requestID: 2, .register(register)), fds: [uffd.fileDescriptor.rawValue])
    while try receive() != nil {}
    _exit(0)
  }
}
