import Testing

extension BrokerIntegrationTests {
  /// Faults served by out-of-process plugins: copy, zero, prefetch, retry.
  @Suite("Serving faults")
  struct Serving {
    @Test("64 MiB touched from 2 threads through the pattern plugin: every byte is right, and the status has every fault's latency")
    func touch64MiB() throws {
      try Harness.run("touch") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("touch", mib: 64, threads: 2, plugin: "pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "verified \(pages(mib: 64)) pages, 0 wrong", h.diagnostics)
        // The plugin learned of the client once, and of its end.
        let clients = openedClients(h.eventLog("pattern"))
        #expect(clients.count == 1, h.diagnostics)
        if let client = clients.first {
          #expect(waitUntil(timeout: 5) { h.eventLog("pattern").contains("closed \(client)") }, h.diagnostics)
        }
        let status = try h.status()
        let latency = status.faultLatencyMicroseconds
        #expect(latency.count == status.faults.faultsResolved && latency.count > 0, h.diagnostics("\(latency)"))
        #expect(latency.p50 <= latency.p99 && latency.p99 <= latency.max && latency.max > 0, h.diagnostics("\(latency)"))
        #expect(status.plugin("pattern")?.decisionsApplied == status.faults.faultsResolved, h.diagnostics)
        // At --log-level debug (the harness's) the log follows each connection and region; no line per fault.
        let log = h.brokerLog
        for line in ["client connection accepted", "plugin connection accepted", "regions announced to their plugins", "plugin accepted a region"] {
          #expect(log.contains("debug uffd-broker: \(line)"), h.diagnostics(line))
        }
        #expect(log.split(separator: "\n").count < 100, h.diagnostics("a log line per fault?"))
      }
    }

    @Test("Regions added after Register are served with their own backing; an overlapping one is refused; a removed one is closed for the plugin")
    func addAndRemoveRegions() throws {
      try Harness.run("regions") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("add-remove", mib: 2, threads: 1, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "regions: added 1, overlap refused: bad region, refused range plain: true, verified 1024 pages, 0 wrong, removed region reads zeros: true", h.diagnostics)
        let client = try #require(openedClients(h.eventLog("pattern")).first, h.diagnostics)
        #expect(waitUntil(timeout: 5) { h.eventLog("pattern").contains("closed \(client)") }, h.diagnostics)
        let events = h.eventLog("pattern")
        #expect(events.filter { $0.hasPrefix("opened \(client) ") } == ["opened \(client) 1", "opened \(client) 2"], h.diagnostics)
        // RemoveRegions closed region 1 while the client went on (a remove in region 2 came after).
        let closedAt = events.firstIndex(of: "regionClosed \(client) 1")
        let laterRemoveAt = events.firstIndex(of: "removed \(client) 0 4096")
        #expect(closedAt != nil && laterRemoveAt != nil && closedAt! < laterRemoveAt!, h.diagnostics)
      }
    }

    @Test("Zero decisions map zero pages")
    func zeroDecisions() throws {
      try Harness.run("zero") { h in
        try h.startPlugin(name: "zero", mode: "zero")
        let outcome = try h.runClient("zero", mib: 8, threads: 2, plugin: "zero")
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("Prefetch decisions (64 KiB copies) fill every page right")
    func prefetchDecisions() throws {
      try Harness.run("prefetch") { h in
        try h.startPlugin(name: "prefetch", mode: "prefetch")
        let outcome = try h.runClient("touch", mib: 8, threads: 2, plugin: "prefetch")
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("Retry decisions: the broker redelivers each fault (a new fault id), then it is served")
    func retryDecisions() throws {
      try Harness.run("retry") { h in
        try h.startPlugin(name: "retry", mode: "retry-once")
        let outcome = try h.runClient("touch", mib: 2, threads: 2, plugin: "retry")
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "verified \(pages(mib: 2)) pages, 0 wrong", h.diagnostics)

        let lines = h.eventLog("retry").compactMap(DecisionLine.init)
        var byOffset: [UInt64: [DecisionLine]] = [:]
        for line in lines { byOffset[line.offset, default: []].append(line) }
        // Every page: exactly one retry, then exactly one serve of a redelivery.
        #expect(byOffset.count == pages(mib: 2), h.diagnostics)
        var wrongSequences: [UInt64] = []
        for (offset, decisions) in byOffset {
          let ok = decisions.count == 2 && decisions[0].what == "retry" && decisions[1].what == "served"
            && decisions[1].faultID != decisions[0].faultID
          if !ok { wrongSequences.append(offset) }
        }
        #expect(wrongSequences.isEmpty, h.diagnostics("pages without exactly retry-then-redelivered-serve: \(wrongSequences.sorted().prefix(10))"))
      }
    }
  }
}
