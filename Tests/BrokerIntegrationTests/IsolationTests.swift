import BrokerProtocol
import CLinux
import CUserfaultfd
import ClientSDK
import Glibc
import Testing
import Userfaultfd

extension BrokerIntegrationTests {
  /// Malformed input and refused registrations harm nobody else (DESIGN §3.5).
  @Suite("Isolation and authority")
  struct Isolation {
    /// What the broker did with a connection it should drop: the Error it sent (if any), and whether it closed.
    struct Dropped {
      var error: BrokerError?
      var closed = false
    }

    /// Reads a plugin connection until it closes (up to 5 s), keeping the broker's Error.
    static func dropped(_ socket: PacketSocket) throws -> Dropped {
      var result = Dropped()
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
      defer { buffer.deallocate() }
      let decoder = EventBatchDecoder()
      let deadline = now() + 5
      while now() < deadline {
        var entry = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
        guard Glibc.poll(&entry, 1, 50) > 0 else { continue }
        var fds: [CInt] = []
        switch try socket.receive(into: buffer, fds: &fds) {
        case .packet(let count):
          try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
          if let error = decoder.error { result.error = error }
        case .closed:
          result.closed = true
          return result
        case .wouldBlock:
          continue
        }
      }
      return result
    }

    /// Reads a client connection until it closes (up to 5 s), keeping the broker's Error reply.
    static func dropped(_ client: ManualClient) throws -> (reply: BrokerReply?, closed: Bool) {
      var reply: BrokerReply?
      let deadline = now() + 5
      while now() < deadline {
        switch try client.receive(milliseconds: 50) {
        case .message(let message): reply = message
        case .closed: return (reply, true)
        case .timedOut: continue
        }
      }
      return (reply, false)
    }

