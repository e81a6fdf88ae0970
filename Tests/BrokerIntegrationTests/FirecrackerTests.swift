import BrokerProtocol
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

    /// `uffd-broker vm-socket ARGUMENTS...` against the harness's broker: its exit status and output.
    static func vmSocket(_ h: Harness, _ arguments: [String]) throws -> (status: ExitStatus?, stdout: String, stderr: String) {
      let label = "vm-socket-\(arguments.joined(separator: "-").filter { $0.isLetter || $0.isNumber })"
      let process = try FixtureProcess(
        label: label, executable: Harness.brokerExecutable, arguments: ["vm-socket"] + arguments + ["--control-socket", h.controlSocket],
        environment: [:], stdoutPath: "\(h.directory)/\(label).stdout", stderrPath: "\(h.directory)/\(label).stderr")
      let status = process.wait(timeout: 10)
      return (status, process.stdout, process.stderr)
    }

    @Test("an orchestrator opens a socket for one VM through the control socket; its one VMM is served, then the socket is gone")
    func socketPerVM() throws {
      try Harness.run("firecracker-vm") { h in
        let mib = 4
        let snapshot = try SamplePlugins.writeSnapshot(h, size: mib << 20)
        try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", h.directory])
        let opened = try Self.vmSocket(h, ["open", "vm-1", "--plugin", "snapshot", "--argument", snapshot])
        let path = h.directory + "/vm-vm-1.sock"
        #expect(opened.status == .exited(0) && opened.stdout == path + "\n", h.diagnostics(opened.stdout + opened.stderr))
        // The same name twice is refused, as is closing a socket that was never opened, or a name that is no file name.
        let twice = try Self.vmSocket(h, ["open", "vm-1", "--plugin", "snapshot"])
        #expect(twice.status == .exited(65) && twice.stderr.contains("has a socket already"), h.diagnostics(twice.stderr))
        let unknown = try Self.vmSocket(h, ["close", "vm-2"])
        #expect(unknown.status == .exited(65) && unknown.stderr.contains("no socket of VM"), h.diagnostics(unknown.stderr))
        let traversal = try Self.vmSocket(h, ["open", "../x", "--plugin", "snapshot"])
        #expect(traversal.status == .exited(64), h.diagnostics(traversal.stderr))
        // Refused over the wire too (not only by the command line's check).
        #expect(throws: BrokerError.self) {
          try ControlChannel.vmSocket(VMSocketCommand(.open, name: "../x", plugin: "snapshot"), socketPath: h.controlSocket)
        }

        let vmm = try h.startFixture(["vmm", path, snapshot, "\(mib)", "2"])
        #expect(vmm.wait(timeout: 60) == .exited(0), h.diagnostics(vmm.stdout + vmm.stderr))
        #expect(vmm.stdout.contains(", 0 wrong; ballooned 64 pages read zeros"), h.diagnostics(vmm.stdout))
        // Its socket served that VMM alone and is gone; the name is free again, and a socket no VMM used can be closed.
        #expect(access(path, F_OK) != 0, h.diagnostics("\(path) is still there"))
        let again = try Self.vmSocket(h, ["open", "vm-1", "--plugin", "snapshot", "--argument", snapshot])
        #expect(again.status == .exited(0), h.diagnostics(again.stderr))
        let closed = try Self.vmSocket(h, ["close", "vm-1"])
        #expect(closed.status == .exited(0) && access(path, F_OK) != 0, h.diagnostics(closed.stderr))
      }
    }
  }
}
