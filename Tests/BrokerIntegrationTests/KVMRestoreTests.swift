import Glibc
import Testing

extension BrokerIntegrationTests {
  /// A real KVM guest restored from a snapshot through the Firecracker-compatible
  /// socket (issue 15): its page tables, code and data all come from the
  /// snapshot file, served by the snapshot plugin as KVM faults them in. The
  /// guest (`broker-fixture kvm-vmm`, see `KVMGuestVMM` and `GuestImage`) runs
  /// 64-bit at ring 3, checksums its data pages, adds to every qword of its
  /// scratch pages and checksums its free area; the VMM checks all three
  /// against the snapshot file.
  @Suite("KVM guest restored through the broker",
         // Where there is no /dev/kvm (containers, CI runners without nested
         // virtualization) there is no guest to run: the suite is skipped.
         .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm (read and write) to run a KVM guest"))
  struct KVMRestore {
    static let mib = 32

    @Test("a guest restored page by page checksums its data and free area right and writes its scratch pages")
    func restore() throws {
      try run(scenario: "kvm-vmm", prefetch: 1, free: "free")
    }

    @Test("a balloon dropping the free area while the guest runs, prefetch 16: the guest reads zeros there and its checksum stays right")
    func balloon() throws {
      try run(scenario: "kvm-vmm-balloon", prefetch: 16, free: "ballooned")
    }

    private func run(scenario: String, prefetch: Int, free: String) throws {
      try Harness.run(scenario, configFields: [Firecracker.socketField]) { h in
        let snapshot = h.directory + "/guest.mem"
        let maker = try h.startFixture(["kvm-snapshot", snapshot, "\(Self.mib)"])
        try #require(maker.wait(timeout: 30) == .exited(0), h.diagnostics(maker.stderr))
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory, "--prefetch", "\(prefetch)"])
        let vmm = try h.startFixture([scenario, h.directory + "/vm.sock", snapshot, "\(Self.mib)"])
        #expect(vmm.wait(timeout: 60) == .exited(0), h.diagnostics(vmm.stdout + vmm.stderr))
        // 32 MiB: 1 MiB below the data, 2 MiB of scratch, a free area of 4 MiB.
        let line = "kvm guest checksummed \(pages(mib: Self.mib - 7)) pages, wrote \(pages(mib: 2)) pages, read \(pages(mib: 4)) \(free) pages; 0 wrong\n"
        #expect(vmm.stdout.hasSuffix(line), h.diagnostics(vmm.stdout))
        // Its exit ends the client: nothing of it is left in the broker.
        #expect(h.waitForStatus { $0.client(pid: vmm.pid) == nil }, h.diagnostics)
      }
    }
  }
}
