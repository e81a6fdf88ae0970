import Glibc
import Testing

extension BrokerIntegrationTests {
  /// A VMM restoring a snapshot as Firecracker does, through a socket that
  /// speaks Firecracker's page-fault handler protocol (issue 15).
  @Suite("Firecracker-compatible handler socket")
  struct Firecracker {
    static let socketField = #""firecrackerSockets": [{"path": "$DIR/vm.sock", "plugin": "snapshot", "argument": "$DIR/guest.mem"}]"#

    @Test("a VMM's guest memory in two regions, each from its offset in the snapshot, every page exact from two threads; ballooned pages read zeros")
    func restore() throws {
      try Harness.run("firecracker", configFields: [Self.socketField]) { h in
        let mib = 8
        let snapshot = try SamplePlugins.writeSnapshot(h, size: mib << 20)
        #expect(rename(snapshot, h.directory + "/guest.mem") == 0)
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let vmm = try h.startFixture(["vmm", h.directory + "/vm.sock", h.directory + "/guest.mem", "\(mib)", "2"])
        #expect(h.waitForStatus { $0.client(pid: vmm.pid)?.phase == "active" } || !vmm.isRunning, h.diagnostics(vmm.stdout + vmm.stderr))
        #expect(vmm.wait(timeout: 60) == .exited(0), h.diagnostics(vmm.stdout + vmm.stderr))
        let pages = (mib << 20) / Int(getpagesize())
        #expect(vmm.stdout.hasSuffix("vmm verified \(pages) pages, 0 wrong; ballooned 64 pages read zeros\n"), h.diagnostics(vmm.stdout))
        // Its exit ends the client: nothing of it is left in the broker.
        #expect(h.waitForStatus { $0.client(pid: vmm.pid) == nil }, h.diagnostics)
      }
    }

    @Test("a VMM whose guest memory cannot be served is killed, not left waiting on its faults", arguments: ["vmm-garbage", "vmm-no-remove"])
    func unservable(scenario: String) throws {
      try Harness.run("firecracker-\(scenario)", configFields: [Self.socketField]) { h in
        _ = try SamplePlugins.writeSnapshot(h, size: 1 << 20)
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let vmm = try h.startFixture([scenario, h.directory + "/vm.sock", h.directory + "/snapshot-1048576.img", "1", "1"])
        #expect(vmm.wait(timeout: 30) == .signaled(SIGKILL), h.diagnostics(vmm.stdout + vmm.stderr))
        #expect(h.waitForStatus { $0.tally[.clientKilled, "vmmRefused"] == 1 }, h.diagnostics)
      }
    }
  }
}
