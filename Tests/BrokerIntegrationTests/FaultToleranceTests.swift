import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Clients and plugins that go away mid-workload (DESIGN §3.3, §3.6).
  @Suite("Fault tolerance")
  struct FaultTolerance {
    @Test("A client exiting with faults in flight: the plugin is told Closed, the broker's descriptors return to before")
    func clientExitsMidway() throws {
      try Harness.run("exit-midway") { h in
        // hang: every fault is answered "retry", so the broker keeps redelivering them.
        try h.startPlugin(name: "slow", mode: "hang")
        let baseline = h.brokerDescriptorCount()
        let outcome = try h.runClient("exit-midway", mib: 1, threads: 4, plugin: "slow")
        #expect(outcome.status == .exited(0), h.diagnostics)
        #expect(outcome.summary == "exiting with faults in flight", h.diagnostics)
        let client = try #require(openedClients(h.eventLog("slow")).first, h.diagnostics)
        #expect(waitUntil(timeout: 5) { h.eventLog("slow").contains("closed \(client)") }, h.diagnostics)
        let events = h.eventLog("slow")
        // The faulting threads' pages (one each, 4 at most) were being retried when the client went away...
        let retried = Set(events.compactMap(DecisionLine.init).filter { $0.client == client }.map(\.offset))
        #expect((1...4).contains(retried.count) && retried.isSubset(of: (0..<4).map { UInt64($0 * pageSize) }), h.diagnostics("pages retried: \(retried.sorted())"))
        // ...and `closed` is the last word about that client.
        if let closedIndex = events.firstIndex(of: "closed \(client)") {
          let after = events[(closedIndex + 1)...].filter { $0.split(separator: " ").dropFirst().first == Substring("\(client)") }
          #expect(after.isEmpty, h.diagnostics("after closed: \(after)"))
        }
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
      }
    }

    @Test("A client exiting while a plugin holds its faults unanswered: Closed, late answers ignored, no leak")
    func clientExitsWithFaultsHeldByPlugin() throws {
      try Harness.run("exit-held") { h in
        let plugin = try ManualPlugin(socketPath: h.pluginSocket, name: "silent")
        let baseline = h.brokerDescriptorCount()
        let client = try h.startClient("exit-midway", mib: 1, threads: 4, plugin: "silent")
        var faults: [PagefaultEvent] = []
        var closedClient: UInt64?
        var clientID: UInt64?
        let deadline = now() + 10
        while closedClient == nil && now() < deadline {
          try plugin.serveOnce(milliseconds: 20) { batch, _ in
            for event in batch.events {
              switch event {
              case .regionOpened(let id, _, _, _, _): clientID = id
              case .pagefault(let fault): faults.append(fault)  // never answered
              case .closed(let id, _): closedClient = id
              default: break
              }
            }
          }
        }
        #expect(client.wait(timeout: 5) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(clientID != nil && closedClient == clientID, h.diagnostics)
        // One fault per faulting thread's page (4 at most), each sent once: held, so never redelivered.
        #expect((1...4).contains(faults.count) && Set(faults.map(\.address)).count == faults.count, h.diagnostics("faults: \(faults)"))
        // Late answers for the dead client's faults are dropped without harm.
        try plugin.send(faults.map { .init(faultID: $0.faultID, kind: .copy, address: $0.address, length: pageSize, data: Pattern.page(backingOffset: $0.offset)) })
        #expect(h.waitUntilHandled(plugin), h.diagnostics)
        #expect(h.waitForBrokerDescriptors(baseline), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
        // The plugin keeps its connection (no deadline tripped, nothing refused).
        let status = try h.status()
        #expect(status.plugin("silent")?.state == "connected" && status.tally[.pluginDisconnected] == 0, h.diagnostics)
        #expect(status.tally[.decisionRefused] == 0, h.diagnostics)
      }
    }

    @Test("A plugin that goes away before storing a swap-out chunk: the client's swap-out fails clearly and drops no page")
    func pluginLostDuringSwapOut() throws {
      try Harness.run("swap-lost") { h in
        var plugin: ManualPlugin? = try ManualPlugin(socketPath: h.pluginSocket, name: "keeper")
        let client = try h.startClient("swap-once", mib: 1, threads: 1, plugin: "keeper")
        var stores = 0
        let deadline = now() + 10
        while stores == 0 && now() < deadline {
          try plugin?.serveOnce(milliseconds: 20) { batch, decisions in
            for event in batch.events {
              switch event {
              case .pagefault(let fault):  // the client writes every page first
                decisions.append(.init(faultID: fault.faultID, kind: .zero, address: fault.address, length: pageSize))
              case .store: stores += 1  // never answered: the plugin goes away instead
              default: break
              }
            }
          }
        }
        #expect(stores > 0, h.diagnostics("no Store reached the plugin"))
        plugin = nil  // its connection closes
        #expect(client.wait(timeout: 10) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("swap-out failed: pluginRefused: the plugin went away before it stored the pages; verified 256 pages, 0 wrong\n"),
                h.diagnostics(client.stdout))
      }
    }

    @Test("A store reply from a plugin the store was not sent to is refused; the client drops its pages only on its own plugin's reply")
    func storeReplyFromAnotherPlugin() throws {
      try Harness.run("store-spoof") { h in
        let keeper = try ManualPlugin(socketPath: h.pluginSocket, name: "keeper")
        let other = try ManualPlugin(socketPath: h.pluginSocket, name: "other")
        let client = try h.startClient("swap-once", mib: 1, threads: 1, plugin: "keeper")
        var stored: [UInt64: [UInt8]] = [:]  // region offset -> page
        var spoofed = 0
        let deadline = now() + 20
        while client.isRunning && now() < deadline {
          try keeper.serveOnce(milliseconds: 10) { batch, decisions in
            var replies: [StoreReply] = []
            for event in batch.events {
              switch event {
              case .pagefault(let fault):  // zeros before the swap-out, the stored bytes after
                let page = stored[fault.offset]
                decisions.append(.init(faultID: fault.faultID, kind: page == nil ? .zero : .copy, address: fault.address, length: pageSize, data: page))
              case .store(let store):
                // First the other plugin claims to have stored it: refused, so nothing may be dropped yet.
                try other.send([], storeReplies: [StoreReply(storeID: store.storeID, error: nil)])
                if h.waitForStatus({ $0.plugin("other")?.tally[.storeReplyRefused] == UInt64(spoofed + 1) }) { spoofed += 1 }
                for start in stride(from: 0, to: store.data.count, by: pageSize) {
                  stored[store.offset + UInt64(start)] = Array(store.data[start..<start + pageSize])
                }
                replies.append(StoreReply(storeID: store.storeID, error: nil))
              default: break
              }
            }
            if !replies.isEmpty { try keeper.send([], storeReplies: replies) }
          }
        }
        #expect(client.wait(timeout: 5) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("swap-out dropped 256, kept 0; verified 256 pages, 0 wrong\n"), h.diagnostics(client.stdout))
        #expect(try spoofed > 0 && UInt64(spoofed) == h.status().tally[.storeReplyRefused], h.diagnostics("spoofed \(spoofed)"))
      }
    }

    @Test("A fault the plugin holds does not delay faults on other pages (no head-of-line blocking)")
    func noHeadOfLineBlocking() throws {
      try Harness.run("hol") { h in
        let plugin = try ManualPlugin(socketPath: h.pluginSocket, name: "hol")
        let client = try h.startClient("touch", mib: 1, threads: 2, plugin: "hol")
        var regions: [UInt64: RegionSpec] = [:]
        var held: PagefaultEvent?
        var servedWhileHeld = 0
        var released = false
        func answer(_ fault: PagefaultEvent) -> ManualPlugin.Decision {
          .init(faultID: fault.faultID, kind: .copy, address: fault.address, length: pageSize,
                data: Pattern.page(backingOffset: (regions[fault.clientID]?.backingOffset ?? 0) + fault.offset, pageSize: pageSize))
        }
        let deadline = now() + 20
        while client.isRunning && now() < deadline {
          try plugin.serveOnce(milliseconds: 10) { batch, decisions in
            for event in batch.events {
              switch event {
              case .regionOpened(let id, _, let region, _, _): regions[id] = region
              case .pagefault(let fault):
                if held == nil && !released {
                  held = fault  // the first fault: its thread waits; the other thread must not
                } else {
                  decisions.append(answer(fault))
                  if held != nil { servedWhileHeld += 1 }
                }
              default: break
              }
            }
            // Half a MiB of the other thread's pages served while one fault waits: release it.
            if let fault = held, servedWhileHeld >= pages(mib: 1) / 4 {
              decisions.append(answer(fault))
              held = nil
              released = true
            }
          }
        }
        #expect(released, h.diagnostics("faults served while one was held: \(servedWhileHeld)"))
        #expect(client.wait(timeout: 5) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified \(pages(mib: 1)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("A plugin that stops answering is dropped at its deadline; its parked faults go to its replacement")
    func hungPluginDeadline() throws {
      let deadlineMilliseconds = 300
      try Harness.run("deadline", pluginDeadlineMilliseconds: deadlineMilliseconds) { h in
        let stuck = try ManualPlugin(socketPath: h.pluginSocket, name: "stuck")
        let started = now()
        let client = try h.startClient("touch", mib: 1, threads: 2, plugin: "stuck")
        var faults: [PagefaultEvent] = []
        var firstFault: Double?
        var closedAt: Double?
        let deadline = now() + 10
        while closedAt == nil && now() < deadline {
          let arrival = try stuck.serveOnce(milliseconds: 10) { batch, _ in
            for case .pagefault(let fault) in batch.events {
              faults.append(fault)  // never answered
              if firstFault == nil { firstFault = now() }
            }
          }
          if case .closed = arrival { closedAt = now() }
        }
        let closed = try #require(closedAt, h.diagnostics("the broker kept a plugin that does not answer"))
        let held = try #require(firstFault, h.diagnostics("no fault reached the plugin"))
        // Not before the deadline (no fault can have been sent before the client started),
        // and not long after the plugin got its first fault (the broker checks every 100 ms).
        #expect(closed - started >= Double(deadlineMilliseconds) / 1000, h.diagnostics("dropped \(closed - started) s after the client started"))
        #expect(closed - held < 3, h.diagnostics("dropped \(closed - held) s after the first fault"))
        #expect(h.waitForStatus { $0.plugin("stuck")?.tally[.pluginDisconnected, "timedOut"] == 1 }, h.diagnostics)
        // The client waits (its faults are parked, not released onto zero pages)...
        #expect(client.isRunning, h.diagnostics)
        // ...until a plugin of that name serves them.
        try h.startPlugin(name: "stuck", mode: "pattern")
        #expect(client.wait(timeout: 10) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified \(pages(mib: 1)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("A spawned plugin that stops (SIGSTOP) is killed at its deadline and replaced; the client gets every page")
    func stoppedSpawnedPluginReplaced() throws {
      try Harness.run("stopped", spawning: [.init(name: "pattern", arguments: ["plugin", "pattern", "pattern"])], pluginDeadlineMilliseconds: 300) { h in
        #expect(h.waitForStatus(timeout: 10) { $0.plugin("pattern").map { $0.spawnedPID != 0 && $0.connectedPID == $0.spawnedPID } == true }, h.diagnostics)
        let pid = try h.status().plugin("pattern")!.spawnedPID
        kill(pid, SIGSTOP)
        let outcome = try h.runClient("touch", mib: 1, threads: 2, plugin: "pattern", timeout: 30)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 1)) pages, 0 wrong", h.diagnostics)
        #expect(kill(pid, 0) == -1 && errno == ESRCH, h.diagnostics("the stopped plugin \(pid) is still there"))
      }
    }

    @Test("A plugin that exits every 2000 faults, restarted by the test: a 32 MiB client gets every page right")
    func pluginRestartedByTest() throws {
      try Harness.run("restart") { h in
        var plugin = try h.startPlugin(name: "pattern", mode: "exit-after:2000")
        let client = try h.startClient("touch", mib: 32, threads: 2, plugin: "pattern")
        var exits = 0
        let deadline = now() + 60
        while client.isRunning && now() < deadline {
          if let status = plugin.poll() {
            #expect(status == .exited(3), h.diagnostics(plugin.stderr))
            exits += 1
            plugin = try h.startPlugin(name: "pattern", mode: "exit-after:2000")
          }
          FixtureProcess.waitForAnyExit([plugin, client], timeout: max(0, deadline - now()))
        }
        let status = client.wait(timeout: max(1, deadline - now()))
        #expect(status == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified \(pages(mib: 32)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
        // 8192 faults at most 2000 per incarnation: at least 4 exits mid-workload.
        #expect(exits >= pages(mib: 32) / 2000, h.diagnostics("plugin exits: \(exits)"))
        let tally = try #require(h.status().plugin("pattern")?.tally, h.diagnostics)
        #expect(tally[.pluginDisconnected] >= UInt64(exits) && tally[.pluginConnected] == UInt64(exits + 1), h.diagnostics("\(tally)"))
      }
    }

    @Test("A configured plugin that exits every 2000 faults is restarted by the broker; all pages right; stopped with the broker")
    func pluginRestartedByBroker() throws {
      try Harness.run("supervised", spawning: [.init(name: "pattern", arguments: ["plugin", "pattern", "exit-after:2000"])]) { h in
        let outcome = try h.runClient("touch", mib: 32, threads: 2, plugin: "pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 32)) pages, 0 wrong", h.diagnostics)
        let plugin = try #require(h.status().plugin("pattern"), h.diagnostics)
        #expect(plugin.tally[.pluginExited] >= UInt64(pages(mib: 32) / 2000), h.diagnostics("\(plugin.tally)"))
        #expect(plugin.tally[.pluginSpawned] == plugin.tally[.pluginExited] + 1, h.diagnostics("\(plugin.tally)"))
        // Stopping the broker stops (and reaps) the plugin it spawned last (the others were reaped as they exited).
        #expect(plugin.spawnedPID > 0, h.diagnostics)
        #expect(h.stopBroker() == .exited(0), h.diagnostics)
        #expect(kill(plugin.spawnedPID, 0) == -1 && errno == ESRCH, h.diagnostics("plugin \(plugin.spawnedPID) is still there after the broker stopped"))
      }
    }
  }
}

