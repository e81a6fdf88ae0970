import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Guest and client memory of 2 MiB huge pages (`MAP_HUGETLB`), served
  /// through the broker a whole huge page per fault (issue 15). Each test
  /// raises `/proc/sys/vm/nr_hugepages` by what it maps and puts it back.
  @Suite("Huge pages",
         // Not root, no hugetlb in the kernel, or no free memory to make 2 MiB pages of: nothing to map.
         .enabled(if: HugePagePool.available, "needs /proc/sys/vm/nr_hugepages to be raisable (root, hugetlb) to map 2 MiB pages"))
  struct HugePages {
    static let hugeEnvironment = ["FIXTURE_HUGE_PAGES": "1"]

    @Test("snapshot plugin: a MAP_HUGETLB client's every byte exact from two threads, one fault per 2 MiB page, the last page's tail zero")
    func snapshotExact() throws {
      try HugePagePool.reserving(4) {
        try Harness.run("huge-snapshot") { h in
          let stats = h.directory + "/snapshot.stats"
          try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--stats", stats])
          let size = 7 << 20 + 1000  // four huge pages, the last one partly past the file's end
          let path = try SamplePlugins.writeSnapshot(h, size: size)
          let outcome = try h.runClient("snapshot", mib: 1, threads: 2, plugin: "snapshot",
                                        extraEnvironment: ["FIXTURE_FILE": path].merging(Self.hugeEnvironment) { $1 })
          #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
          #expect(outcome.summary == "verified \((8 << 20) / pageSize) pages of \(size) bytes, 0 wrong", h.diagnostics)
          // Each 4 KiB touch of a huge page is the one fault of that huge page.
          #expect(waitUntil(timeout: 3) { SamplePlugins.statistics(stats)["faults"] == 4 }, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
        }
      }
    }

    @Test("zero decisions for huge pages: filled by copying a zero huge page (hugetlbfs has no UFFDIO_ZEROPAGE)")
    func zeros() throws {
      try HugePagePool.reserving(2) {
        try Harness.run("huge-zero") { h in
          try h.startPlugin(name: "zeros", mode: "zero")
          let outcome = try h.runClient("zero", mib: 4, threads: 2, plugin: "zeros", extraEnvironment: Self.hugeEnvironment)
          #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
          #expect(outcome.summary == "verified \((4 << 20) / pageSize) pages, 0 wrong", h.diagnostics)
        }
      }
    }

    @Test("a copy of one 4 KiB page into a huge-page region is refused (not a whole huge page), the fault redelivered and served right")
    func smallCopyRefused() throws {
      try HugePagePool.reserving(2) {
        try Harness.run("huge-small-copy") { h in
          let plugin = try h.startPlugin(name: "small", mode: "small-page")
          let outcome = try h.runClient("touch", mib: 4, threads: 2, plugin: "small", extraEnvironment: Self.hugeEnvironment)
          #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
          #expect(outcome.summary == "verified \((4 << 20) / pageSize) pages, 0 wrong", h.diagnostics)
          // One refusal per huge page: each one's first answer.
          #expect(try h.status().plugin("small")?.tally[.decisionRefused, "badRange"] == 2, h.diagnostics)
          #expect(plugin.isRunning, h.diagnostics)
        }
      }
    }

    @Test("a C plugin answering every huge-page fault later, from 3 threads: each keeps a whole huge page of the shared area, every byte exact",
          .enabled(if: CPlugin.toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func cLaterAnswers() throws {
      try HugePagePool.reserving(4) {
        try Harness.run("huge-c-later") { h in
          let executable = try CPlugin.buildTestPlugin(h, "later")
          let plugin = try h.startPluginProcess(name: "c-later", executable: executable, arguments: ["c-later", h.directory + "/later.stats"], waitForConnection: true)
          // 4 huge pages, 2 per shared half: a fault that finds both halves held by deferred ones is retried until an answer frees one.
          let outcome = try h.runClient("touch", mib: 8, threads: 4, plugin: "c-later", timeout: 60, extraEnvironment: Self.hugeEnvironment)
          #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
          #expect(outcome.summary == "verified \((8 << 20) / pageSize) pages, 0 wrong", h.diagnostics)
          let status = try h.status().plugin("c-later")
          #expect(status?.decisionsAppliedByKind.copy == 4 && status?.invalidDecisions == 0, h.diagnostics(plugin.stderr))
        }
      }
    }

    @Test("a C plugin without a shared area (no memfd_create) refuses a huge-page region at Register, saying why, and serves small pages inline",
          .enabled(if: CPlugin.toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func cInlineOnlyRefuses() throws {
      try HugePagePool.reserving(2) {
        try Harness.run("huge-c-inline") { h in
          let executable = try CPlugin.buildTestPlugin(h, "inline")
          let plugin = try h.startPluginProcess(name: "inline", executable: executable, arguments: ["inline"], waitForConnection: true)
          let huge = try h.runClient("touch", mib: 4, threads: 1, plugin: "inline", extraEnvironment: Self.hugeEnvironment)
          #expect(huge.status == .exited(1), h.diagnostics(huge.stdout + huge.stderr))
          #expect(huge.summary.contains("region 1 has 2097152-byte pages, more than this plugin's buffers hold (it has no shared area)"), h.diagnostics(huge.stdout))
          let small = try h.runClient("touch", mib: 4, threads: 2, plugin: "inline")
          #expect(small.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(small.stdout + small.stderr + "\nplugin: " + plugin.stderr))
          #expect(try h.status().plugin("inline")?.decisionsAppliedByKind.copy == UInt64(pages(mib: 4)), h.diagnostics)
        }
      }
    }

    @Test("a Firecracker-style VMM restores its guest with page_size 2097152: every page exact, a ballooned huge page reads zeros")
    func firecrackerRestore() throws {
      let mib = 8
      try HugePagePool.reserving(mib / 2) {
        try Harness.run("huge-firecracker", configFields: [Firecracker.socketField]) { h in
          let snapshot = try SamplePlugins.writeSnapshot(h, size: mib << 20)
          #expect(rename(snapshot, h.directory + "/guest.mem") == 0)
          try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
          let vmm = try h.startFixture(["vmm-huge", h.directory + "/vm.sock", h.directory + "/guest.mem", "\(mib)", "2"])
          #expect(vmm.wait(timeout: 60) == .exited(0), h.diagnostics(vmm.stdout + vmm.stderr))
          let pages = (mib << 20) / pageSize
          #expect(vmm.stdout.hasSuffix("vmm verified \(pages) pages, 0 wrong; ballooned \(HugePagePool.pageSize / pageSize) pages read zeros\n"), h.diagnostics(vmm.stdout))
          #expect(h.waitForStatus { $0.client(pid: vmm.pid) == nil }, h.diagnostics)
        }
      }
    }

    @Test("a KVM guest on 2 MiB huge pages, restored through the Firecracker socket: its checksums right, its scratch pages written",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm (read and write) to run a KVM guest"))
    func kvmGuest() throws {
      let mib = KVMRestore.mib
      try HugePagePool.reserving(mib / 2) {
        try Harness.run("huge-kvm", configFields: [Firecracker.socketField]) { h in
          let snapshot = h.directory + "/guest.mem"
          let maker = try h.startFixture(["kvm-snapshot", snapshot, "\(mib)"])
          try #require(maker.wait(timeout: 30) == .exited(0), h.diagnostics(maker.stderr))
          let stats = h.directory + "/snapshot.stats"
          try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--stats", stats])
          let vmm = try h.startFixture(["kvm-vmm-huge", h.directory + "/vm.sock", snapshot, "\(mib)"])
          #expect(vmm.wait(timeout: 60) == .exited(0), h.diagnostics(vmm.stdout + vmm.stderr))
          #expect(vmm.stdout.hasSuffix("pages; 0 wrong\n") && vmm.stdout.contains("kvm guest checksummed "), h.diagnostics(vmm.stdout))
          // At most one fault per huge page of the guest.
          #expect(waitUntil(timeout: 3) { (1...mib / 2).contains(SamplePlugins.statistics(stats)["faults"] ?? 0) }, h.diagnostics("stats: \(SamplePlugins.statistics(stats))"))
        }
      }
    }

    @Test("a region of 1 GiB pages (more than the broker serves) or of 64 KiB pages (no page size of this kernel) is refused, saying why")
    func unsupportedPageSizeRefused() throws {
      try Harness.run("huge-refused") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("bad-page-size", mib: 2, threads: 1, plugin: "pattern")
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        // The broker refuses the size it does not serve; the client SDK one that is no page size of the kernel's.
        #expect(outcome.summary.contains("refused 1073741824: ") && outcome.summary.contains("page size 1073741824 is not supported (this system serves 4096 or 2097152 bytes)"),
                h.diagnostics(outcome.stdout))
        #expect(outcome.summary.contains("refused 65536: region 1: page size 65536 is neither the system's"), h.diagnostics(outcome.stdout))
      }
    }
  }
}
