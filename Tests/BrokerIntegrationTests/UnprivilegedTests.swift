import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Issue 12: clients and brokers without privileges, end to end.
  @Suite("Without privileges")
  struct Unprivileged {
    static let nobody: UInt32 = 65534
    static var canSwitchUsers: Bool { getuid() == 0 && access(Harness.setpriv, X_OK) == 0 }

    @Test("A client as uid 65534 is served by a root broker with a user-mode-only userfaultfd; without asking for one it is told how",
          .enabled(if: canSwitchUsers, "needs root and setpriv to run a client as another uid"))
    func unprivilegedClient() throws {
      try Harness.run("nobody-client", configFields: ["\"clientUIDs\": [0, \(Self.nobody)]"]) { h in
        chmod(h.directory, 0o755)  // uid 65534 may reach the sockets; SO_PEERCRED decides
        try h.startPlugin(name: "pattern", mode: "pattern")
        let served = try h.runClient("touch", mib: 4, threads: 2, plugin: "pattern", extraEnvironment: ["FIXTURE_USER_MODE": "1"], user: Self.nobody)
        #expect(served.status == .exited(0) && served.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(served.stdout + served.stderr))
        #expect(try h.status().tally[.clientRegistered] == 1, h.diagnostics)
        // The full kind of userfaultfd needs privileges this uid lacks (vm.unprivileged_userfaultfd=0 here).
        var device = stat()
        let deviceOpen = stat("/dev/userfaultfd", &device) == 0 && device.st_mode & 0o006 == 0o006
        if readTextFile("/proc/sys/vm/unprivileged_userfaultfd").hasPrefix("0") && !deviceOpen {
          let refused = try h.runClient("touch", mib: 1, threads: 1, plugin: "pattern", user: Self.nobody)
          #expect(refused.status == .exited(1) && (refused.stdout + refused.stderr).contains("userModeOnly"), h.diagnostics(refused.stdout + refused.stderr))
        }
      }
    }

    @Test("A client as uid 65534 that may not call userfaultfd(2) for a full uffd but may open /dev/userfaultfd gets one there, and is served",
          .enabled(if: canSwitchUsers && access("/usr/bin/unshare", X_OK) == 0, "needs root, setpriv and unshare"))
    func deviceClient() throws {
      var device = stat()
      try #require(stat("/dev/userfaultfd", &device) == 0, "no /dev/userfaultfd on this kernel")
      try #require(readTextFile("/proc/sys/vm/unprivileged_userfaultfd").hasPrefix("0"), "vm.unprivileged_userfaultfd=1: the syscall would succeed, the device path not be taken")
      try Harness.run("nobody-device", configFields: ["\"clientUIDs\": [0, \(Self.nobody)]"]) { h in
        chmod(h.directory, 0o755)
        // The same device, open to all, over /dev/userfaultfd in the client's mount namespace only.
        let node = h.directory + "/userfaultfd"
        try #require(mknod(node, S_IFCHR | 0o666, device.st_rdev) == 0 && chmod(node, 0o666) == 0, "mknod: \(errno)")
        try h.startPlugin(name: "pattern", mode: "pattern")
        let served = try h.runClient("touch", mib: 4, threads: 2, plugin: "pattern", user: Self.nobody, userfaultfdDevice: node)
        #expect(served.status == .exited(0) && served.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(served.stdout + served.stderr))
        // Without the device the same client is refused (the syscall's EPERM), so the device served it.
        let refused = try h.runClient("touch", mib: 1, threads: 1, plugin: "pattern", user: Self.nobody)
        #expect(refused.status == .exited(1) && (refused.stdout + refused.stderr).contains("userModeOnly"), h.diagnostics(refused.stdout + refused.stderr))
      }
    }

    @Test("A broker, a plugin and a client all as uid 65534: every page served",
          .enabled(if: canSwitchUsers, "needs root and setpriv to run as another uid"))
    func unprivilegedBroker() throws {
      try Harness.run("nobody-broker", user: Self.nobody) { h in
        #expect(readTextFile("/proc/\(h.broker.pid)/status").contains("Uid:\t\(Self.nobody)\t"), h.diagnostics)
        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("touch", mib: 4, threads: 2, plugin: "pattern", extraEnvironment: ["FIXTURE_USER_MODE": "1"])
        #expect(outcome.status == .exited(0) && outcome.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(try h.status().faults.faultsResolved > 0, h.diagnostics)
      }
    }
  }
}
