import BrokerCore
import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Every decision is checked against the live region of its own fault (DESIGN §3.4).
  @Suite("Validation of plugin decisions")
  struct Validation {
    /// Fixture modes whose first answer for each page is invalid:
    /// outside (the page after the region), below (the page before it),
    /// misaligned (+8 bytes), short (half a page), overlong (a copy running one page past the end).
    @Test("An invalid decision is refused and logged, the fault redelivered and served right, the neighbours untouched",
          arguments: ["outside", "below", "misaligned", "short", "overlong"])
    func invalidDecisionRefused(mode: String) throws {
      try Harness.run("invalid-\(mode)") { h in
        let plugin = try h.startPlugin(name: "bad", mode: mode)
        // 8 pages between two 4-page guard regions of the same client, uffd and plugin.
        let regionPages = 8
        let outcome = try h.runClient("guarded", mib: 0, threads: 2, plugin: "bad", loops: regionPages, timeout: 15)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(regionPages) pages, 0 wrong, 0 guard pages written", h.diagnostics)

        // The broker refused each page's first answer, and counted it.
        let refusals = try #require(h.status().plugin("bad")?.tally[.decisionRefused], h.diagnostics)
        #expect(refusals == UInt64(regionPages), h.diagnostics)
        // Each page: one invalid answer, then one served answer to a redelivery (a new fault id).
        let decisions = h.eventLog("bad").compactMap(DecisionLine.init)
        var byOffset: [UInt64: [DecisionLine]] = [:]
        for line in decisions { byOffset[line.offset, default: []].append(line) }
        #expect(byOffset.count == regionPages, h.diagnostics)
        for (offset, lines) in byOffset {
          let ok = lines.count == 2 && lines[0].what == "invalid" && lines[1].what == "served" && lines[1].faultID != lines[0].faultID
          #expect(ok, h.diagnostics("page at offset \(offset): \(lines)"))
        }
        // As many refusals as invalid answers (a refused served answer would have left its page to a third fault).
        #expect(decisions.filter { $0.what == "invalid" }.count == regionPages, h.diagnostics)
        // A few invalid answers do not cost the plugin its connection.
        #expect(plugin.isRunning, h.diagnostics)
        #expect(try h.status().plugin("bad")?.tally[.pluginDisconnected] == 0, h.diagnostics)
      }
    }

    @Test("A plugin sending too many invalid decisions is disconnected; its faults go to its replacement")
    func tooManyInvalidDecisions() throws {
      let limit = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0).maxInvalidDecisions
      try Harness.run("invalid-many") { h in
        let faulty = try h.startPlugin(name: "flaky", mode: "outside")
        let client = try h.startClient("touch", mib: 1, threads: 2, plugin: "flaky")
        // The broker tells the plugin why and drops it; the fixture exits on that error.
        // (Its last words depend on whether it was reading the Error or sending when the broker closed.)
        let status = faulty.wait(timeout: 10)
        #expect(status == .exited(1), h.diagnostics(faulty.stderr))
        // (The plugin may see the Error before the broker has counted the disconnection.)
        #expect(h.waitForStatus { $0.plugin("flaky")?.tally[.pluginDisconnected, "invalidDecisions"] == 1 }, h.diagnostics)
        #expect(try h.status().plugin("flaky")?.tally[.decisionRefused] == UInt64(limit + 1), h.diagnostics)
        // Its faults are parked, not lost: the client waits...
        #expect(client.isRunning, h.diagnostics)
        // ...and a well-behaved plugin of the same name serves them all.
        try h.startPlugin(name: "flaky", mode: "pattern")
        let clientStatus = client.wait(timeout: 20)
        #expect(clientStatus == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified \(pages(mib: 1)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("Invalid delegations count toward the same limit: past it the plugin is dropped and its faults go to its replacement")
    func tooManyInvalidDelegations() throws {
      let limit = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0).maxInvalidDecisions
      try Harness.run("invalid-delegations") { h in
        let plugin = try ManualPlugin(socketPath: h.pluginSocket, name: "delegator")
        let client = try h.startClient("touch", mib: 1, threads: 1, plugin: "delegator")
        var opened: (clientID: UInt64, region: RegionSpec)?
        let deadline = now() + 10
        while opened == nil && now() < deadline {
          try plugin.serveOnce(milliseconds: 20) { batch, _ in
            for case .regionOpened(let clientID, _, let region, _, _) in batch.events { opened = (clientID, region) }
          }
        }
        let (clientID, region) = try #require(opened, h.diagnostics("no region reached the plugin"))
        // Each names a range past the region's end: refused, and counted.
        let past = UInt64(region.length)
        try plugin.send([], delegations: (0..<limit + 4).map { index in
          Delegation(clientID: clientID, regionID: region.id, offsets: past + UInt64(index * pageSize)..<past + UInt64((index + 1) * pageSize), source: .zero)
        })
        #expect(h.waitForStatus { $0.plugin("delegator")?.tally[.pluginDisconnected, "invalidDecisions"] == 1 }, h.diagnostics)
        #expect(try h.status().plugin("delegator")?.tally[.delegationRefused, "badOffsets"] == UInt64(limit + 1), h.diagnostics)
        try h.startPlugin(name: "delegator", mode: "pattern")
        #expect(client.wait(timeout: 20) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified \(pages(mib: 1)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("A decision for a fault id never sent is ignored; one for another plugin's fault (another client) is refused")
    func decisionsForOtherFaults() throws {
      // A long plugin deadline: the loop below waits for a log line while plugin A holds a fault.
      try Harness.run("manual-plugins", pluginDeadlineMilliseconds: 30_000) { h in
        let a = try ManualPlugin(socketPath: h.pluginSocket, name: "manual-a")
        let b = try ManualPlugin(socketPath: h.pluginSocket, name: "manual-b")
        let client1 = try h.startClient("touch", mib: 1, threads: 1, plugin: "manual-a")
        let client2 = try h.startClient("touch", mib: 1, threads: 1, plugin: "manual-b")
        let garbage = [UInt8](repeating: 0xAA, count: pageSize)
        let neverSent: UInt64 = 1 << 62

        var regions: [UInt64: RegionSpec] = [:]
        var pids: [UInt64: Int32] = [:]
        var eventsOf: [String: [BrokerEvent]] = ["manual-a": [], "manual-b": []]
        var crossFaultID: UInt64?
        var crossRefused = false
        var closedSeen: Set<String> = []

        func serve(_ plugin: ManualPlugin, milliseconds: Int) throws {
          try plugin.serveOnce(milliseconds: milliseconds) { batch, decisions in
            #expect(batch.error == nil, h.diagnostics)
            eventsOf[plugin.name, default: []].append(contentsOf: batch.events)
            for event in batch.events {
              switch event {
              case .regionOpened(let clientID, let client, let region, _, _):
                regions[clientID] = region
                pids[clientID] = client.pid
              case .pagefault(let fault):
                let region = try #require(regions[fault.clientID], h.diagnostics)
                let right = ManualPlugin.Decision(
                  faultID: fault.faultID, kind: .copy, address: fault.address, length: pageSize,
                  data: Pattern.page(backingOffset: region.backingOffset + fault.offset, pageSize: pageSize))
                if plugin === a {
                  // First a decision naming a fault id the broker never sent, with wrong bytes for this very page.
                  decisions.append(.init(faultID: neverSent + fault.faultID, kind: .copy, address: fault.address, length: pageSize, data: garbage))
                } else if crossFaultID == nil {
                  // Plugin A answers B's fault (client 2's memory) with wrong bytes, before B does.
                  crossFaultID = fault.faultID
                  // (A's own never-sent answers are refused too: count from where they stand.)
                  h.waitUntilHandled(a)
                  let before = try h.status().plugin("manual-a")?.tally[.decisionRefused, "notSentToPlugin"] ?? 0
                  try a.send([.init(faultID: fault.faultID, kind: .copy, address: fault.address, length: pageSize, data: garbage)])
                  crossRefused = try h.waitUntilHandled(a) && (h.status().plugin("manual-a")?.tally[.decisionRefused, "notSentToPlugin"]) == before + 1
                }
                decisions.append(right)
              case .closed:
                closedSeen.insert(plugin.name)
              default:
                break
              }
            }
          }
        }

        let deadline = now() + 20
        while (client1.isRunning || client2.isRunning || closedSeen.count < 2) && now() < deadline {
          try serve(a, milliseconds: 5)
          try serve(b, milliseconds: 5)
        }
        #expect(client1.wait(timeout: 1) == .exited(0), h.diagnostics(client1.stdout + client1.stderr))
        #expect(client2.wait(timeout: 1) == .exited(0), h.diagnostics(client2.stdout + client2.stderr))
        // Neither the never-sent decision nor the cross-plugin one wrote a byte.
        #expect(client1.stdout.hasSuffix("verified \(pages(mib: 1)) pages, 0 wrong\n"), h.diagnostics(client1.stdout))
        #expect(client2.stdout.hasSuffix("verified \(pages(mib: 1)) pages, 0 wrong\n"), h.diagnostics(client2.stdout))
        #expect(crossFaultID != nil, h.diagnostics)
        #expect(crossRefused, h.diagnostics)

        // Each plugin heard only of its own client, and of its end.
        let id1 = pids.first { $0.value == client1.pid }?.key
        let id2 = pids.first { $0.value == client2.pid }?.key
        #expect(id1 != nil && id2 != nil && id1 != id2, h.diagnostics)
        for (name, own) in [("manual-a", id1), ("manual-b", id2)] {
          let foreign = eventsOf[name, default: []].filter { event in clientID(of: event).map { $0 != own } ?? false }
          #expect(foreign.isEmpty, h.diagnostics("\(name) received events of another client: \(foreign.prefix(3))"))
          #expect(eventsOf[name, default: []].contains { if case .closed(own, _) = $0 { true } else { false } }, h.diagnostics)
        }
        // A was told of each of its refused decisions (naming the rule), B of none.
        let refusedA = eventsOf["manual-a", default: []].filter { if case .decisionRefused(_, "notSentToPlugin", _) = $0 { true } else { false } }
        let counted = try h.status().plugin("manual-a")?.tally[.decisionRefused] ?? 0
        #expect(!refusedA.isEmpty && UInt64(refusedA.count) == counted, h.diagnostics("\(refusedA.count) refusals told, \(counted) counted"))
        #expect(!eventsOf["manual-b", default: []].contains { if case .decisionRefused = $0 { true } else { false } }, h.diagnostics)
        // One invalid decision does not disconnect plugin A.
        #expect(try h.status().tally[.pluginDisconnected] == 0, h.diagnostics)
      }
    }
  }
}

/// The client an event is about.
func clientID(of event: BrokerEvent) -> UInt64? {
  switch event {
  case .pagefault(let fault): fault.clientID
  case .removed(let range), .unmapped(let range): range.clientID
  case .remapped(let remap): remap.clientID
  case .regionOpened(let clientID, _, _, _, _), .regionClosed(let clientID, _), .closed(let clientID, _): clientID
  case .store(let store): store.clientID
  case .decisionRefused: nil  // about the plugin's own decision
  }
}
