import BrokerProtocol
import CLinux
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// A plugin gone for good (issue 6): its regions fail over to a fallback, or
  /// fail closed (poison: SIGBUS at the access; kill: the client is killed), never zeros.
  @Suite("Plugin failure policies")
  struct FailurePolicies {
    @Test("failover: a plugin that dies for good hands its regions to the fallback; every page exact")
    func failover() throws {
      let policy = "\"policies\": {\"pattern\": {\"fallback\": \"backup\", \"failAfterMilliseconds\": 200}}"
      try Harness.run("failover", configFields: [policy]) { h in
        let primary = try h.startPlugin(name: "pattern", mode: "exit-after:1500")
        try h.startPlugin(name: "backup", mode: "pattern")
        // A client of the fallback's own, registered throughout the failover.
        let own = try h.startClient("soak", mib: 4, threads: 1, plugin: "backup", loops: 1_000_000, extraEnvironment: ["FIXTURE_SOAK_SECONDS": "5"])
        #expect(h.waitForStatus { $0.client(pid: own.pid)?.phase == "active" }, h.diagnostics)
        let outcome = try h.runClient("touch", mib: 16, threads: 2, plugin: "pattern", timeout: 60)
        #expect(primary.wait(timeout: 5) == .exited(3), h.diagnostics("the primary should have exited after 1500 faults"))
        #expect(outcome.status == .exited(0) && outcome.summary == "verified 4096 pages, 0 wrong", h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(try h.status().plugin("pattern")?.tally[.pluginFailedOver] == 1, h.diagnostics)
        // The fallback was told of the region before it served faults of it.
        let backup = h.eventLog("backup")
        #expect(backup.contains { $0.hasPrefix("opened ") }, h.diagnostics("backup events: \(backup.prefix(5))"))
        // ...and not told again of its own client's region (a plugin's state for it would be lost).
        let opened = openedClients(backup)
        #expect(opened.count == 2 && Set(opened).count == 2, h.diagnostics("backup opened regions of clients \(opened)"))
        #expect(own.wait(timeout: 30) == .exited(0), h.diagnostics(own.stdout + own.stderr))
      }
    }

    @Test("fail closed: with no fallback, faults of a failed plugin's regions end as the policy says", arguments: ["poison", "kill"])
    func failClosed(policy: String) throws {
      let field = "\"policies\": {\"slow\": {\"onFailure\": \"\(policy)\", \"failAfterMilliseconds\": 200}}"
      try Harness.run("fail-\(policy)", configFields: [field]) { h in
        let plugin = try h.startPlugin(name: "slow", mode: "hang")
        let client = try h.startClient("touch", mib: 1, threads: 2, plugin: "slow", extraEnvironment: ["SWIFT_BACKTRACE": "enable=no"])
        #expect(waitUntil(timeout: 5) { h.eventLog("slow").contains { $0.hasPrefix("retry") } }, h.diagnostics)
        _ = kill(plugin.pid, SIGKILL)
        let status = client.wait(timeout: 10)
        #expect(status == .signaled(policy == "poison" ? SIGBUS : SIGKILL), h.diagnostics("client: \(String(describing: status))"))
        #expect(h.waitForStatus { $0.plugin("slow")?.tally[.pluginFailedClosed, policy] == 1 }, h.diagnostics)
        // A new client naming the failed plugin is refused clearly.
        let refused = try h.runClient("refused", mib: 1, threads: 1, plugin: "slow")
        #expect(refused.status == .exited(0) && refused.summary.contains("has failed"), h.diagnostics(refused.stdout))
      }
    }

    @Test("out of descriptors: new connections are refused with a clear error, connected clients keep being served")
    func descriptorExhaustion() throws {
      try Harness.run("emfile") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        // Busy for a fixed 6 s whatever the machine's speed (the soak checks every byte it touches).
        let busy = try h.startClient("soak", mib: 16, threads: 2, plugin: "pattern", loops: 1_000_000, extraEnvironment: ["FIXTURE_SOAK_SECONDS": "6"])
        // The limit must not catch the busy client half-registered (its pidfd is opened at Register).
        #expect(h.waitForStatus { $0.client(pid: busy.pid)?.phase == "active" }, h.diagnostics)
        // Leave the broker a few descriptors of headroom, then connect more raw clients than that.
        #expect(clinux_set_descriptor_limit(h.broker.pid, UInt64(h.brokerDescriptorCount() + 3)) == 0)
        var refused = 0
        var sockets: [PacketSocket] = []
        for _ in 0..<8 {
          guard let socket = try? PacketSocket.connect(path: h.clientSocket) else { continue }
          socket.setReceiveTimeout(milliseconds: 500)
          sockets.append(socket)
          let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
          defer { buffer.deallocate() }
          var fds: [CInt] = []
          if case .packet(let count) = try? socket.receive(into: buffer, fds: &fds, blocking: true),
             let reply = try? ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: WireArena()),
             case .error(let error) = reply.body, error.code == .limit {
            refused += 1
          }
        }
        #expect(refused > 0, h.diagnostics("no connection was refused"))
        #expect(busy.isRunning, h.diagnostics("the busy client ended before the refusals were over"))
        sockets.removeAll()
        // (Asked once descriptors are free again: the status needs one too.)
        #expect(h.waitForStatus { $0.tally[.connectionRefusedNoDescriptors, "client"] >= UInt64(refused) }, h.diagnostics)
        #expect(busy.wait(timeout: 60) == .exited(0), h.diagnostics(busy.stdout + busy.stderr))
        let summary = busy.stdout.split(separator: "\n").last.flatMap { BrokerIntegrationTests.Soak.SoakSummary(String($0)) }
        #expect(summary != nil && summary!.wrong == 0 && summary!.faults > 0, h.diagnostics(busy.stdout))
        _ = clinux_set_descriptor_limit(h.broker.pid, 4096)
      }
    }
  }
}
