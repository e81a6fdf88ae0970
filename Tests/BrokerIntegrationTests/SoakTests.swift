import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Issue 6, fault injection: a soak of every kind of event against an exact
  /// model, and a plugin killed with SIGKILL over and over under load.
  @Suite("Soak and fault injection")
  struct Soak {
    /// The `soak` fixture's last line: "soak faults N, dontneeds D, swaps S, unmaps U, wrong W".
    struct SoakSummary: Equatable {
      var faults, dontneeds, swaps, unmaps, wrong: Int

      init?(_ line: String) {
        let fields = line.split(separator: " ").map { $0.trimmingSuffix(",") }
        guard fields.count == 11, fields[0] == "soak", fields[1] == "faults", fields[3] == "dontneeds", fields[5] == "swaps",
              fields[7] == "unmaps", fields[9] == "wrong",
              let faults = Int(fields[2]), let dontneeds = Int(fields[4]), let swaps = Int(fields[6]),
              let unmaps = Int(fields[8]), let wrong = Int(fields[10])
        else { return nil }
        (self.faults, self.dontneeds, self.swaps, self.unmaps, self.wrong) = (faults, dontneeds, swaps, unmaps, wrong)
      }
    }

    @Test("Soak: 3 threads fault, write, DONTNEED, mremap-swap and munmap one region against an exact model; 120,000 faults, 0 wrong, nothing refused")
    func soak() throws {
      let kiloFaults = 120
      try Harness.run("soak") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let started = now()
        // FIXTURE_SOAK_SECONDS: on a slow machine the client stops and reports
        // how far it got (and the fault count below fails) rather than being killed.
        let outcome = try h.runClient(
          "soak", mib: 128, threads: 3, plugin: "pattern", loops: kiloFaults, timeout: 300)
        let elapsed = now() - started
        print("soak: \(outcome.stdout.split(separator: "\n").dropFirst().joined(separator: " | ")) (\(Int(elapsed * 10)) ds with start-up)")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        let summary = try #require(SoakSummary(outcome.summary), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(summary.wrong == 0, h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(summary.faults >= kiloFaults * 1000, h.diagnostics("only \(summary.faults) faults"))
        #expect(summary.dontneeds > 0 && summary.swaps > 0 && summary.unmaps > 0, h.diagnostics(outcome.summary))
        // Nothing refused: no client request, region, decision or delegation.
        #expect(try Self.refusals(h.status()).isEmpty, h.diagnostics)
        // The plugin heard of the removes, moves and unmaps, and the client's end.
        let events = h.eventLog("pattern")
        let client = try #require(openedClients(events).first, h.diagnostics)
        #expect(waitUntil(timeout: 5) { h.eventLog("pattern").contains("closed \(client)") }, h.diagnostics)
        #expect(events.contains { $0.hasPrefix("removed \(client) ") }, h.diagnostics)
        #expect(events.contains { $0.hasPrefix("remapped \(client) ") }, h.diagnostics)
        #expect(events.contains { $0.hasPrefix("unmapped \(client) ") }, h.diagnostics)
      }
    }

    @Test("The pattern plugin is killed with SIGKILL while faults are in flight (100 times) and restarted by the test: every page right")
    func pluginKilledOverAndOver() throws {
      let kills = 100
      try Harness.run("kill9") { h in
        var plugin = try h.startPlugin(name: "pattern", mode: "pattern")
        // 8 threads touching 256 MiB; another client starts (while a plugin is
        // connected: a test-started plugin that is away refuses registrations)
        // if one finishes before the last kill.
        func startClient() throws -> FixtureProcess {
          let client = try h.startClient("touch", mib: 256, threads: 8, plugin: "pattern")
          #expect(h.waitForStatus(timeout: 10) { $0.client(pid: client.pid) != nil || !client.isRunning }, h.diagnostics)
          return client
        }
        var client = try startClient()
        var finished: [FixtureProcess] = []
        /// Each killed plugin and the faults the broker had sent it and not had answered.
        var killed: [(pid: pid_t, parked: Int)] = []
        var random = SystemRandomNumberGenerator()
        var requeuedBefore: UInt64 = 0
        let started = now()
        let deadline = started + 30
        while killed.filter({ $0.parked > 0 }).count < kills && now() < deadline {
          if !client.isRunning {
            finished.append(client)
            client = try startClient()
          }
          // Kill only once this incarnation serves: the client's resident set grew by 32 pages.
          let before = residentPages(client.pid)
          let serving = waitUntil(timeout: 5, interval: 0.001) { residentPages(client.pid) >= before + 32 || !client.isRunning }
          guard client.isRunning else { continue }
          guard serving else {
            Issue.record(h.diagnostics("the client made no progress for 5 s after plugin \(plugin.pid) connected"))
            break
          }
          usleep(UInt32.random(in: 0..<2000, using: &random))
          kill(plugin.pid, SIGKILL)
          #expect(plugin.wait(timeout: 5) == .signaled(SIGKILL), h.diagnostics)
          // The broker's word on what was in flight: the faults it took back from the killed plugin.
          var requeued: UInt64?
          h.waitForStatus { status in
            guard let pattern = status.plugin("pattern"), pattern.tally[.pluginDisconnected] == UInt64(killed.count + 1) else { return false }
            requeued = pattern.faultsRequeued
            return true
          }
          guard let requeued else {
            Issue.record(h.diagnostics("the broker saw no disconnect of killed plugin \(plugin.pid)"))
            break
          }
          killed.append((plugin.pid, Int(requeued - requeuedBefore)))
          requeuedBefore = requeued
          plugin = try h.startPlugin(name: "pattern", mode: "pattern")
        }
        let killing = now() - started
        #expect(client.wait(timeout: 30) != nil, h.diagnostics)
        finished.append(client)
        let inFlight = killed.filter { $0.parked > 0 }
        print("kill -9 loop: \(killed.count) kills in \(Int(killing * 10)) ds, \(inFlight.count) with faults in flight (\(inFlight.map(\.parked).reduce(0, +)) parked), \(finished.count) clients, \(Int((now() - started) * 10)) ds in all")
        #expect(inFlight.count >= kills, h.diagnostics("kills with faults in flight: \(inFlight.count) of \(killed.count)"))
        for client in finished {
          #expect(client.status == .exited(0), h.diagnostics(client.stdout + client.stderr))
          #expect(client.stdout.hasSuffix("verified \(pages(mib: 256)) pages, 0 wrong\n"), h.diagnostics(client.stdout + client.stderr))
        }
        #expect(try Self.refusals(h.status()).isEmpty, h.diagnostics)
      }
    }

    /// The status's refusals of any kind (client, request, regions, decision, delegation, store reply), by key.
    static func refusals(_ status: BrokerStatus) -> [String: UInt64] {
      status.tally.counts.filter { $0.key.contains("Refused") && $0.value > 0 }
    }
  }
}

/// Resident pages of a process (/proc/PID/statm), 0 if it is gone.
private func residentPages(_ pid: pid_t) -> Int {
  let fields = readTextFile("/proc/\(pid)/statm").split(separator: " ")
  return fields.count > 1 ? Int(fields[1]) ?? 0 : 0
}

extension Substring {
  fileprivate func trimmingSuffix(_ suffix: String) -> Substring { hasSuffix(suffix) ? dropLast(suffix.count) : self }
}
