import BrokerProtocol
import Testing

extension BrokerIntegrationTests {
  /// MADV_DONTNEED, munmap and mremap while faults are in flight (DESIGN §3.1, §3.2).
  @Suite("Removes, unmaps and remaps racing faults")
  struct Invalidation {
    @Test("MADV_DONTNEED racing a fault (600 times): zeros once madvise returned, never stale bytes")
    func dontneedRace() throws {
      try Harness.run("dontneed") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let loops = 600
        let outcome = try h.runClient("dontneed-race", mib: 0, threads: 1, plugin: "pattern", loops: loops, timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "dontneed races \(loops), stale pages 0", h.diagnostics)
        // The plugin saw every removal (it serves zeros for removed pages from then on).
        let events = h.eventLog("pattern")
        let client = try #require(openedClients(events).first, h.diagnostics)
        let removed = events.filter { $0.hasPrefix("removed \(client) ") }
        #expect(removed.count == loops, h.diagnostics("remove events: \(removed.count)"))
        // One page each, at every page of the region.
        let offsets = Set(removed.compactMap { line -> UInt64? in
          let fields = line.split(separator: " ")
          guard fields.count == 4, let start = UInt64(fields[2]), let end = UInt64(fields[3]), end - start == UInt64(pageSize) else { return nil }
          return start
        })
        #expect(offsets == Set((0..<loops).map { UInt64($0 * pageSize) }), h.diagnostics)
      }
    }

    @Test("A decision made before a MADV_DONTNEED of its page is dropped as stale and the fault redelivered")
    func staleDecisionDropped() throws {
      try Harness.run("stale") { h in
        // A hand-written plugin that answers a fault only once it has seen the
        // page's removal, with the bytes it "decided" before: a stale decision.
        let plugin = try ManualPlugin(socketPath: h.pluginSocket, name: "stale")
        // dontneed-late: madvise 2 ms after the reader thread starts, so its fault is usually in flight.
        let loops = 100
        let client = try h.startClient("dontneed-late", mib: 0, threads: 1, plugin: "stale", loops: loops)
        var removed = Set<UInt64>()
        var held: [UInt64: PagefaultEvent] = [:]
        var staleSent = 0
        var staleIDs = Set<UInt64>()
        var staleOffsets = Set<UInt64>()
        var redeliveredOffsets = Set<UInt64>()
        let deadline = now() + 30
        while client.isRunning && now() < deadline {
          try plugin.serveOnce(milliseconds: 10) { batch, decisions in
            for event in batch.events {
              switch event {
              case .removed(let range):
                for offset in stride(from: range.startOffset, to: range.startOffset + UInt64(range.range.count), by: pageSize) {
                  removed.insert(offset)
                  if let fault = held.removeValue(forKey: offset) {
                    decisions.append(.init(faultID: fault.faultID, kind: .copy, address: fault.address, length: pageSize, data: Pattern.page(backingOffset: offset, pageSize: pageSize)))
                    staleSent += 1
                    staleIDs.insert(fault.faultID)
                    staleOffsets.insert(offset)
                  }
                }
              case .pagefault(let fault):
                if removed.contains(fault.offset) {
                  // Seen after the removal (invariant 1): the page reads as zeros now.
                  decisions.append(.init(faultID: fault.faultID, kind: .zero, address: fault.address, length: pageSize))
                  #expect(!staleIDs.contains(fault.faultID), "a redelivery reuses a fault id")
                  if staleOffsets.contains(fault.offset) { redeliveredOffsets.insert(fault.offset) }
                } else {
                  held[fault.offset] = fault
                }
              default: break
              }
            }
          }
        }
        #expect(client.wait(timeout: 1) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("dontneed races \(loops), stale pages 0\n"), h.diagnostics(client.stdout))
        // The stale path was taken (the fault won the race at least sometimes), and each stale answer was redelivered.
        #expect(staleSent > 0, h.diagnostics("no fault was outstanding when its page was removed"))
        #expect(redeliveredOffsets == staleOffsets, h.diagnostics("stale answers: \(staleSent), not redelivered: \(staleOffsets.subtracting(redeliveredOffsets).sorted())"))
        #expect(held.isEmpty, h.diagnostics)
        #expect(try h.status().tally[.decisionRefused] == 0, h.diagnostics)
      }
    }

    @Test("munmap and mremap while a thread faults: moved pages keep their content; the plugin is told")
    func remapWhileFaulting() throws {
      try Harness.run("remap") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let mib = 4
        let outcome = try h.runClient("remap", mib: mib, threads: 1, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "remapped \((mib << 20) / 2) bytes, 0 wrong pages", h.diagnostics)
        let client = try #require(openedClients(h.eventLog("pattern")).first, h.diagnostics)
        #expect(waitUntil(timeout: 5) { h.eventLog("pattern").contains("closed \(client)") }, h.diagnostics)
        let events = h.eventLog("pattern")
        let quarter = (mib << 20) / 4
        // The upper half moved (region 1 now has a piece elsewhere); the second quarter was unmapped.
        #expect(events.contains { $0.hasPrefix("remapped \(client) 1 ") }, h.diagnostics)
        #expect(events.contains("unmapped \(client) \(quarter) \(2 * quarter)"), h.diagnostics)
        // Order: the remap and the unmap reach the plugin before the client is closed.
        let closedIndex = events.firstIndex(of: "closed \(client)")
        let remapIndex = events.firstIndex { $0.hasPrefix("remapped \(client) ") }
        #expect(remapIndex != nil && closedIndex != nil && remapIndex! < closedIndex!, h.diagnostics)
      }
    }
  }
}
