import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Plugins act for the client, with the client's rights (issue 12, the
  /// confused deputy): spawned plugins drop the broker's privileges, and the
  /// snapshot plugin serves only files beneath its roots that the client
  /// could read itself.
  @Suite("Confused deputy")
  struct ConfusedDeputy {
    static let secret = Array("root's secret, never a client's".utf8)
    static let shared = Array("anybody may read this".utf8)

    /// A page-sized file starting with `bytes`, with `mode`, owned by root.
    static func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t) throws {
      var page = [UInt8](repeating: 0, count: 4096)
      page.replaceSubrange(0..<bytes.count, with: bytes)
      let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
      guard fd >= 0, write(fd, page, page.count) == page.count else { throw HarnessError("cannot write \(path)") }
      fchmod(fd, mode)
      close(fd)
    }

    static func hex(_ bytes: [UInt8]) -> String {
      bytes.prefix(16).map { String($0 >> 4, radix: 16) + String($0 & 0xF, radix: 16) }.joined()
    }

    /// A directory for snapshot files that everybody may search (0755),
    /// removed after `body`.
    static func withRoot(_ body: (String) throws -> Void) throws {
      var template = Array("/tmp/uffd-deputy-XXXXXX".utf8CString)
      guard let made = mkdtemp(&template) else { throw HarnessError("mkdtemp failed: \(errno)") }
      let root = String(cString: made)
      defer { removeDirectory(root) }
      chmod(root, 0o755)
      try body(root)
    }

    @Test("A client running as nobody names a root-only file to the spawned snapshot plugin: refused (pluginRefused, no byte of it read), whether the plugin runs as its default user or explicitly as root, delegated or not; a file the client may read is served",
          .enabled(if: getuid() == 0, "needs root to run the broker's plugins and a client as other users"),
          arguments: [(nil, false), (nil, true), ("root", false), ("root", true)] as [(String?, Bool)])
    func secretRefused(user: String?, delegate: Bool) throws {
      try Self.withRoot { root in
        let secret = root + "/shadow"
        try Self.writeFile(secret, Self.secret, mode: 0o600)
        let shared = root + "/shared.img"
        try Self.writeFile(shared, Self.shared, mode: 0o644)
        // "--root DIR" before the name: a plugin that knows no --root takes both words for names, the last one wins.
        let plugin = Harness.SpawnedPlugin(
          name: "snapshot", arguments: ["--root", root, "snapshot"] + (delegate ? ["--delegate"] : []), product: "snapshot-plugin", user: user)
        try Harness.run("deputy", spawning: [plugin], configFields: [#""clientUIDs": [0, 65534]"#]) { h in
          chmod(h.directory, 0o755)  // the client, as nobody, must reach the client socket (0666 now)
          #expect(h.waitForStatus { ($0.plugin("snapshot")?.connectedPID ?? 0) != 0 }, h.diagnostics)

          let attack = try h.runClient("deputy", mib: 0, threads: 0, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": secret])
          #expect(attack.stdout.contains("readable by uid 65534: no"), h.diagnostics(attack.stdout))
          #expect(attack.status == .exited(3), h.diagnostics(attack.stdout + attack.stderr))
          #expect(attack.summary.hasPrefix("refused: pluginRefused"), h.diagnostics(attack.stdout))
          // Run as nobody, the plugin cannot open it at all; run as root, it opens it and refuses it for the client.
          let reason = user == "root" ? "client uid 65534 (gid 65534) may not read \(secret)" : "Permission denied"
          #expect(attack.summary.contains(reason), h.diagnostics(attack.stdout))
          #expect(!attack.stdout.contains(Self.hex(Self.secret)), h.diagnostics(attack.stdout))

          let served = try h.runClient("deputy", mib: 0, threads: 0, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": shared])
          #expect(served.status == .exited(0), h.diagnostics(served.stdout + served.stderr))
          #expect(served.summary == "read: \(Self.hex(Self.shared))", h.diagnostics(served.stdout))
        }
      }
    }

    /// The `Uid:`, `Gid:` and `NoNewPrivs:` lines of /proc/PID/status.
    static func identity(of pid: Int32) -> [String: String] {
      let text = readTextFile("/proc/\(pid)/status")
      var fields: [String: String] = [:]
      for line in text.split(separator: "\n") {
        let parts = line.split(separator: ":", maxSplits: 1)
        guard parts.count == 2, ["Uid", "Gid", "Groups", "NoNewPrivs"].contains(String(parts[0])) else { continue }
        fields[String(parts[0])] = parts[1].split(whereSeparator: { $0 == " " || $0 == "\t" }).joined(separator: " ")
      }
      return fields
    }

    @Test("A spawned plugin runs as its configured user and group (default: nobody; root only when said), with no_new_privs, and is served through its socket pair though its uid may not use the plugin socket",
          .enabled(if: getuid() == 0, "needs root to spawn plugins as other users"))
    func spawnedAsConfigured() throws {
      try Self.withRoot { root in
        let plugins = [
          Harness.SpawnedPlugin(name: "default", arguments: ["default", "--root", root], product: "snapshot-plugin", user: nil),
          Harness.SpawnedPlugin(name: "daemon", arguments: ["daemon", "--root", root], product: "snapshot-plugin", user: "nobody", group: "daemon"),
          Harness.SpawnedPlugin(name: "root", arguments: ["root", "--root", root], product: "snapshot-plugin", user: "root"),
        ]
        let daemonGID = getgrnam("daemon").map { $0.pointee.gr_gid } ?? 1
        try Harness.run("spawned-users", spawning: plugins) { h in
          #expect(h.waitForStatus { status in plugins.allSatisfy { status.plugin($0.name).map { $0.connectedPID != 0 && $0.connectedPID == $0.spawnedPID } ?? false } },
                  h.diagnostics)
          let status = try h.status()
          let expected: [(String, String, String)] = [("default", "\(defaultPluginUser.uid)", "\(defaultPluginUser.gid)"), ("daemon", "65534", "\(daemonGID)"), ("root", "0", "0")]
          for (name, uid, gid) in expected {
            let pid = try #require(status.plugin(name)?.spawnedPID, h.diagnostics)
            let fields = Self.identity(of: pid)
            #expect(fields["Uid"] == "\(uid) \(uid) \(uid) \(uid)", h.diagnostics("\(name): \(fields)"))
            #expect(fields["Gid"] == "\(gid) \(gid) \(gid) \(gid)", h.diagnostics("\(name): \(fields)"))
            #expect(fields["NoNewPrivs"] == "1", h.diagnostics("\(name): \(fields)"))
          }
          #expect(Self.identity(of: try #require(status.plugin("daemon")?.spawnedPID))["Groups"] == "\(daemonGID)", h.diagnostics)
          // The plugin socket stayed private to root: nobody's plugins came in through their socket pairs.
          var info = stat()
          #expect(stat(h.pluginSocket, &info) == 0 && info.st_mode & 0o777 == 0o600, h.diagnostics)
          #expect(status.tally[.pluginRefused] == 0, h.diagnostics)
        }
      }
    }

    @Test("A plugin user or group that does not exist stops the broker at start with a config error naming the field",
          .enabled(if: getuid() == 0, "a broker that is not root refuses any user but its own, a different message"))
    func unknownUserRefused() throws {
      try Harness.run("plugin-user-config") { h in
        let cases: [(String, String)] = [
          (#"{"plugins": [{"name": "a", "executable": "/bin/true", "user": "no-such-user-uffd"}]}"#, #"plugins[0].user "no-such-user-uffd" is no user on this system"#),
          (#"{"plugins": [{"name": "a", "executable": "/bin/true", "group": "no-such-group-uffd"}]}"#, #"plugins[0].group "no-such-group-uffd" is no group on this system"#),
          (#"{"plugins": [{"name": "a", "executable": "/bin/true", "user": "4242424"}]}"#, "plugins[0].user 4242424: no such user in the user database, so no group to run it in: give plugins[0].group"),
          (#"{"plugins": [{"name": "a", "executable": "/bin/true", "user": ""}]}"#, "plugins[0].user is empty"),
        ]
        for (index, (text, message)) in cases.enumerated() {
          let path = h.directory + "/user-\(index).json"
          try writeTextFile(path, text)
          let broker = try FixtureProcess(
            label: "broker-user-\(index)", executable: Harness.brokerExecutable,
            arguments: ["--config", path, "--client-socket", h.directory + "/u-c.sock", "--plugin-socket", h.directory + "/u-p.sock",
                        "--control-socket", h.directory + "/u-ctl.sock"],
            environment: [:], stdoutPath: h.directory + "/user-\(index).stdout", stderrPath: h.directory + "/user-\(index).stderr")
          #expect(broker.wait(timeout: 10) == .exited(78), h.diagnostics(broker.stderr))
          #expect(broker.stderr.contains(message), h.diagnostics(broker.stderr))
        }
      }
    }

    @Test("The snapshot plugin refuses a path outside its roots, a symlink inside a root that points out, and a climb out with ..; a file beneath the root is served")
    func rootsConfine() throws {
      try Self.withRoot { root in
        defer {
          unlink(root + "/sub/up")
          rmdir(root + "/sub")
        }
        try Harness.run("snapshot-roots") { h in
          let inside = root + "/inside.img"
          try Self.writeFile(inside, Self.shared, mode: 0o644)
          let outside = h.directory + "/outside.img"
          try Self.writeFile(outside, Self.secret, mode: 0o644)
          symlink(outside, root + "/link.img")
          mkdir(root + "/sub", 0o755)
          symlink(h.directory, root + "/sub/up")
          let harnessName = String(h.directory.split(separator: "/").last!)
          try h.startSamplePlugin("snapshot-plugin", name: "snapshot", arguments: ["--root", root])
          let refusals: [(String, String)] = [
            (outside, "outside the directories this plugin serves files from"),
            (root + "/link.img", "a symlink is on the way"),
            (root + "/sub/up/outside.img", "a symlink is on the way"),
            (root + "/../\(harnessName)/outside.img", "leads out of"),
            (root + "s/inside.img", "outside the directories"),  // a sibling sharing the root's prefix
            ("inside.img", "outside the directories"),  // relative
          ]
          for (path, reason) in refusals {
            let outcome = try h.runClient("snapshot", mib: 0, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": path])
            #expect(outcome.status == .exited(3), h.diagnostics("\(path): \(outcome.stdout)"))
            #expect(outcome.summary.contains(reason), h.diagnostics("\(path): \(outcome.stdout)"))
          }
          let served = try h.runClient("snapshot", mib: 0, threads: 1, plugin: "snapshot", extraEnvironment: ["FIXTURE_FILE": inside])
          #expect(served.status == .exited(0), h.diagnostics(served.stdout))
        }
      }
    }
  }
}
