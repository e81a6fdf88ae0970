import Glibc
import Testing

extension BrokerIntegrationTests {
  /// The sample plugins of Examples/ through the real broker (issue 4).
  @Suite("Sample plugins")
  struct SamplePlugins {
    /// Writes a file of `size` bytes of pseudo-random content; returns its path.
    static func writeSnapshot(_ h: Harness, size: Int) throws -> String {
      let path = h.directory + "/snapshot-\(size).img"
      var state: UInt64 = 0x9E37_79B9_7F4A_7C15 &* UInt64(size)
      let bytes = (0..<size).map { _ -> UInt8 in
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
      }
      let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
      guard fd >= 0, bytes.withUnsafeBytes({ write(fd, $0.baseAddress, size) }) == size else { throw HarnessError("cannot write \(path)") }
      close(fd)
      return path
    }

    static func statistics(_ path: String) -> [String: Int] {
      var result: [String: Int] = [:]
      for line in readTextFile(path).split(separator: "\n") {
        let parts = line.split(separator: "=")
        if parts.count == 2, let value = Int(parts[1]) { result[String(parts[0])] = value }
      }
      return result
    }

    /// Whether the plugin rewrote its statistics file after the wall-clock time `after`
    /// (it does at least every 200 ms): figures from before that may predate the client.
    static func rewritten(_ path: String, after: timespec) -> Bool {
      var info = stat()
      guard stat(path, &info) == 0 else { return false }
      return (info.st_mtim.tv_sec, info.st_mtim.tv_nsec) > (after.tv_sec, after.tv_nsec)
    }

    static func wallClock() -> timespec {
      var time = timespec()
      clock_gettime(CLOCK_REALTIME, &time)
      return time
    }

    @Test("snapshot: every byte exact, the last partial page's tail zero, from two threads")
    func snapshotExact() throws {
      try Harness.run("snapshot") { h in
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let size = 3 << 20 + 1000  // not a whole number of pages
        let path = try Self.writeSnapshot(h, size: size)
        let outcome = try h.runClient("snapshot", mib: 1, threads: 2, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \((size + pageSize - 1) / pageSize) pages of \(size) bytes, 0 wrong", h.diagnostics)
      }
    }

    @Test("snapshot, replaced after the client dropped pages: the new plugin is told of them, and they read zeros (never the file's old bytes)")
    func snapshotReplacedAfterDrops() throws {
      try Harness.run("snapshot-dropped") { h in
        let first = try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let path = try Self.writeSnapshot(h, size: 1 << 20)
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("snapshot-dropped", mib: 1, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path].merging(gate.environment) { $1 })
        #expect(gate.awaitClient() == "dropped", h.diagnostics(client.stdout + client.stderr))
        // kill -9: whatever the plugin knew of the drops dies with it.
        kill(first.pid, SIGKILL)
        _ = first.wait(timeout: 10)
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        gate.release()
        let status = client.wait(timeout: 30)
        #expect(status == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("verified 256 pages, 128 dropped, 0 wrong\n"), h.diagnostics(client.stdout))
      }
    }

