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
  }
}
