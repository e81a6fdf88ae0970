import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Clones of one snapshot: two clients map one tmpfs file MAP_PRIVATE as
  /// shared-memory regions (issue 15). The first clone's faults fill the
  /// file's page cache; the second's are minor faults, mapped by the broker
  /// with no plugin asked; each clone's writes stay its own.
  @Suite("Shared memory")
  struct SharedMemory {
    /// A tmpfs file of `mib` MiB in /dev/shm, removed after `body`.
    static func withSnapshotFile(mib: Int, _ body: (String) throws -> Void) throws {
      let path = "/dev/shm/uffd-broker-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
      let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o600)
      guard fd >= 0, ftruncate(fd, off_t(mib << 20)) == 0 else { throw HarnessError("cannot make \(path): \(errno)") }
      close(fd)
      defer { unlink(path) }
      try body(path)
    }

    /// Runs clone A to its gate, clone B to its end, then A to its end; checks
    /// that B's faults (and both clones' after MADV_DONTNEED) were minor and
    /// reached no plugin. `faultsSent`: what the plugin was asked, per status.
    static func twoClones(_ h: Harness, mib: Int, plugin: String, environment: [String: String], faultsSent: (BrokerStatus) -> UInt64) throws {
      let pages = (mib << 20) / pageSize
      let baseline = h.brokerDescriptorCount()
      let gate = try Gate(in: h.directory)
      let first = try h.startClient("shm-clone", mib: mib, threads: 2, plugin: plugin, extraEnvironment: environment.merging(gate.environment) { $1 })
      #expect(gate.awaitClient() == "written", h.diagnostics(first.stdout + first.stderr))
      let afterFirst = try h.status()
      #expect(afterFirst.faults.minorFaultsResolved == 0, h.diagnostics("\(afterFirst.faults)"))
      let second = try h.runClient("shm-clone", mib: mib, threads: 2, plugin: plugin, extraEnvironment: environment)
      #expect(second.status == .exited(0), h.diagnostics(second.stdout + second.stderr))
      #expect(second.summary == "shared memory: \(pages) pages, wrong: 0 at first, 0 written, 0 after the gate, 0 after MADV_DONTNEED", h.diagnostics)
      // Every page of B: a minor fault at first and again after its MADV_DONTNEED; none asked of the plugin.
      let afterSecond = try h.status()
      #expect(afterSecond.faults.minorFaultsResolved >= UInt64(2 * pages), h.diagnostics("\(afterSecond.faults)"))
      #expect(faultsSent(afterSecond) == faultsSent(afterFirst), h.diagnostics("\(afterFirst.faults) then \(afterSecond.faults)"))
      gate.release()
      #expect(first.wait(timeout: 30) == .exited(0), h.diagnostics(first.stdout + first.stderr))
      #expect(first.stdout.hasSuffix("shared memory: \(pages) pages, wrong: 0 at first, 0 written, 0 after the gate, 0 after MADV_DONTNEED\n"), h.diagnostics(first.stdout))
      let last = try h.status()
      #expect(last.faults.minorFaultsResolved >= UInt64(3 * pages) && faultsSent(last) == faultsSent(afterFirst) && last.faults.failedClosed == 0, h.diagnostics("\(last.faults)"))
      // Each clone's file is let go with it; the broker keeps one descriptor more, its own userfaultfd for shared memory.
      #expect(h.waitForBrokerDescriptors(baseline + 1), h.diagnostics("descriptors: \(h.brokerDescriptorCount()), before: \(baseline)"))
    }

    @Test("two MAP_PRIVATE clones of one memfd-like file, served by a plugin (64 KiB prefetches): every page right in both, the second clone's faults minor, writes private")
    func clonesFromPlugin() throws {
      try Self.withSnapshotFile(mib: 2) { path in
        try Harness.run("shm-plugin") { h in
          try h.startPlugin(name: "prefetch", mode: "prefetch")
          try Self.twoClones(h, mib: 2, plugin: "prefetch", environment: ["FIXTURE_SHM": path]) { $0.plugin("prefetch")?.faultsSent ?? .max }
        }
      }
    }

    @Test("the same, served by the broker-local path (a snapshot file delegated by the snapshot plugin)")
    func clonesFromDelegatedFile() throws {
      try Self.withSnapshotFile(mib: 2) { path in
        try Harness.run("shm-local") { h in
          try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--delegate"])
          let snapshot = try SamplePlugins.writeSnapshot(h, size: 2 << 20)
          try Self.twoClones(h, mib: 2, plugin: "snapshot", environment: ["FIXTURE_SHM": path, "FIXTURE_FILE": snapshot]) { UInt64($0.faults.resolvedLocally + $0.faults.faultsSent) }
        }
      }
    }

    @Test("a MAP_SHARED mapping of the file: pages filled once, writable, the writes in the file, read back after MADV_DONTNEED as minor faults")
    func sharedMapping() throws {
      try Self.withSnapshotFile(mib: 1) { path in
        try Harness.run("shm-shared") { h in
          try h.startPlugin(name: "pattern", mode: "pattern")
          let outcome = try h.runClient("shm-clone", mib: 1, threads: 2, plugin: "pattern", extraEnvironment: ["FIXTURE_SHM": path, "FIXTURE_SHM_SHARED": "1"])
          let pages = (1 << 20) / pageSize
          #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
          #expect(outcome.summary == "shared memory: \(pages) pages, wrong: 0 at first, 0 written, 0 after the gate, 0 after MADV_DONTNEED", h.diagnostics)
          let status = try h.status()
          #expect(status.faults.minorFaultsResolved >= UInt64(pages) && status.plugin("pattern")?.faultsSent == UInt64(pages), h.diagnostics("\(status.faults)"))
          // The file holds the writes: its first word of each page inverted.
          let fd = open(path, O_RDONLY)
          defer { close(fd) }
          var word: UInt64 = 0
          #expect(pread(fd, &word, 8, off_t(5 * pageSize)) == 8 && word == ~((UInt64(5 * pageSize) &+ 1) &* 0x9E37_79B9_7F4A_7C15), h.diagnostics)
        }
      }
    }

    @Test("the broker killed (-9) under a clone: it re-attaches with its file, and after MADV_DONTNEED its pages are the snapshot's again, minor faults of the new broker")
    func brokerKilledUnderClone() throws {
      try Self.withSnapshotFile(mib: 1) { path in
        try Harness.run("shm-broker-kill") { h in
          let plugin = try h.startPlugin(name: "pattern", mode: "pattern")
          let gate = try Gate(in: h.directory)
          let client = try h.startClient("shm-clone", mib: 1, threads: 2, plugin: "pattern", extraEnvironment: ["FIXTURE_SHM": path].merging(gate.reattaching) { $1 })
          #expect(gate.awaitClient() == "written", h.diagnostics(client.stdout + client.stderr))
          try h.killAndRestartBroker()
          _ = plugin.wait(timeout: 5)  // its connection went with the broker
          try h.startPlugin(name: "pattern", mode: "pattern")
          gate.release()
          #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
          let pages = (1 << 20) / pageSize
          #expect(client.stdout.hasSuffix("shared memory: \(pages) pages, wrong: 0 at first, 0 written, 0 after the gate, 0 after MADV_DONTNEED\n"), h.diagnostics(client.stdout))
          let status = try h.status()
          #expect(status.faults.minorFaultsResolved >= UInt64(pages) && status.plugin("pattern")?.faultsSent == 0, h.diagnostics("\(status.faults)"))
        }
      }
    }

    @Test("a shared-memory file the broker cannot fill as its client could (not tmpfs, or opened read-only) is refused, and the client told why")
    func unfitFileRefused() throws {
      try Self.withSnapshotFile(mib: 1) { path in
        try Harness.run("shm-refused") { h in
          try h.startPlugin(name: "pattern", mode: "pattern")
          let other = h.directory + "/not-shmem"
          let fd = open(other, O_RDWR | O_CREAT, 0o600)
          ftruncate(fd, 1 << 20)
          close(fd)
          for (environment, reason) in [(["FIXTURE_SHM_SEND": other], "is not a memfd or tmpfs file"),
                                        (["FIXTURE_SHM_SEND": path, "FIXTURE_SHM_SEND_READONLY": "1"], "must be opened read-write")] {
            let outcome = try h.runClient("shm-clone", mib: 1, threads: 1, plugin: "pattern", extraEnvironment: environment.merging(["FIXTURE_SHM": path]) { $1 })
            #expect(outcome.status == .exited(1) && outcome.stdout.contains(reason), h.diagnostics(outcome.stdout + outcome.stderr))
          }
          #expect(try h.status().plugin("pattern")?.faultsSent == 0, h.diagnostics)
        }
      }
    }
  }
}