    @Test("snapshot prefetch: one fault per aligned 16-page block, the other pages arrive with it")
    func snapshotPrefetch() throws {
      try Harness.run("prefetch") { h in
        let stats = h.directory + "/snapshot.stats"
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--prefetch", "16", "--stats", stats])
        let size = 4 << 20
        let path = try Self.writeSnapshot(h, size: size)
        let outcome = try h.runClient("snapshot", mib: 1, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
        #expect(outcome.status == .exited(0) && outcome.summary.hasSuffix(" 0 wrong"), h.diagnostics(outcome.stdout + outcome.stderr))
        // Touched in order by one thread: exactly one fault per 64 KiB block.
        #expect(waitUntil(timeout: 3) { Self.statistics(stats)["faults"] == size / (16 * pageSize) }, h.diagnostics("stats: \(Self.statistics(stats))"))
      }
    }

    @Test("snapshot delegated: the broker serves the file itself, the plugin sees no fault, every byte exact")
    func snapshotDelegated() throws {
      try Harness.run("delegated") { h in
        let stats = h.directory + "/snapshot.stats"
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--delegate", "--prefetch", "4", "--stats", stats])
        let size = 2 << 20 + 123
        let path = try Self.writeSnapshot(h, size: size)
        let outcome = try h.runClient("snapshot", mib: 1, threads: 2, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
        #expect(outcome.status == .exited(0) && outcome.summary.hasSuffix(" 0 wrong"), h.diagnostics(outcome.stdout + outcome.stderr))
        let clientDone = Self.wallClock()
        #expect(waitUntil(timeout: 3) { Self.rewritten(stats, after: clientDone) }, h.diagnostics("the plugin did not rewrite its statistics"))
        #expect(Self.statistics(stats)["faults"] == 0, h.diagnostics("stats: \(Self.statistics(stats))"))
      }
    }

    @Test("snapshot: a missing or short file is refused at Register time with a clear error")
    func snapshotRefusedAtRegister() throws {
      try Harness.run("snapshot-refused") { h in
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let missing = try h.runClient("snapshot", mib: 1, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": h.directory + "/nope.img"])
        #expect(missing.status == .exited(3), h.diagnostics(missing.stdout))
        #expect(missing.summary.contains("cannot open snapshot"), h.diagnostics(missing.stdout))
        // A file of 1 MiB behind a 2 MiB region: too short.
        let path = try Self.writeSnapshot(h, size: 1 << 20)
        let short = try h.runClient("snapshot", mib: 2, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
        #expect(short.status == .exited(3), h.diagnostics(short.stdout))
        #expect(short.summary.contains("has 1048576 bytes"), h.diagnostics(short.stdout))
      }
    }

    @Test("zero-fill: zeros for reads and writes, by the plugin and delegated to the broker")
    func zeroFill() throws {
      try Harness.run("zero-fill") { h in
        try h.startSamplePlugin("zero-fill-plugin", name: "zero-fill")
        try h.startSamplePlugin("zero-fill-plugin", name: "zero-fill-delegated", arguments: ["--delegate"])
        for plugin in ["zero-fill", "zero-fill-delegated"] {
          let outcome = try h.runClient("zero", mib: 8, threads: 2, plugin: plugin)
          #expect(outcome.status == .exited(0) && outcome.summary == "verified 2048 pages, 0 wrong", h.diagnostics("\(plugin): \(outcome.stdout)"))
        }
      }
    }

    @Test("swap: swap-out and swap-in round trips are exact, and writes during 20 swap-outs are never lost")
    func swapRoundTrips() throws {
      try Harness.run("swap") { h in
        let stats = h.directory + "/swap.stats"
        try h.startSamplePlugin("swap-plugin", name: "swap", arguments: ["--stats", stats])
        let outcome = try h.runClient("swap", mib: 4, threads: 1, plugin: "swap", loops: 20, timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary.hasPrefix("swap loops 20, pages dropped ") && outcome.summary.hasSuffix(", 0 wrong"), h.diagnostics(outcome.stdout))
        // The plugin kept the pages (the pattern is incompressible: never more than raw) and restored them.
        #expect(waitUntil(timeout: 3) { (Self.statistics(stats)["pages_restored"] ?? 0) > 0 }, h.diagnostics("stats: \(Self.statistics(stats))"))
        let held = Self.statistics(stats)
        #expect((held["held_bytes"] ?? 0) <= (held["raw_bytes"] ?? 0) && (held["raw_bytes"] ?? 0) > 0, h.diagnostics("stats: \(held)"))
      }
    }

    @Test("swap: a corrupt compressed block kills only that access (SIGBUS), the plugin keeps serving")
    func swapCorruptBlock() throws {
      try Harness.run("swap-corrupt") { h in
        let plugin = try h.startSamplePlugin("swap-plugin", name: "swap", arguments: ["--corrupt-offset", "0"])
        let outcome = try h.runClient("swap-corrupt", mib: 1, threads: 1, plugin: "swap")
        #expect(outcome.status == .signaled(SIGBUS), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(plugin.isRunning, h.diagnostics("the swap plugin died"))
        #expect(plugin.stderr.contains("corrupt block"), h.diagnostics(plugin.stderr))
        // The plugin keeps serving other clients.
        let after = try h.runClient("zero", mib: 1, threads: 1, plugin: "swap")
        #expect(after.status == .exited(0) && after.summary == "verified 256 pages, 0 wrong", h.diagnostics(after.stdout))
      }
    }
  }
}
