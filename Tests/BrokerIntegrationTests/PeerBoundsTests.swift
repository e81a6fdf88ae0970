import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Issue 12: every peer is bounded, its identity is the process that connected,
  /// and a refused peer reads why.
  @Suite("Peer bounds and identity")
  struct PeerBounds {
    typealias Dropped = Isolation.Dropped

    @Test("Connections that never say Hello (or never Register) are closed at helloTimeout with a timedOut Error, on both sockets")
    func silentPeersClosed() throws {
      try Harness.run("silent", configFields: ["\"helloTimeoutMilliseconds\": 200"]) { h in
        let baseline = h.brokerDescriptorCount()
        let mute = try ManualClient(socketPath: h.clientSocket)  // not even Hello
        let idle = try ManualClient(socketPath: h.clientSocket)  // Hello, never Register
        try idle.hello()
        let plugin = try PacketSocket.connect(path: h.pluginSocket)
        for (label, client) in [("no Hello", mute), ("no Register", idle)] {
          let (reply, closed) = try Isolation.dropped(client)
          guard case .error(let error)? = reply?.body else {
            Issue.record(h.diagnostics("\(label): no Error: \(String(describing: reply))"))
            continue
          }
          #expect(closed && error.code == .timedOut, h.diagnostics("\(label): \(error)"))
        }
        let dropped = try Isolation.dropped(plugin)
        #expect(dropped.closed && dropped.error?.code == .timedOut, h.diagnostics("\(String(describing: dropped.error))"))
        let status = try h.status()
        #expect(status.tally[.requestRefused, "timedOut"] == 2 && status.tally[.pluginDisconnected, "timedOut"] == 1, h.diagnostics)
        #expect(status.clients.isEmpty, h.diagnostics)
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
      }
    }

    @Test("Plugin connections, plugin names (an idle one makes room) and clients per uid are capped: past each cap a peer is refused with a limit Error, which the SDK reports")
    func capsOnPeers() throws {
      let fields = ["\"maxPluginConnections\": 3", "\"maxPluginNames\": 2", "\"maxClientsPerUID\": 2"]
      try Harness.run("caps", configFields: fields) { h in
        // Names: two are kept. One no one needs any more (gone, nothing routed to it) makes
        // room for a new one; while both are in use, a third is refused.
        let first = try ManualPlugin(socketPath: h.pluginSocket, name: "first")
        do { _ = try ManualPlugin(socketPath: h.pluginSocket, name: "second") }
        #expect(h.waitForStatus { $0.tally[.pluginDisconnected] == 1 }, h.diagnostics)
        let third = try ManualPlugin(socketPath: h.pluginSocket, name: "third")
        #expect(try h.status().plugin("second") == nil, h.diagnostics)
        do {
          _ = try ManualPlugin(socketPath: h.pluginSocket, name: "fourth")
          Issue.record(h.diagnostics("a third plugin name in use was accepted"))
        } catch let error as BrokerError {
          #expect(error.code == .limit, h.diagnostics("\(error)"))
        }
        // Connections: `first`, `third` and a silent one fill the three; a fourth is refused at once.
        let silent = try PacketSocket.connect(path: h.pluginSocket)
        #expect(h.waitForStatus { $0.tally[.pluginRefused] == 0 && $0.plugin("third")?.state == "connected" }, h.diagnostics)
        let fourth = try PacketSocket.connect(path: h.pluginSocket)
        let refused = try Isolation.dropped(fourth)
        #expect(refused.closed && refused.error?.code == .limit, h.diagnostics("\(String(describing: refused.error))"))
        #expect(try h.status().tally[.pluginRefused, "limit"] == 1, h.diagnostics)
        _ = (first, third, silent)

        // Clients of one uid: two connect, the third is refused.
        let clients = try (0..<2).map { _ in try ManualClient(socketPath: h.clientSocket) }
        try clients.forEach { try $0.hello() }
        let thirdClient = try ManualClient(socketPath: h.clientSocket)
        let (reply, closed) = try Isolation.dropped(thirdClient)
        if case .error(let error)? = reply?.body {
          #expect(closed && error.code == .limit && error.message.contains("uid"), h.diagnostics("\(error)"))
        } else {
          Issue.record(h.diagnostics("no Error for a third client of one uid: \(String(describing: reply))"))
        }
        // The client SDK says why too, though its Hello may meet the shut connection (EPIPE) first.
        for round in 0..<10 {
          let outcome = try h.runClient("touch", mib: 1, threads: 1, plugin: "third")
          #expect(outcome.status == .exited(1) && (outcome.stdout + outcome.stderr).contains("maximum of 2 clients"),
                  h.diagnostics("round \(round): \(outcome.stdout) \(outcome.stderr)"))
        }
        _ = clients
      }
    }

    @Test("A refused peer that sent more than the broker read still reads the Error that says why (not ECONNRESET)")
    func refusedPeerReadsWhy() throws {
      try Harness.run("refused-reads") { h in
        for round in 0..<20 {
          let client = try ManualClient(socketPath: h.clientSocket)
          // Garbage, and more behind it the broker will not read: closing on unread
          // packets would reset the connection before the Error could be read.
          // (Sends after the broker shut the connection fail: that is fine.)
          for _ in 0..<8 { try? client.sendRaw(garbageBytes(count: 256)) }
          let (reply, closed) = try Isolation.dropped(client)
          guard case .error(let error)? = reply?.body else {
            Issue.record(h.diagnostics("round \(round): no Error, only \(closed ? "the close" : "silence")"))
            return
          }
          #expect(closed && error.code == .malformed, h.diagnostics("round \(round): \(error)"))
        }
      }
    }

    @Test("A plugin built on the SDK that the broker refuses says the broker's reason, not a broken pipe")
    func refusedPluginSaysWhy() throws {
      try Harness.run("refused-plugin", configFields: ["\"pluginUIDs\": [4242]"]) { h in
        for round in 0..<5 {
          let plugin = try h.startPluginProcess(name: "zero", executable: Harness.binDirectory + "/zero-fill-plugin", arguments: ["zero"], waitForConnection: false)
          #expect(plugin.wait(timeout: 10).map { $0 != .exited(0) } == true, h.diagnostics("round \(round)"))
          #expect(plugin.stderr.contains("may not serve as a plugin"), h.diagnostics("round \(round): \(plugin.stderr)"))
        }
        #expect(try h.status().tally[.pluginRefused, "notAuthorized"] == 5, h.diagnostics)
      }
    }

    @Test("The broker watches the process that connected (SO_PEERPIDFD, or pidfd_open of its pid as on a kernel before 6.5): a connection handed on after its process exited is closed at Register, though another process now has that pid",
          .enabled(if: getuid() == 0, "needs root to choose the next pid (ns_last_pid)"), arguments: ["connection", "pid"])
    func identityIsTheConnectingProcess(pidfdMethod: String) throws {
      try Harness.run("handoff", brokerEnvironment: ["UFFD_BROKER_PIDFD": pidfdMethod]) { h in
        let fifo = h.directory + "/go"
        #expect(mkfifo(fifo, 0o600) == 0)
        let fixture = try h.startClient("handoff", mib: 0, threads: 0, plugin: "none", extraEnvironment: ["FIXTURE_GO": fifo])
        // Whatever happens, the child is let go (it then ends when the broker closes its connection).
        defer { let writer = open(fifo, O_WRONLY | O_NONBLOCK); if writer >= 0 { close(writer) } }
        #expect(fixture.wait(timeout: 10) == .exited(0), h.diagnostics(fixture.stdout + fixture.stderr))
        let parent = try #require(fixture.stdout.split(separator: "\n").first { $0.hasPrefix("parent ") }.flatMap { pid_t($0.dropFirst(7)) },
                                  h.diagnostics(fixture.stdout))
        // Another process at the exited parent's pid (reaped above), as pid reuse would put it.
        let impostor = try #require(Self.process(atPID: parent, h), h.diagnostics("could not start a process at pid \(parent)"))
        defer { impostor.stop(grace: 0) }
        // Let the child register under the parent's pid.
        let writer = open(fifo, O_WRONLY)
        #expect(writer >= 0)
        close(writer)
        #expect(h.waitForStatus { $0.tally[.clientClosed] == 1 }, h.diagnostics)
        let status = try h.status()
        #expect(status.clients.isEmpty && status.tally[.clientClosed, "disconnected"] + status.tally[.clientClosed, "io"] == 1, h.diagnostics("\(status.tally)"))
        #expect(impostor.isRunning, h.diagnostics)
      }
    }

    /// Starts `sleep` at `pid` (setting ns_last_pid just below it), or nil if another process took it first.
    static func process(atPID pid: pid_t, _ h: Harness) -> FixtureProcess? {
      for attempt in 0..<20 {
        guard let file = fopen("/proc/sys/kernel/ns_last_pid", "w") else { return nil }
        fputs("\(pid - 1)", file)
        fclose(file)
        guard let process = try? FixtureProcess(
          label: "impostor-\(attempt)", executable: "/bin/sleep", arguments: ["600"], environment: [:],
          stdoutPath: h.directory + "/impostor.stdout", stderrPath: h.directory + "/impostor.stderr")
        else { return nil }
        if process.pid == pid { return process }
        process.stop(grace: 0)
      }
      return nil
    }
  }
}