    @Test("Garbage on the plugin and client sockets (and a plugin name already taken) closes that connection with a reason the status counts; others are served")
    func garbageOnSockets() throws {
      try Harness.run("garbage") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let baseline = h.brokerDescriptorCount()
        // A client at work while the garbage arrives.
        let busy = try h.startClient("touch", mib: 16, threads: 2, plugin: "pattern")

        // A plugin connection whose first packet is not a message.
        do {
          let socket = try PacketSocket.connect(path: h.pluginSocket)
          _ = try garbageBytes(count: 512).withUnsafeBytes { try socket.send($0) }
          let outcome = try Self.dropped(socket)
          #expect(outcome.closed, h.diagnostics)
          #expect(outcome.error?.code == .malformed, h.diagnostics("error: \(String(describing: outcome.error))"))
        }
        #expect(h.waitForStatus { $0.tally[.pluginDisconnected, "malformed"] == 1 }, h.diagnostics)

        // A plugin that said Hello, then sends garbage.
        do {
          let plugin = try ManualPlugin(socketPath: h.pluginSocket, name: "garbler")
          try plugin.sendRaw(garbageBytes(count: 4096))
          let outcome = try Self.dropped(plugin.socket)
          #expect(outcome.closed, h.diagnostics)
          #expect(outcome.error?.code == .malformed, h.diagnostics)
        }
        #expect(h.waitForStatus { $0.plugin("garbler")?.tally[.pluginDisconnected, "malformed"] == 1 }, h.diagnostics)

        // A client connection whose first packet is not a message.
        do {
          let client = try ManualClient(socketPath: h.clientSocket)
          try client.sendRaw(garbageBytes(count: 512))
          let (reply, closed) = try Self.dropped(client)
          #expect(closed, h.diagnostics)
          guard case .error(let error)? = reply?.body else {
            Issue.record(h.diagnostics("no Error reply to garbage: \(String(describing: reply))"))
            return
          }
          #expect(error.code == .malformed, h.diagnostics)
        }
        #expect(h.waitForStatus { $0.tally[.requestRefused, "malformed"] == 1 }, h.diagnostics)

        // A client that said Hello, then sends a packet larger than any message.
        do {
          let client = try ManualClient(socketPath: h.clientSocket)
          try client.hello()
          try client.sendRaw(garbageBytes(count: PacketSocket.maxPacketSize + 4096))
          let (reply, closed) = try Self.dropped(client)
          #expect(closed, h.diagnostics)
          if case .error(let error)? = reply?.body {
            #expect(error.code == .tooLarge, h.diagnostics)
          } else {
            Issue.record(h.diagnostics("no Error reply to an oversized packet: \(String(describing: reply))"))
          }
        }
        #expect(h.waitForStatus { $0.tally[.clientClosed, "tooLarge"] == 1 }, h.diagnostics)

        // A second plugin claiming the name of the connected one is refused; the first keeps serving.
        do {
          _ = try ManualPlugin(socketPath: h.pluginSocket, name: "pattern")
          Issue.record(h.diagnostics("a second plugin named pattern was accepted"))
        } catch let error as BrokerError {
          #expect(error.code == .nameTaken, h.diagnostics("\(error)"))
        }

        // The busy client was not disturbed.
        #expect(busy.wait(timeout: 30) == .exited(0), h.diagnostics(busy.stdout + busy.stderr))
        #expect(busy.stdout.hasSuffix("verified \(pages(mib: 16)) pages, 0 wrong\n"), h.diagnostics(busy.stdout))
        // Nothing of those connections is left in the broker, and it still serves.
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
        let outcome = try h.runClient("touch", mib: 4, threads: 2, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("A peer whose uid is not allowed (SO_PEERCRED) is refused on both sockets; the broker keeps serving",
          .enabled(if: getuid() == 0, "needs root to run a client as another uid"))
    func foreignUIDRefused() throws {
      // Another uid is allowed, so the sockets are open to all (0666) and SO_PEERCRED decides.
      try Harness.run("foreign-uid", configFields: ["\"clientUIDs\": [0, 4242]", "\"pluginUIDs\": [0, 4242]"]) { h in
        chmod(h.directory, 0o755)  // anybody may reach the sockets; the broker decides
        try h.startPlugin(name: "pattern", mode: "pattern")
        let baseline = h.brokerDescriptorCount()
        let outcome = try h.runClient("foreign-uid", mib: 0, threads: 0, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "foreign uid refused on 2 of 2 sockets", h.diagnostics(outcome.stdout))
        #expect(h.waitForStatus { $0.tally[.clientRefused, "notAuthorized"] == 1 && $0.tally[.pluginRefused, "notAuthorized"] == 1 }, h.diagnostics)
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
        let touch = try h.runClient("touch", mib: 1, threads: 1, plugin: "pattern")
        #expect(touch.status == .exited(0), h.diagnostics)
      }
    }

    @Test("A gid in clientGIDs lets its peers in on the client socket (SO_PEERCRED's primary gid); the plugin socket stays private",
          .enabled(if: getuid() == 0, "needs root to run a client as another uid"))
    func allowedGID() throws {
      try Harness.run("gid", configFields: ["\"clientGIDs\": [65534]", "\"helloTimeoutMilliseconds\": 500"]) { h in
        chmod(h.directory, 0o755)
        try h.startPlugin(name: "pattern", mode: "pattern")
        // The fixture drops to uid and gid 65534. The client socket (0666 now) accepts it and waits
        // for its Hello, which never comes: it reads the Hello deadline's Error, not a refusal; the
        // plugin socket (still 0600) cannot even be opened.
        let outcome = try h.runClient("foreign-uid", mib: 0, threads: 0, plugin: "pattern")
        #expect(outcome.status == .exited(1) && outcome.summary == "foreign uid refused on 0 of 2 sockets", h.diagnostics(outcome.stdout))
        #expect(outcome.stdout.contains("client: timedOut"), h.diagnostics(outcome.stdout))
        #expect(outcome.stdout.contains("plugin: cannot connect") && outcome.stdout.contains("Permission denied"), h.diagnostics(outcome.stdout))
        #expect(try h.status().tally[.clientRefused] == 0, h.diagnostics)
      }
    }

    @Test("A Hello of another version or role, and a truncated Register, are refused with a clear Error and the connection closed")
    func wrongVersionAndTruncated() throws {
      try Harness.run("versions") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        // A client of version 1 (the protocol before this one).
        let client = try ManualClient(socketPath: h.clientSocket)
        try client.send(ClientRequest(requestID: 7, .hello(Hello(role: .client, name: "old", version: 1))))
        let clientDropped = try Self.dropped(client)
        #expect(clientDropped.closed, h.diagnostics)
        if case .error(let error)? = clientDropped.reply?.body { #expect(error.code == .version && error.message.contains("version 1")) } else { Issue.record("no Error for version 1") }
        #expect(clientDropped.reply?.requestID == 7, h.diagnostics)
        // A client claiming to be a plugin.
        let impostor = try ManualClient(socketPath: h.clientSocket)
        try impostor.send(ClientRequest(requestID: 1, .hello(Hello(role: .plugin, name: "impostor"))))
        if case .error(let error)? = try Self.dropped(impostor).reply?.body { #expect(error.code == .version) } else { Issue.record("no Error for a wrong role") }
        // A plugin of version 1.
        let plugin = try PacketSocket.connect(path: h.pluginSocket)
        let encoder = DecisionBatchEncoder()
        encoder.setHello(Hello(role: .plugin, name: "old-plugin", version: 1))
        let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
        defer { packet.deallocate() }
        let count = encoder.encode(into: packet)
        _ = try plugin.send(UnsafeRawBufferPointer(rebasing: packet[..<count]))
        let pluginDropped = try Self.dropped(plugin)
        #expect(pluginDropped.closed && pluginDropped.error?.code == .version && pluginDropped.error?.message.contains("version 1") == true,
                h.diagnostics("\(String(describing: pluginDropped.error))"))
        // A Register cut short in the middle of its regions.
        let truncated = try ManualClient(socketPath: h.clientSocket)
        try truncated.hello()
        let register = ClientWire.encode(ClientRequest(requestID: 2, .register(RegisterRequest(
          pid: getpid(), features: [], ioctls: [], regions: [RegionSpec(id: 1, base: 0x7000_0000_0000, length: 1 << 20, plugin: "pattern", argument: "some argument")]))))
        try truncated.sendRaw(Array(register.prefix(register.count - 9)))
        let truncatedDropped = try Self.dropped(truncated)
        if case .error(let error)? = truncatedDropped.reply?.body { #expect(error.code == .malformed) } else { Issue.record("no Error for a truncated Register") }
        #expect(truncatedDropped.closed, h.diagnostics)
        #expect(try h.status().tally[.requestRefused] == 3, h.diagnostics)
        // Everyone else is still served.
        let outcome = try h.runClient("touch", mib: 2, threads: 2, plugin: "pattern")
        #expect(outcome.status == .exited(0) && outcome.summary == "verified 512 pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("A plugin's shared area must be a memfd sealed against shrinking: a pipe or a plain file with Hello is refused, a sealed memfd accepted")
    func sharedAreaChecked() throws {
      try Harness.run("shared-area") { h in
        var pipeFDs: [CInt] = [-1, -1]
        #expect(pipe(&pipeFDs) == 0)
        defer { pipeFDs.forEach { close($0) } }
        let file = open(h.directory + "/plain", O_RDWR | O_CREAT, 0o600)
        defer { close(file) }
        #expect(ftruncate(file, 1 << 20) == 0)
        let sealed = clinux_sealed_memfd("test-area", 1 << 20)
        defer { close(sealed) }
        let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
        defer { packet.deallocate() }
        for (label, fd, accepted) in [("a pipe", pipeFDs[0], false), ("a plain file", file, false), ("a sealed memfd", sealed, true)] {
          let plugin = try PacketSocket.connect(path: h.pluginSocket)
          let encoder = DecisionBatchEncoder()
          encoder.setHello(Hello(role: .plugin, name: "area-\(accepted)"))
          let count = encoder.encode(into: packet)
          _ = try [fd].withUnsafeBufferPointer { fds in try plugin.send(UnsafeRawBufferPointer(rebasing: packet[..<count]), fds: fds) }
          if accepted {
            #expect(h.waitForStatus { $0.plugin("area-true")?.state == "connected" }, h.diagnostics(label))
          } else {
            let dropped = try Self.dropped(plugin)
            #expect(dropped.closed && dropped.error?.code == .malformed && dropped.error?.message.contains("sealed") == true,
                    h.diagnostics("\(label): \(String(describing: dropped.error))"))
          }
        }
        #expect(try h.status().tally[.pluginConnected] == 1, h.diagnostics)
      }
    }

    @Test("By default the sockets are private to the broker's uid (0600)")
    func privateSocketsByDefault() throws {
      try Harness.run("socket-modes") { h in
        var info = stat()
        for path in [h.clientSocket, h.pluginSocket] {
          #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o600, h.diagnostics("\(path): \(String(info.st_mode & 0o777, radix: 8))"))
        }
      }
    }

    @Test("A config file with a field the broker does not know is refused at start, naming it (and by check-config); command-line sockets win over the config's")
    func configFileChecked() throws {
      try Harness.run("config") { h in
        let dir = h.directory
        let bad = dir + "/bad.json"
        try writeTextFile(bad, #"{"clientUids": [1000], "plugins": [{"name": "x", "executable": "/bin/true", "args": []}]}"#)
        let refused = try FixtureProcess(
          label: "broker-bad-config", executable: Harness.brokerExecutable,
          arguments: ["--config", bad, "--client-socket", dir + "/bad-c.sock", "--plugin-socket", dir + "/bad-p.sock"],
          environment: [:], stdoutPath: dir + "/bad.stdout", stderrPath: dir + "/bad.stderr")
        #expect(refused.wait(timeout: 10) == .exited(78), h.diagnostics(refused.stderr))
        #expect(refused.stderr.contains("unknown fields clientUids, plugins[0].args"), h.diagnostics(refused.stderr))
        #expect(access(dir + "/bad-c.sock", F_OK) != 0, h.diagnostics)

        // Values against their rules, types and syntax: each refused with the field (or place) named, no usage banner.
        let cases: [(String, String)] = [
          (#"{"pluginDeadlineMilliseconds": -1}"#, "pluginDeadlineMilliseconds is -1; it must be from 1 to 86400000"),
          (#"{"maxClients": 0}"#, "maxClients is 0; it must be from 1 to"),
          (#"{"plugins": [{"name": "a", "executable": "/bin/true"}, {"name": "a", "executable": "/bin/true"}]}"#, #"plugins[1].name "a" is empty or used twice"#),
          (#"{"plugins": [{"name": "a", "executable": "/no/such/plugin"}]}"#, "plugins[0].executable /no/such/plugin is not an executable file"),
          (#"{"maxClients": "many"}"#, "maxClients must be a whole number"),
          (#"{"maxClients": 3,"#, "not valid JSON"),
        ]
        for (index, (text, message)) in cases.enumerated() {
          let path = dir + "/bad-\(index).json"
          try writeTextFile(path, text)
          let process = try FixtureProcess(
            label: "broker-bad-\(index)", executable: Harness.brokerExecutable,
            arguments: ["--config", path, "--client-socket", dir + "/bad-c.sock", "--plugin-socket", dir + "/bad-p.sock"],
            environment: [:], stdoutPath: dir + "/bad-\(index).stdout", stderrPath: dir + "/bad-\(index).stderr")
          #expect(process.wait(timeout: 10) == .exited(78), h.diagnostics(text + ": " + process.stderr))
          #expect(process.stderr.contains(message) && !process.stderr.contains("USAGE"), h.diagnostics(text + ": " + process.stderr))
          // `check-config` says the same without starting anything.
          let check = try FixtureProcess(
            label: "check-bad-\(index)", executable: Harness.brokerExecutable, arguments: ["check-config", path],
            environment: [:], stdoutPath: dir + "/check-\(index).stdout", stderrPath: dir + "/check-\(index).stderr")
          #expect(check.wait(timeout: 10) == .exited(78) && check.stderr.contains(message), h.diagnostics(text + ": " + check.stderr))
        }

        let config = dir + "/sockets.json"
        try writeTextFile(config, #"{"clientSocket": "\#(dir)/from-config.sock"}"#)
        let check = try FixtureProcess(
          label: "check-good", executable: Harness.brokerExecutable, arguments: ["check-config", config],
          environment: [:], stdoutPath: dir + "/check-good.stdout", stderrPath: dir + "/check-good.stderr")
        #expect(check.wait(timeout: 10) == .exited(0) && check.stdout.contains("ok"), h.diagnostics(check.stdout + check.stderr))
        let broker = try FixtureProcess(
          label: "broker-flags", executable: Harness.brokerExecutable,
          arguments: ["--config", config, "--client-socket", dir + "/from-flag.sock", "--plugin-socket", dir + "/flag-p.sock",
                      "--control-socket", dir + "/flag-control.sock"],
          environment: [:], stdoutPath: dir + "/flags.stdout", stderrPath: dir + "/flags.stderr")
        #expect(waitUntil(timeout: 10) { access(dir + "/from-flag.sock", F_OK) == 0 }, h.diagnostics(broker.stderr))
        #expect(access(dir + "/from-config.sock", F_OK) != 0, h.diagnostics(broker.stderr))
        #expect(broker.stop() == .exited(0), h.diagnostics(broker.stderr))
      }
    }

    @Test("Register naming an unknown plugin, or refused by its plugin, fails with a clear error")
    func refusedRegistrations() throws {
      try Harness.run("refusals") { h in
        try h.startPlugin(name: "refuser", mode: "refuse")
        let baseline = h.brokerDescriptorCount()
        let unknown = try h.runClient("unknown-plugin", mib: 1, threads: 1, plugin: "unused")
        #expect(unknown.status == .exited(0), h.diagnostics(unknown.stdout))
        #expect(unknown.summary.contains("refused"), h.diagnostics(unknown.stdout))
        #expect(unknown.summary.contains("\"no-such-plugin\", which is neither configured nor connected"), h.diagnostics(unknown.stdout))

        let refused = try h.runClient("refused", mib: 1, threads: 1, plugin: "refuser")
        #expect(refused.status == .exited(0), h.diagnostics(refused.stdout))
        #expect(refused.summary.contains("plugin refuser refused region 1: this fixture refuses every region"), h.diagnostics(refused.stdout))
        // The plugin was asked (and refused); the broker logged why it refused the client.
        #expect(openedClients(h.eventLog("refuser")).count == 1, h.diagnostics)
        #expect(try h.status().tally[.regionsRefused, "pluginRefused"] == 1, h.diagnostics)
        // Every descriptor of both clients (socket, uffd, pidfd) is closed.
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
      }
    }

    @Test("Register with a descriptor that is not a userfaultfd, none, two, another pid's, one that never negotiated its API, or one without the events it claims: refused, no hang, no leak")
    func registerWithWrongDescriptors() throws {
      try Harness.run("not-uffd") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let baseline = h.brokerDescriptorCount()
        let memory = try AnonymousMemory(length: 1 << 20)
        let region = RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: "pattern")
        var pipeFDs: [CInt] = [-1, -1]
        #expect(pipe(&pipeFDs) == 0)
        defer { pipeFDs.forEach { close($0) } }
        let uffd = try UserfaultFD.create(features: BrokerClient.features)
        // Never had UFFDIO_API: its reads fail with EINVAL (a broker polling it would spin).
        let raw = cuffd_create(O_CLOEXEC | O_NONBLOCK)
        #expect(raw >= 0)
        defer { close(raw) }
        // API done, but none of the events the Register below claims (the message is not trusted).
        let bare = try UserfaultFD.create(features: [])

        func register(pid: Int32, fds: [CInt], requestID: UInt64 = 1) throws -> (BrokerReply?, Bool) {
          let client = try ManualClient(socketPath: h.clientSocket)
          try client.hello()
          let request = RegisterRequest(pid: pid, features: uffd.features, ioctls: uffd.ioctls, regions: [region])
          try client.send(ClientRequest(requestID: requestID, .register(request)), fds: fds)
          return try Self.dropped(client)
        }

        for (label, pid, fds, code) in [
          ("a pipe", getpid(), [pipeFDs[0]], BrokerError.Code.notUserfaultfd),
          ("no descriptor", getpid(), [], .notUserfaultfd),
          ("two descriptors", getpid(), [uffd.fileDescriptor.rawValue, pipeFDs[1]], .notUserfaultfd),
          ("another pid", getpid() + 1, [uffd.fileDescriptor.rawValue], .notAuthorized),
          ("a userfaultfd without UFFDIO_API", getpid(), [raw], .notUserfaultfd),
          ("a userfaultfd without the events it claims", getpid(), [bare.fileDescriptor.rawValue], .notUserfaultfd),
        ] {
          let (reply, closed) = try register(pid: pid, fds: fds)
          #expect(closed, h.diagnostics(label))
          if case .error(let error)? = reply?.body {
            #expect(error.code == code, h.diagnostics("\(label): \(error)"))
          } else {
            Issue.record(h.diagnostics("\(label): no Error reply: \(String(describing: reply))"))
          }
        }
        // Our own descriptors are untouched; the broker's copies are closed.
        #expect(fcntl(pipeFDs[0], F_GETFD) >= 0 && fcntl(pipeFDs[1], F_GETFD) >= 0)
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
        #expect(try h.status().tally[.requestRefused, "notUserfaultfd"] >= 1, h.diagnostics)
        // The broker still registers a real client.
        let outcome = try h.runClient("touch", mib: 1, threads: 1, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics)
      }
    }

    @Test("Swap-out requests with offsets far past their region are refused with a clear Error; the broker keeps serving")
    func swapOutOffsetsOutOfRange() throws {
      try Harness.run("swap-offsets") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let memory = try AnonymousMemory(length: 1 << 20)
        let region = RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: "pattern")
        let uffd = try UserfaultFD.create(features: BrokerClient.features)
        let client = try ManualClient(socketPath: h.clientSocket)
        try client.hello()
        try client.send(ClientRequest(requestID: 1, .register(RegisterRequest(pid: getpid(), features: uffd.features, ioctls: uffd.ioctls, regions: [region]))),
                        fds: [uffd.fileDescriptor.rawValue])
        guard case .message(let registered) = try client.receive(), case .ack = registered.body else {
          Issue.record(h.diagnostics("Register was not acknowledged"))
          return
        }
        // Page aligned, so only the bounds check stands between them and an overflowing address.
        let far: UInt64 = 0xFFFF_F000_0000_0000
        for (index, body) in [ClientRequest.Body.swapOut(regionID: 1, offset: far, length: 4096),
                              .swapOutData(regionID: 1, offset: far, data: [UInt8](repeating: 1, count: 4096)),
                              .swapOutDone(regionID: 1, offset: far, length: 4096),
                              .swapOut(regionID: 1, offset: UInt64(memory.length), length: 4096)].enumerated() {
          let requestID = UInt64(index + 2)
          try client.send(ClientRequest(requestID: requestID, body))
          guard case .message(let reply) = try client.receive(), case .error(let error) = reply.body else {
            Issue.record(h.diagnostics("request \(requestID) was not refused"))
            continue
          }
          #expect(reply.requestID == requestID && error.code == .badRegion, h.diagnostics("\(error)"))
        }
        #expect(h.broker.isRunning, h.diagnostics)
        let outcome = try h.runClient("touch", mib: 1, threads: 1, plugin: "pattern")
        #expect(outcome.status == .exited(0) && outcome.summary == "verified 256 pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("An Error reply echoes the request id of the request it refuses (schema: request_id is echoed in the reply)")
    func errorReplyEchoesRequestID() throws {
      try Harness.run("request-id") { h in
        let client = try ManualClient(socketPath: h.clientSocket)
        try client.hello()
        var pipeFDs: [CInt] = [-1, -1]
        #expect(pipe(&pipeFDs) == 0)
        defer { pipeFDs.forEach { close($0) } }
        let request = RegisterRequest(pid: getpid(), features: BrokerClient.features, ioctls: [], regions: [])
        try client.send(ClientRequest(requestID: 41, .register(request)), fds: [pipeFDs[0]])
        let (reply, _) = try Self.dropped(client)
        let answer = try #require(reply, h.diagnostics)
        guard case .error(let error) = answer.body else {
          Issue.record(h.diagnostics("not an Error: \(answer)"))
          return
        }
        #expect(error.code == .notUserfaultfd, h.diagnostics)
        #expect(answer.requestID == 41, h.diagnostics("the Error reply carries request id \(answer.requestID)"))
      }
    }
  }
}
