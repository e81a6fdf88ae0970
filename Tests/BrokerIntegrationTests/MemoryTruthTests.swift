import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Where the broker's region table and the kernel's registrations could part
  /// (DESIGN §2, §3.6): each page reads what it must, or the access fails
  /// loudly; no thread is woken forever.
  @Suite("The broker's view of memory agrees with the kernel's")
  struct MemoryTruth {
    /// Runs fixture client `scenario` against a fresh broker and a fixture
    /// plugin in `mode`: it must exit 0 with `summary`, and nothing may have
    /// failed closed (each of these workloads is right, so none may need to).
    private func expectExact(
      _ scenario: String, mode: String = "pattern", mib: Int = 0, threads: Int = 1, loops: Int? = nil, timeout: Double = 20, summary: String,
      sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
      try Harness.run(scenario, sourceLocation: sourceLocation) { h in
        try h.startPlugin(name: "fixture", mode: mode)
        let outcome = try h.runClient(scenario, mib: mib, threads: threads, plugin: "fixture", loops: loops, timeout: timeout, sourceLocation: sourceLocation)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr), sourceLocation: sourceLocation)
        #expect(outcome.summary == summary, h.diagnostics, sourceLocation: sourceLocation)
        #expect(try h.status().tally[.faultFailedClosed] == 0, h.diagnostics, sourceLocation: sourceLocation)
      }
    }

    /// Runs fixture client `scenario` (the broker spawning the pattern plugin)
    /// to its gate `step`, kills and restarts the broker, lets the client go on
    /// (it waits for its own re-attach): it must exit 0, its last line `summary`.
    private func acrossBrokerKill(_ scenario: String, step: String, mib: Int = 0, summary: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
      try Harness.run(scenario, spawning: [.init(name: "pattern", arguments: ["plugin", "pattern", "pattern"])], sourceLocation: sourceLocation) { h in
        let gate = try Gate(in: h.directory)
        // SIGBUS, where expected, ends the process at once (no backtracer).
        let client = try h.startClient(scenario, mib: mib, threads: 1, plugin: "pattern", extraEnvironment: gate.reattaching.merging(["SWIFT_BACKTRACE": "enable=no"]) { $1 })
        #expect(gate.awaitClient() == step, h.diagnostics(client.stdout + client.stderr), sourceLocation: sourceLocation)
        try h.killAndRestartBroker()
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr), sourceLocation: sourceLocation)
        #expect(client.stdout.hasSuffix(summary + "\n"), h.diagnostics(client.stdout), sourceLocation: sourceLocation)
      }
    }

    @Test("prefetch over pages dropped behind a present one: the range copy's EEXIST does not settle the faulting page")
    func prefetchOverDroppedPages() throws {
      try expectExact("prefetch-dontneed", mode: "prefetch-refill", summary: "prefetch over dropped pages: 64 pages, 0 wrong")
    }

    @Test("the same with the snapshot plugin, prefetching and delegated to the broker")
    func prefetchOverDroppedPagesSnapshot() throws {
      try Harness.run("prefetch-dontneed-snapshot") { h in
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--delegate", "--prefetch", "16"])
        let path = try SamplePlugins.writeSnapshot(h, size: 64 * pageSize)
        let outcome = try h.runClient("prefetch-dontneed", mib: 0, threads: 1, plugin: "snapshot", timeout: 20, extraEnvironment: ["FIXTURE_FILE": path])
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "prefetch over dropped pages: 64 pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("a region grown by mremap in place, or moved while growing: the old part keeps its bytes, the new tail reads zeros", arguments: [0, 1])
    func grownRegion(moving: Int) throws {
      // The tail is the broker's (new memory): no plugin decides it, nothing fails closed.
      try expectExact("grow", mib: 1, loops: moving, summary: "grown \(moving == 1 ? "with a move" : "in place") to \(2 << 20) bytes, 0 wrong")
    }

    @Test("two threads moving memory into each other's holes (300 rounds): a late trailing UNMAP never cuts the newcomer")
    func concurrentMovers() throws {
      try expectExact("concurrent-movers", threads: 2, loops: 300, timeout: 60, summary: "concurrent movers: 300 rounds, 0 wrong pages")
    }

    @Test("fork: the child's pages read what the parent's held (copied, dropped, never read, zeros where WIPEONFORK), its plugin is told, and the child is closed when it exits")
    func forkedChild() throws {
      try Harness.run("fork") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("fork", mib: 0, threads: 1, plugin: "pattern", timeout: 20)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "forked: child exit 0, parent wrong 0", h.diagnostics)
        let forked = h.eventLog("pattern").first { $0.hasPrefix("forked ") }.map { $0.split(separator: " ") }
        let child = try #require(forked.map { String($0[1]) }, h.diagnostics("no forked event"))
        #expect(waitUntil(timeout: 5) { h.eventLog("pattern").contains("closed \(child)") }, h.diagnostics("the child's exit was not noticed"))
        #expect(h.eventLog("pattern").contains("regionClosed \(child) 1"), h.diagnostics)
      }
    }

    @Test("fork, then the broker killed (-9): the parent kept the child's uffd and poisons its unfilled pages; the child gets SIGBUS, never zeros")
    func forkedChildBrokerLoss() throws {
      // The parent re-attaching poisons the child's unfilled pages on the way.
      try acrossBrokerKill("fork-broker-loss", step: "forked", summary: "child signal \(SIGBUS)")
    }

    @Test("a grandchild, then the broker killed (-9): the root client kept its uffd too; SIGBUS, never zeros")
    func forkedGrandchildBrokerLoss() throws {
      try acrossBrokerKill("fork-tree-broker-loss", step: "forked", summary: "grandchild signal \(SIGBUS)")
    }

    @Test("fork past maxClients: the child is not served, and its unfilled pages fail closed (SIGBUS), never zeros")
    func forkedChildPastLimit() throws {
      try Harness.run("fork-limit", configFields: [#""maxClients": 1"#]) { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("fork", mib: 0, threads: 1, plugin: "pattern", timeout: 20, extraEnvironment: ["SWIFT_BACKTRACE": "enable=no"])
        #expect(outcome.summary == "forked: child signal \(SIGBUS), parent wrong 0", h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(h.waitForStatus { $0.tally[.forkRefused, "limit"] == 1 }, h.diagnostics)
      }
    }

    @Test("fork with a plugin that does not serve children: the child's unfilled pages fail closed (SIGBUS), never zeros")
    func forkedChildRefused() throws {
      try Harness.run("fork-refused") { h in
        try h.startPlugin(name: "pattern", mode: "no-fork")
        let outcome = try h.runClient("fork", mib: 0, threads: 1, plugin: "pattern", timeout: 20, extraEnvironment: ["SWIFT_BACKTRACE": "enable=no"])
        #expect(outcome.summary == "forked: child signal \(SIGBUS), parent wrong 0", h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(try h.status().tally[.faultFailedClosed] > 0, h.diagnostics)
      }
    }

    @Test("re-attach after an mremap moved part of a region: the restarted broker serves it where it lies now")
    func reattachAfterMove() throws {
      try acrossBrokerKill("remap-reattach", step: "moved", mib: 2, summary: "re-attached after a move: 511 pages, 0 wrong")
    }

    @Test("the mover race (100 rounds): movers into each other's holes while a reader faults, a dropper drops and children fork; every page of parent and children exact")
    func moverRace() throws {
      try expectExact("mover-race", threads: 4, loops: 100, timeout: 120, summary: "mover race: 100 rounds, 4 children, 0 wrong")
    }

    @Test("a client that unmaps its regions before it goes: RegionClosed for each, then Closed, last")
    func closedAfterUnmap() throws {
      try Harness.run("unmap-exit") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("unmap-exit", mib: 0, threads: 1, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        let client = try #require(openedClients(h.eventLog("pattern")).first, h.diagnostics)
        #expect(waitUntil(timeout: 5) { h.eventLog("pattern").contains("closed \(client)") }, h.diagnostics)
        let events = h.eventLog("pattern").filter { $0.split(separator: " ").dropFirst().first == Substring("\(client)") }
        #expect(events.filter { $0.hasPrefix("regionClosed ") }.sorted() == ["regionClosed \(client) 1", "regionClosed \(client) 2"], h.diagnostics("\(events)"))
        #expect(events.last == "closed \(client)", h.diagnostics("\(events)"))
        #expect(events.filter { $0 == "closed \(client)" }.count == 1, h.diagnostics("\(events)"))
      }
    }
  }
}