extension BrokerIntegrationTests {
  /// The broker itself dies (issue 6): clients must never read zeros.
  @Suite("Broker restart")
  struct BrokerRestart {
    @Test("broker kill -9 mid-workload, restarted: the client re-attaches and every page is exact", arguments: [1, 2, 3])
    func killAndRestart(round: Int) throws {
      try Harness.run("broker-restart-\(round)", spawning: [.init(name: "pattern", arguments: ["plugin", "pattern", "pattern"])]) { h in
        let client = try h.startClient("touch", mib: 128, threads: 2, plugin: "pattern")
        // Once it is registered and under way (a few thousand pages per round of 32768), pull the broker.
        #expect(h.waitForStatus(timeout: 20) { $0.faults.faultsResolved >= UInt64(2000 * round) }, h.diagnostics)
        #expect(client.isRunning, h.diagnostics("the client finished before the broker was killed"))
        try h.killAndRestartBroker()
        let status = client.wait(timeout: 60)
        #expect(status == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.contains("verified 32768 pages, 0 wrong"), h.diagnostics(client.stdout))
        // The new broker saw the same client register again.
        #expect(try h.status().tally[.clientRegistered] >= 1, h.diagnostics)
      }
    }

    @Test("no broker comes back: the poison policy fails the faulting access with SIGBUS, never zeros")
    func brokerGoneForGood() throws {
      try Harness.run("broker-gone") { h in
        try h.startPlugin(name: "slow", mode: "hang")  // faults stay outstanding while the broker dies
        // (The Swift runtime's crash backtracer tries to suspend the other threads, which are
        // blocked in page faults nobody serves: turn it off so SIGBUS ends the process at once.)
        let client = try h.startClient("touch", mib: 1, threads: 2, plugin: "slow", extraEnvironment: ["FIXTURE_LOSS_POLICY": "poison:300", "SWIFT_BACKTRACE": "enable=no"])
        #expect(waitUntil(timeout: 5) { h.eventLog("slow").contains { $0.hasPrefix("retry") } }, h.diagnostics)
        h.killBroker()
        let status = client.wait(timeout: 10)
        #expect(status == .signaled(SIGBUS), h.diagnostics("client: \(String(describing: status)) \(client.stdout) \(client.stderr)"))
      }
    }
  }
}
