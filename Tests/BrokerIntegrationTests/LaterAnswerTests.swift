import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Faults a Swift plugin answers later (`PluginDecision.later`), from other
  /// threads, out of order (`FaultAnswers`), through the real broker (issue 13).
  @Suite("Answering later")
  struct LaterAnswers {
    @Test("64 MiB from 4 client threads, every fault deferred to 4 workers answering out of order (copies, 16 KiB ranges, zeros, retries): every byte right")
    func deferredOutOfOrder() throws {
      try Harness.run("later") { h in
        try h.startPlugin(name: "later", mode: "later")
        let outcome = try h.runClient("touch-holes", mib: 64, threads: 4, plugin: "later", timeout: 120)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 64)) pages, 0 wrong", h.diagnostics)
        let plugin = try #require(try h.status().plugin("later"), h.diagnostics)
        // Each kind of answer was applied, nothing refused, nothing left waiting.
        #expect(plugin.decisionsAppliedByKind.copy > 0 && plugin.decisionsAppliedByKind.zero > 0 && plugin.retries > 0, h.diagnostics("\(plugin)"))
        #expect(plugin.invalidDecisions == 0 && plugin.faultsInFlight == 0, h.diagnostics("\(plugin)"))
        // The runner's own count: every fault deferred, every answer sent.
        let stats = h.eventLogPath("later") + ".stats"
        #expect(waitUntil(timeout: 5) {
          let counts = SamplePlugins.statistics(stats)
          return counts["faultsPending"] == 0 && counts["faultsDeferred"] == counts["faults"] && (counts["faults"] ?? 0) > 0
        }, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
        #expect(SamplePlugins.statistics(stats)["answersDropped"] == 0, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
      }
    }

    @Test("Answers that come after their client went away are dropped by the runner, unsent; the plugin serves the next client exactly")
    func lateAnswersAfterTheRegionClosed() throws {
      try Harness.run("later-hold") { h in
        let process = try h.startPlugin(name: "later", mode: "later-hold")
        // Its two threads wait on faults the plugin holds.
        let first = try h.startClient("touch", mib: 1, threads: 2, plugin: "later")
        #expect(h.waitForStatus(timeout: 10) { $0.plugin("later")?.faultsInFlight == 2 }, h.diagnostics)
        first.stop(grace: 5)
        // When its region closes, the plugin answers the held faults, wrong bytes; the runner drops each one.
        var held: Int?
        #expect(waitUntil(timeout: 10) {
          held = h.eventLog("later").first { $0.hasPrefix("held ") }.flatMap { Int($0.split(separator: " ")[2]) }
          return held != nil
        }, h.diagnostics)
        #expect(held == 2, h.diagnostics)
        let stats = h.eventLogPath("later") + ".stats"
        #expect(waitUntil(timeout: 10) { SamplePlugins.statistics(stats)["answersDropped"] == held }, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
        let outcome = try h.runClient("touch-holes", mib: 8, threads: 2, plugin: "later")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics)
        let plugin = try #require(try h.status().plugin("later"), h.diagnostics)
        #expect(plugin.connectedPID == process.pid && plugin.invalidDecisions == 0, h.diagnostics("\(plugin)"))
        #expect(SamplePlugins.statistics(stats)["answersDropped"] == held, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
      }
    }

    @Test("A region removed while its fault is pending: the runner answers the fault retry at RegionClosed (the broker still waits for it), drops the plugin's late answer, and stays connected")
    func regionRemovedWhileItsFaultIsPending() throws {
      try Harness.run("later-remove") { h in
        let process = try h.startPlugin(name: "later", mode: "later-hold")
        let client = try h.startClient("remove-pending", mib: 1, threads: 1, plugin: "later")
        #expect(h.waitForStatus(timeout: 10) { $0.plugin("later")?.faultsInFlight == 1 }, h.diagnostics)
        kill(client.pid, SIGUSR1)
        #expect(waitUntil(timeout: 30) { client.stdout.contains("region 2") || !client.isRunning }, h.diagnostics)
        #expect(client.stdout.hasSuffix("removed region 1 with its fault pending; verified \(pages(mib: 1)) pages of region 2, 0 wrong\n"), h.diagnostics(client.stdout + client.stderr))
        // The client still lives (its faults are not forgotten): only the runner's retry settled the removed region's fault.
        #expect(h.waitForStatus { $0.plugin("later").map { $0.faultsInFlight == 0 && $0.connectedPID == process.pid } ?? false }, h.diagnostics)
        let stats = h.eventLogPath("later") + ".stats"
        #expect(h.eventLog("later").contains { $0.hasSuffix(" 1") && $0.hasPrefix("held ") }, h.diagnostics)
        #expect(waitUntil(timeout: 10) { SamplePlugins.statistics(stats)["answersDropped"] == 1 }, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
        kill(client.pid, SIGUSR1)
        #expect(client.wait(timeout: 10) == .exited(0), h.diagnostics(client.stderr))
        #expect(try h.status().plugin("later")?.invalidDecisions == 0, h.diagnostics)
      }
    }
  }
}
