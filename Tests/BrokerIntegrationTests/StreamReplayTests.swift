import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Delegation streams and the snapshot plugin's working sets (issue 15), through the real broker.
  @Suite("Delegation streams and working sets")
  struct StreamReplay {
    /// The record's words: magic, version, size, device, inode, mtime s, mtime ns, count, offsets..., hash.
    static func recordWords(_ path: String) -> [UInt64] {
      let fd = open(path, O_RDONLY)
      guard fd >= 0 else { return [] }
      defer { close(fd) }
      var words = [UInt64](repeating: 0, count: 1 << 16)
      let n = words.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
      return Array(words.prefix(max(n, 0) / 8))
    }

    /// What a record must say of the snapshot at `path`: size, device, inode, mtime.
    static func identity(_ path: String) -> [UInt64] {
      var info = stat()
      stat(path, &info)
      return [UInt64(info.st_size), UInt64(info.st_dev), UInt64(info.st_ino), UInt64(info.st_mtim.tv_sec), UInt64(info.st_mtim.tv_nsec)]
    }

    @Test("streamed: the broker fills the region in the background beside the faults, every byte exact")
    func streamed() throws {
      try Harness.run("streamed") { h in
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--delegate", "--stream", "--prefetch", "32"])
        let size = 16 << 20 + 123
        let path = try SamplePlugins.writeSnapshot(h, size: size)
        let outcome = try h.runClient("snapshot", mib: 16, threads: 2, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
        #expect(outcome.status == .exited(0) && outcome.summary.hasSuffix(" 0 wrong"), h.diagnostics(outcome.stdout + outcome.stderr))
      }
    }

    @Test("streamed while the client drops ranges: dropped pages read zeros, the stream never brings one back")
    func streamRacesDrops() throws {
      try Harness.run("stream-drops") { h in
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--delegate", "--stream", "--prefetch", "32"])
        let path = try SamplePlugins.writeSnapshot(h, size: 16 << 20)
        for _ in 0..<3 {
          let outcome = try h.runClient("snapshot-stream-drops", mib: 16, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
          #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
          #expect(outcome.summary == "verified 4096 pages, 2048 dropped, 0 wrong", h.diagnostics(outcome.stdout))
        }
      }
    }

    @Test("working set: recorded by the first restore, replayed by the next (every page exact); a stale or corrupt record is ignored and recorded again")
    func recordReplay() throws {
      try Harness.run("record-replay") { h in
        let record = h.directory + "/working-set"
        let stats = h.directory + "/snapshot.stats"
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--prefetch", "8", "--record", record, "--replay", record, "--stats", stats])
        let path = try SamplePlugins.writeSnapshot(h, size: 4 << 20)
        let pages = UInt64(4 << 20 / pageSize)
        let run = { (label: String) throws in
          let outcome = try h.runClient("snapshot", mib: 4, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
          #expect(outcome.status == .exited(0) && outcome.summary.hasSuffix(" 0 wrong"), h.diagnostics("\(label): " + outcome.stdout + outcome.stderr))
        }
        // Recorded: one fault per aligned 8-page block, in order (the client reads every page in order).
        try run("record")
        #expect(waitUntil(timeout: 5) { Self.recordWords(record).count == 8 + Int(pages / 8) + 1 }, h.diagnostics("record: \(Self.recordWords(record).prefix(10))"))
        let recorded = Self.recordWords(record)
        #expect(Array(recorded[2..<7]) == Self.identity(path))
        #expect(Array(recorded[8..<8 + Int(pages / 8)]) == (0..<pages / 8).map { $0 * 8 * UInt64(pageSize) })
        // Replayed: delegated and streamed, the plugin sees no fault; the record is left as it was.
        try run("replay")
        let replayed = SamplePlugins.wallClock()
        #expect(waitUntil(timeout: 3) { SamplePlugins.rewritten(stats, after: replayed) }, h.diagnostics("the plugin did not rewrite its statistics"))
        #expect(SamplePlugins.statistics(stats)["faults"] == Int(pages / 8), h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
        #expect(Self.recordWords(record) == recorded)
        // The snapshot rewritten (another inode, size and time): the record is stale, ignored, recorded anew.
        unlink(path)
        _ = try SamplePlugins.writeSnapshot(h, size: 4 << 20)
        try run("stale")
        #expect(waitUntil(timeout: 5) { Array(Self.recordWords(record).dropFirst(2).prefix(5)) == Self.identity(path) }, h.diagnostics("stale record not replaced"))
        // A corrupt record (one offset changed, the checksum not): ignored, recorded anew.
        var corrupt = Self.recordWords(record)
        corrupt[9] ^= 0x1000
        let fd = open(record, O_WRONLY | O_TRUNC)
        _ = corrupt.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        try run("corrupt")
        #expect(waitUntil(timeout: 5) { Self.recordWords(record).count == recorded.count && Self.recordWords(record)[9] == corrupt[9] ^ 0x1000 },
                h.diagnostics("corrupt record not replaced"))
      }
    }
  }
}