extension BrokerIntegrationTests {
  /// Swapped-out pages live only with their plugin: they survive it, or fail closed.
  @Suite("Swapped-out data outlives its plugin")
  struct SwappedData {
    @Test("the swap plugin killed (-9) after a swap-out: its restart finds every page in the broker's descriptor store")
    func swapPluginKilled() throws {
      try Harness.run("swap-kill") { h in
        let plugin = try h.startSamplePlugin("swap-plugin", name: "swap")
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("swap-hold", mib: 4, threads: 1, plugin: "swap", extraEnvironment: gate.environment)
        let step = gate.awaitClient()
        #expect(step == "swapped 1024", h.diagnostics("client: \(String(describing: step)) \(client.stdout) \(client.stderr)"))
        kill(plugin.pid, SIGKILL)
        _ = plugin.wait(timeout: 5)
        let restarted = try h.startSamplePlugin("swap-plugin", name: "swap")
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("swap held: dropped 1024; verified 1024 pages, 0 wrong\n"), h.diagnostics(client.stdout))
        #expect(restarted.stderr.contains("recovered 1024 stored pages"), h.diagnostics(restarted.stderr))
        #expect(try h.status().tally[.swappedPagesLost] == 0, h.diagnostics)
      }
    }

    @Test("a swap-out after the region was moved works where it lies now, and leaves what is at its old address alone")
    func swapAfterMove() throws {
      try Harness.run("swap-moved") { h in
        try h.startSamplePlugin("swap-plugin", name: "swap")
        let outcome = try h.runClient("swap-moved", mib: 1, threads: 1, plugin: "swap")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "swap after a move: dropped 256; moved pages wrong 0; buffer intact true", h.diagnostics)
      }
    }

    @Test("the broker killed (-9) after a swap-out, the swap plugin with a state directory: the client re-attaches under its token and every page comes back")
    func brokerKilledSwapStateDirectory() throws {
      try Harness.run("swap-state-dir") { h in
        let state = h.directory + "/swap-state"
        let plugin = try h.startSamplePlugin("swap-plugin", name: "swap", arguments: ["--state-dir", state])
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("swap-hold", mib: 1, threads: 1, plugin: "swap", extraEnvironment: gate.reattaching)
        #expect(gate.awaitClient() == "swapped 256", h.diagnostics(client.stdout + client.stderr))
        try h.killAndRestartBroker()
        _ = plugin.wait(timeout: 5)  // its connection went with the broker
        let restarted = try h.startSamplePlugin("swap-plugin", name: "swap", arguments: ["--state-dir", state])
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("swap held: dropped 256; verified 256 pages, 0 wrong\n"), h.diagnostics(client.stdout))
        #expect(restarted.stderr.contains("recovered 256 stored pages"), h.diagnostics(restarted.stderr))
        #expect(try h.status().tally[.swappedPagesLost] == 0, h.diagnostics)
      }
    }

    /// The broker dies right after reading the client's first MADV_DONTNEED, before it acts on it
    /// (`UFFD_BROKER_CRASH_AFTER_READING`): the madvise has returned, the drop record was never
    /// sent. Without the read journal those 4 pages read the file's bytes (1 run in 8 of a plain
    /// kill after the drops hit that window).
    @Test("the broker killed right after reading a MADV_DONTNEED, before telling the client: the client re-attaches with that drop from the broker's read journal, and the new snapshot plugin serves zeros there")
    func brokerKilledAfterReadingDrop() throws {
      try Harness.run("drop-read-kill", brokerEnvironment: ["UFFD_BROKER_CRASH_AFTER_READING": "remove"]) { h in
        let plugin = try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let path = try SamplePlugins.writeSnapshot(h, size: 1 << 20)
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("snapshot-dropped", mib: 1, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path].merging(gate.environment) { $1 })
        #expect(h.broker.wait(timeout: 20) == .signaled(SIGKILL), h.diagnostics(client.stdout + client.stderr))
        _ = plugin.wait(timeout: 5)  // its connection went with the broker
        h.brokerEnvironment = [:]
        try h.killAndRestartBroker()
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        // The client's other madvises wait for the new broker to read them, after the re-attach.
        #expect(gate.awaitClient() == "dropped", h.diagnostics(client.stdout + client.stderr))
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified 256 pages, 128 dropped, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("the broker killed (-9) after the client dropped pages: it re-attaches with what it dropped, and the new snapshot plugin serves zeros there, never the file's bytes")
    func brokerKilledAfterDrops() throws {
      try Harness.run("drop-broker-kill") { h in
        let plugin = try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let path = try SamplePlugins.writeSnapshot(h, size: 1 << 20)
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("snapshot-dropped", mib: 1, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path].merging(gate.reattaching) { $1 })
        #expect(gate.awaitClient() == "dropped", h.diagnostics(client.stdout + client.stderr))
        try h.killAndRestartBroker()
        _ = plugin.wait(timeout: 5)  // its connection went with the broker
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified 256 pages, 128 dropped, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("the broker killed (-9) after a swap-out: the client re-attaches, and the pages no plugin holds any more fail closed (SIGBUS), never zeros")
    func brokerKilledAfterSwapOut() throws {
      try Harness.run("swap-broker-kill") { h in
        let plugin = try h.startSamplePlugin("swap-plugin", name: "swap")
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("swap-hold", mib: 1, threads: 1, plugin: "swap", extraEnvironment: gate.reattaching.merging(["SWIFT_BACKTRACE": "enable=no"]) { $1 })
        #expect(gate.awaitClient() == "swapped 256", h.diagnostics(client.stdout + client.stderr))
        try h.killAndRestartBroker()
        _ = plugin.wait(timeout: 5)  // its connection went with the broker
        try h.startSamplePlugin("swap-plugin", name: "swap")
        gate.release()
        #expect(client.wait(timeout: 30) == .signaled(SIGBUS), h.diagnostics(client.stdout + client.stderr))
        // The new broker asked the new plugin for the pages at the re-attach, and it had none.
        #expect(try h.status().tally[.swappedPagesLost] == 1 && h.status().faults.swappedBytesLost == 1 << 20, h.diagnostics)
      }
    }
  }
}
