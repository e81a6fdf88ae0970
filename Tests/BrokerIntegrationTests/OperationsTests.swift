import BrokerProtocol
import Foundation
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Issue 14: running the broker as a daemon (reload, log formats).
  @Suite("Operations")
  struct Operations {
    /// Whether a new client connection is refused for the per-uid limit.
    static func refusedForLimit(_ h: Harness) throws -> Bool {
      let client = try ManualClient(socketPath: h.clientSocket)
      let (reply, _) = try Isolation.dropped(client)
      if case .error(let error)? = reply?.body { return error.code == .limit }
      return false
    }

    @Test("SIGHUP reloads the config: a raised limit applies at once; a file the broker would not start with is refused and the running one kept")
    func reloadOnSIGHUP() throws {
      try Harness.run("reload", configFields: ["\"maxClientsPerUID\": 1"]) { h in
        let config = h.directory + "/config.json"
        let first = try ManualClient(socketPath: h.clientSocket)
        try first.hello()
        #expect(try Self.refusedForLimit(h), h.diagnostics)

        try writeTextFile(config, #"{"maxClientsPerUID": 2}"#)
        kill(h.broker.pid, SIGHUP)
        #expect(h.waitForStatus { $0.tally[.configReloaded] == 1 }, h.diagnostics)
        let second = try ManualClient(socketPath: h.clientSocket)
        try second.hello()

        for (text, cause) in [(#"{"maxClientsPerUID": 0}"#, "malformed"), (#"{"maxClientsPerUID": 3, "plugins": [{"name": "x", "executable": "/no/such/plugin"}]}"#, "malformed"),
                              (#"{"maxClientsPerUID": 3, "clientUIDs": [0, 4242]}"#, "notAuthorized")] {
          let before = try h.status().tally[.configReloadRefused, cause]
          try writeTextFile(config, text)
          kill(h.broker.pid, SIGHUP)
          #expect(h.waitForStatus { $0.tally[.configReloadRefused, cause] == before + 1 }, h.diagnostics(text))
          // The running limit (2) still holds.
          #expect(try Self.refusedForLimit(h), h.diagnostics(text))
        }
        #expect(try h.status().tally[.configReloaded] == 1, h.diagnostics)
        _ = (first, second)
      }
    }

    @Test("SIGHUP with other spawned plugins: an added one starts, a changed one is stopped and started as now configured, a removed one is stopped; removing one that serves a client's region is refused and the running set kept")
    func reloadSpawnedPlugins() throws {
      let a = Harness.SpawnedPlugin(name: "a", arguments: ["plugin", "a", "pattern"])
      let c = Harness.SpawnedPlugin(name: "c", arguments: ["plugin", "c", "pattern"])
      try Harness.run("reload-plugins", spawning: [a, c]) { h in
        let config = h.directory + "/config.json"
        func spawnedPID(_ name: String, _ status: BrokerStatus) -> Int32? {
          status.plugin(name).flatMap { $0.connectedPID != 0 && $0.connectedPID == $0.spawnedPID ? $0.spawnedPID : nil }
        }
        /// Writes a config of `spawned`, sends SIGHUP, and says whether the status came to `done`.
        func reload(_ spawned: [Harness.SpawnedPlugin], until done: (BrokerStatus) -> Bool) throws -> Bool {
          try writeTextFile(config, "{" + Harness.pluginsField(spawned) + "}\n")
          kill(h.broker.pid, SIGHUP)
          return h.waitForStatus(done)
        }
        var first = BrokerStatus()
        #expect(h.waitForStatus { first = $0; return spawnedPID("a", $0) != nil && spawnedPID("c", $0) != nil }, h.diagnostics)
        // A client served by c stops at its gate, its region still routed to c.
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("remap-reattach", mib: 2, threads: 1, plugin: "c", extraEnvironment: gate.environment)
        #expect(gate.awaitClient() == "moved", h.diagnostics(client.stdout + client.stderr))
        #expect(try reload([a]) { $0.tally[.configReloadRefused, "malformed"] == 1 }, h.diagnostics)
        #expect(spawnedPID("c", try h.status()) == spawnedPID("c", first), h.diagnostics)

        // a changed (another mode), b added, c kept: c goes on serving its client.
        let changed = Harness.SpawnedPlugin(name: "a", arguments: ["plugin", "a", "pattern", h.eventLogPath("a")])
        let b = Harness.SpawnedPlugin(name: "b", arguments: ["plugin", "b", "pattern"])
        let changedRunning = try reload([changed, b, c]) { status in
          status.tally[.configReloaded] == 1 && spawnedPID("b", status) != nil
            && spawnedPID("a", status).map { $0 != spawnedPID("a", first) } == true
        }
        #expect(changedRunning, h.diagnostics)
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(spawnedPID("c", try h.status()) == spawnedPID("c", first), h.diagnostics)
        // The new a and b serve.
        for name in ["a", "b"] {
          let served = try h.startClient("touch", mib: 1, threads: 2, plugin: name)
          #expect(served.wait(timeout: 30) == .exited(0), h.diagnostics(served.stdout + served.stderr))
        }
        // The new a runs as now configured: with an event log, where the old one had none.
        #expect(h.eventLog("a").contains { $0.hasPrefix("opened ") }, h.diagnostics("\(h.eventLog("a").prefix(3))"))

        // c removed, now that no client uses it: stopped, and not started again.
        let removed = try reload([changed, b]) { status in
          status.tally[.configReloaded] == 2 && status.plugin("c").map { $0.spawnedPID == 0 && $0.connectedPID == 0 } ?? true
        }
        #expect(removed, h.diagnostics)
      }
    }

    @Test("--log-format json writes one JSON object per line (ts to the millisecond, level, msg, metadata); logfmt quotes values with spaces")
    func logFormats() throws {
      try Harness.run("log-formats") { h in
        for format in ["json", "logfmt"] {
          let dir = h.directory + "/\(format)"
          mkdir(dir, 0o700)
          let broker = try FixtureProcess(
            label: "broker-\(format)", executable: Harness.brokerExecutable,
            arguments: ["--client-socket", dir + "/c.sock", "--plugin-socket", dir + "/p.sock", "--control-socket", dir + "/ctl.sock", "--log-format", format],
            environment: [:], stdoutPath: dir + "/stdout", stderrPath: dir + "/stderr")
          #expect(waitUntil(timeout: 10) { (try? ControlChannel.status(socketPath: dir + "/ctl.sock")) != nil }, h.diagnostics(broker.stderr))
          #expect(broker.stop() == .exited(0), h.diagnostics(broker.stderr))
          let lines = broker.stderr.split(separator: "\n").map(String.init)
          #expect(lines.count >= 2, h.diagnostics(broker.stderr))
          for line in lines {
            if format == "json" {
              let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String]
              let stamp = object?["ts"] ?? ""
              #expect(object?["level"] != nil && object?["msg"] != nil && stamp.count == 24 && stamp.hasSuffix("Z"), h.diagnostics(line))
            } else {
              #expect(line.hasPrefix("ts=") && line.contains(" level=") && line.contains(" msg="), h.diagnostics(line))
            }
          }
          if format == "logfmt" { #expect(lines.contains { $0.contains(#"msg="broker serving""#) }, h.diagnostics(broker.stderr)) }
        }
      }
    }

    @Test("Under systemd (NOTIFY_SOCKET set): READY=1 once the broker serves, WATCHDOG=1 as the unit asks, STOPPING=1 on SIGTERM")
    func systemdNotifications() throws {
      try Harness.run("notify") { h in
        let dir = h.directory + "/notify"
        mkdir(dir, 0o700)
        let listener = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(listener) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = dir + "/notify.sock"
        withUnsafeMutableBytes(of: &address.sun_path) { raw in _ = path.utf8CString.withUnsafeBytes { raw.copyMemory(from: $0) } }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(bound == 0)
        /// The service manager's messages until one contains `wanted` (each datagram one message).
        func receive(until wanted: String) -> [String] {
          var messages: [String] = []
          var buffer = [UInt8](repeating: 0, count: 4096)
          let deadline = now() + 10
          while now() < deadline {
            var entry = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard Glibc.poll(&entry, 1, 100) > 0 else { continue }
            let count = recv(listener, &buffer, buffer.count, 0)
            guard count > 0 else { continue }
            messages.append(String(decoding: buffer[..<count], as: UTF8.self))
            if messages.last!.contains(wanted) { break }
          }
          return messages
        }
        let broker = try FixtureProcess(
          label: "broker-notify", executable: Harness.brokerExecutable,
          arguments: ["--client-socket", dir + "/c.sock", "--plugin-socket", dir + "/p.sock", "--control-socket", dir + "/ctl.sock"],
          environment: ["NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"], stdoutPath: dir + "/stdout", stderrPath: dir + "/stderr")
        let ready = receive(until: "READY=1")
        #expect(ready.last?.contains("READY=1") == true && ready.last?.contains("STATUS=serving") == true, h.diagnostics("\(ready) \(broker.stderr)"))
        // It serves when it says so.
        #expect((try? ControlChannel.status(socketPath: dir + "/ctl.sock"))?.pid == broker.pid, h.diagnostics(broker.stderr))
        #expect(receive(until: "WATCHDOG=1").last == "WATCHDOG=1", h.diagnostics(broker.stderr))
        kill(broker.pid, SIGTERM)
        #expect(receive(until: "STOPPING=1").last?.hasPrefix("STOPPING=1") == true, h.diagnostics(broker.stderr))
        #expect(broker.wait(timeout: 10) == .exited(0), h.diagnostics(broker.stderr))
      }
    }

    @Test("Socket activation (LISTEN_FDS): the broker serves the client and plugin sockets handed over (one by name, one by path) and binds its control socket; it leaves their files at exit, and its next run on them serves a client that connected in between; their modes decide which reloads may let other uids in")
    func socketActivation() throws {
      try Harness.run("activation", configFields: ["\"maxClientsPerUID\": 8"], socketActivation: true) { h in
        let listeners = h.handedOver
        #expect(listeners.count == 2)
        try h.startPlugin(name: "pattern", mode: "pattern")
        let first = try h.runClient("touch", mib: 4, threads: 1, plugin: "pattern")
        #expect(first.status == .exited(0) && first.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(first.stdout + first.stderr))

        #expect(h.stopBroker() == .exited(0), h.diagnostics)
        // The handed-over sockets are systemd's (here the test's): still there, still listening.
        for path in [h.clientSocket, h.pluginSocket] { #expect(Self.isSocket(path), h.diagnostics(path)) }
        // Its own control socket it removed.
        #expect(!Self.isSocket(h.controlSocket), h.diagnostics)
        // A client connecting while no broker runs waits in the backlog...
        let waiting = try ManualClient(socketPath: h.clientSocket)
        // (and the client socket is now open to all, as uffd-broker.socket makes it)
        chmod(h.clientSocket, 0o666)
        try h.restartStoppedBroker()
        // ... and the next run serves it.
        try waiting.hello()
        try h.startPlugin(name: "pattern", mode: "pattern")
        let second = try h.runClient("touch", mib: 4, threads: 1, plugin: "pattern")
        #expect(second.status == .exited(0) && second.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(second.stdout + second.stderr))
        // The inherited socket's mode counts for a reload: other uids may be let in
        // at the client socket (0666), not at the plugin socket (0600).
        try writeTextFile(h.directory + "/config.json", #"{"clientUIDs": [0, 4242]}"#)
        kill(h.broker.pid, SIGHUP)
        #expect(h.waitForStatus { $0.tally[.configReloaded] == 1 }, h.diagnostics)
        try writeTextFile(h.directory + "/config.json", #"{"clientUIDs": [0, 4242], "pluginUIDs": [0, 4242]}"#)
        kill(h.broker.pid, SIGHUP)
        #expect(h.waitForStatus { $0.tally[.configReloadRefused, "notAuthorized"] == 1 }, h.diagnostics)
        _ = listeners
      }
    }

    @Test("Socket activation refused: a descriptor that is no SOCK_SEQPACKET listener, an unknown one, a missing plugin socket; the broker exits 73 saying which, and leaves the sockets")
    func socketActivationRefused() throws {
      try Harness.run("activation-refused") { h in
        let dir = h.directory + "/refused"
        mkdir(dir, 0o700)
        let client = try PacketListener(path: dir + "/c.sock", mode: 0o600)
        let plugin = try PacketListener(path: dir + "/p.sock", mode: 0o600)
        let stream = try Self.streamListener(at: dir + "/stream.sock")
        defer { close(stream) }
        let other = try PacketListener(path: dir + "/other.sock", mode: 0o600)
        let cases: [(descriptors: [CInt], names: [String], expected: String)] = [
          ([client.fd, stream], ["client", "plugin"], "descriptor 4 (name \"plugin\", bound at \(dir)/stream.sock), handed over by the service manager, is not a listening AF_UNIX SOCK_SEQPACKET socket"),
          ([client.fd, plugin.fd, other.fd], ["client", "plugin", "extra"], "descriptor 5 (name \"extra\", bound at \(dir)/other.sock), handed over by the service manager, is none of the broker's sockets"),
          ([client.fd], ["client"], "the service manager handed over no plugin socket"),
        ]
        for (index, (descriptors, names, expected)) in cases.enumerated() {
          let broker = try Harness.spawnBroker(
            label: "broker-refused-\(index)", arguments: ["--client-socket", dir + "/c.sock", "--plugin-socket", dir + "/p.sock", "--control-socket", dir + "/ctl.sock"],
            environment: [:], handing: descriptors, names: names, stdoutPath: dir + "/stdout", stderrPath: dir + "/stderr-\(index)")
          #expect(broker.wait(timeout: 10) == .exited(73), h.diagnostics(broker.stderr))
          #expect(broker.stderr.contains(expected) && broker.stderr.contains("refusing to start"), h.diagnostics(broker.stderr))
          for path in ["/c.sock", "/p.sock", "/stream.sock", "/other.sock"] { #expect(Self.isSocket(dir + path), h.diagnostics(path)) }
          #expect(!Self.isSocket(dir + "/ctl.sock"), h.diagnostics(broker.stderr))
        }
      }
    }

    /// Whether a socket file is at `path`.
    static func isSocket(_ path: String) -> Bool {
      var info = stat()
      return lstat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK
    }

    /// A listening SOCK_STREAM Unix socket at `path` (the wrong kind for the broker).
    static func streamListener(at path: String) throws -> CInt {
      let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
      var address = sockaddr_un()
      address.sun_family = sa_family_t(AF_UNIX)
      withUnsafeMutableBytes(of: &address.sun_path) { raw in _ = path.utf8CString.withUnsafeBytes { raw.copyMemory(from: $0) } }
      let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
      guard fd >= 0, bound == 0, listen(fd, 8) == 0 else { throw HarnessError("cannot listen on \(path): \(errno)") }
      return fd
    }

    /// The package's root (the tests run the project's scripts).
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    @Test("scripts/install.sh into a prefix: the service and socket units, the installed broker starts with the installed config, its plugins run as the default plugin user, a client is served; --uninstall removes it all but the config")
    func installAndUninstall() throws {
      try Harness.run("install") { h in
        chmod(h.directory, 0o755)  // the plugins (uid 65534) reach their files beneath it
        let root = h.directory + "/root"
        let options = ["--prefix", root + "/usr", "--sysconfdir", root + "/etc", "--localstatedir", root + "/var", "--unitdir", root + "/units", "--sysusersdir", root + "/sysusers.d"]
        let install = try FixtureProcess(
          label: "install", executable: "/bin/bash", arguments: [Self.packageRoot + "/scripts/install.sh"] + options + ["--from", Harness.binDirectory],
          environment: ["PATH": "/usr/bin:/bin"], stdoutPath: h.directory + "/install.stdout", stderrPath: h.directory + "/install.stderr")
        #expect(install.wait(timeout: 60) == .exited(0), h.diagnostics(install.stdout + install.stderr))
        #expect(install.stdout.contains("config.json: ok"), h.diagnostics(install.stdout))
        let units = ["uffd-broker.service", "uffd-broker.socket", "uffd-broker-plugin.socket", "uffd-broker-control.socket"]
        for unit in units { #expect(access(root + "/units/" + unit, R_OK) == 0, h.diagnostics(unit)) }
        #expect(readTextFile(root + "/sysusers.d/uffd-broker.conf").contains("u uffd-plugin "), h.diagnostics)
        #expect(readTextFile(root + "/units/uffd-broker.service").contains("ExecStart=\(root)/usr/bin/uffd-broker --config \(root)/etc/uffd-broker/config.json"), h.diagnostics)
        let run = h.directory + "/run"
        mkdir(run, 0o700)
        let broker = try FixtureProcess(
          label: "installed-broker", executable: root + "/usr/bin/uffd-broker",
          arguments: ["--config", root + "/etc/uffd-broker/config.json", "--client-socket", run + "/c.sock", "--plugin-socket", run + "/p.sock", "--control-socket", run + "/ctl.sock"],
          environment: [:], stdoutPath: h.directory + "/installed.stdout", stderrPath: h.directory + "/installed.stderr")
        let connected = waitUntil(timeout: 20) {
          let status = try? ControlChannel.status(socketPath: run + "/ctl.sock")
          return status?.plugins.count == 3 && status?.plugins.allSatisfy { $0.state == "connected" && $0.spawnedPID == $0.connectedPID } == true
        }
        #expect(connected, h.diagnostics(broker.stderr))
        let plugin = try #require(try ControlChannel.status(socketPath: run + "/ctl.sock").plugin("zero-fill"), h.diagnostics)
        #expect(readTextFile("/proc/\(plugin.spawnedPID)/status").contains("Uid:\t\(defaultPluginUser.uid)\t"), h.diagnostics)
        let client = try FixtureProcess(
          label: "installed-client", executable: Harness.fixtureExecutable, arguments: ["client", "zero", "4", "2", "zero-fill"],
          environment: ["UFFD_BROKER_CLIENT_SOCKET": run + "/c.sock"], stdoutPath: h.directory + "/client.stdout", stderrPath: h.directory + "/client.stderr")
        #expect(client.wait(timeout: 30) == .exited(0) && client.stdout.hasSuffix("verified \(pages(mib: 4)) pages, 0 wrong\n"), h.diagnostics(client.stdout + client.stderr))
        #expect(broker.stop() == .exited(0), h.diagnostics(broker.stderr))

        let uninstall = try FixtureProcess(
          label: "uninstall", executable: "/bin/bash", arguments: [Self.packageRoot + "/scripts/install.sh", "--uninstall"] + options,
          environment: ["PATH": "/usr/bin:/bin"], stdoutPath: h.directory + "/uninstall.stdout", stderrPath: h.directory + "/uninstall.stderr")
        #expect(uninstall.wait(timeout: 30) == .exited(0), h.diagnostics(uninstall.stdout + uninstall.stderr))
        #expect(access(root + "/usr/bin/uffd-broker", F_OK) != 0, h.diagnostics)
        for unit in units { #expect(access(root + "/units/" + unit, F_OK) != 0, h.diagnostics(unit)) }
        #expect(access(root + "/sysusers.d/uffd-broker.conf", F_OK) != 0, h.diagnostics)
        #expect(access(root + "/etc/uffd-broker/config.json", F_OK) == 0, h.diagnostics)
      }
    }

    @Test("A spawned plugin whose executable disappears counts its failed spawns toward maxRestarts and is given up (not retried forever)")
    func failedSpawnsCount() throws {
      var template = Array("/tmp/uffd-it-gone-XXXXXX".utf8CString)
      let made = try #require(mkdtemp(&template))
      let directory = String(cString: made)
      defer { _ = unlink(directory + "/gone-plugin"); rmdir(directory) }
      let executable = directory + "/gone-plugin"
      #expect(link("/bin/true", executable) == 0 || symlink("/bin/true", executable) == 0)
      let plugin = #"{"name": "gone", "executable": "\#(executable)", "arguments": [], "maxRestarts": 3, "user": "root"}"#
      try Harness.run("spawn-fails", configFields: ["\"plugins\": [\(plugin)]"]) { h in
        // It ran (and exited at once); from now on it cannot be spawned at all.
        #expect(h.waitForStatus { $0.plugin("gone")?.tally[.pluginSpawned] ?? 0 >= 1 }, h.diagnostics)
        #expect(unlink(executable) == 0)
        #expect(h.waitForStatus(timeout: 30) { $0.plugin("gone")?.tally[.pluginGivenUp] == 1 }, h.diagnostics)
        let tally = try #require(h.status().plugin("gone")?.tally, h.diagnostics)
        #expect(tally[.pluginSpawnFailed] >= 1 && tally[.pluginExited] + tally[.pluginSpawnFailed] == 4, h.diagnostics("\(tally)"))
      }
    }

    @Test("A config file with a JSON syntax error on a known line: check-config and the broker name its line and column, with no usage banner")
    func jsonSyntaxErrorPlace() throws {
      try Harness.run("json-syntax") { h in
        let path = h.directory + "/syntax.json"
        // Line 4, the second comma after "/bin/true" (column 45).
        try writeTextFile(path, """
          {
            "maxClients": 3,
            "plugins": [
              {"name": "a", "executable": "/bin/true",,}
            ]
          }

          """)
        let expected = "not valid JSON at line 4, column 45: invalid value"
        for (label, arguments) in [("check", ["check-config", path]),
                                   ("serve", ["--config", path, "--client-socket", h.directory + "/s-c.sock", "--plugin-socket", h.directory + "/s-p.sock"])] {
          let process = try FixtureProcess(label: label, executable: Harness.brokerExecutable, arguments: arguments, environment: [:],
                                           stdoutPath: h.directory + "/\(label).stdout", stderrPath: h.directory + "/\(label).stderr")
          #expect(process.wait(timeout: 10) == .exited(78), h.diagnostics(process.stderr))
          #expect(process.stderr.contains(expected) && !process.stderr.contains("USAGE") && process.stdout.isEmpty, h.diagnostics(process.stdout + process.stderr))
        }
      }
    }

    @Test("`uffd-broker stats` is `status` under a second name: --json answers the same status, and the table for people too")
    func statsIsStatus() throws {
      try Harness.run("stats") { h in
        let plugin = try h.startPlugin(name: "pattern", mode: "pattern")
        var answers: [String: BrokerStatus] = [:]
        for command in ["status", "stats"] {
          for json in [true, false] {
            let label = "\(command)\(json ? "-json" : "")"
            let process = try FixtureProcess(
              label: label, executable: Harness.brokerExecutable, arguments: [command, "--control-socket", h.controlSocket] + (json ? ["--json"] : []),
              environment: [:], stdoutPath: h.directory + "/\(label).stdout", stderrPath: h.directory + "/\(label).stderr")
            #expect(process.wait(timeout: 10) == .exited(0), h.diagnostics(process.stdout + process.stderr))
            if json {
              answers[command] = try? JSONDecoder().decode(BrokerStatus.self, from: Data(process.stdout.utf8))
            } else {
              #expect(process.stdout.contains("broker pid \(h.broker.pid)") && process.stdout.contains("pattern  connected (pid \(plugin.pid))"),
                      h.diagnostics(process.stdout + process.stderr))
            }
          }
        }
        let status = try #require(answers["status"], h.diagnostics)
        let stats = try #require(answers["stats"], h.diagnostics)
        #expect(stats.pid == h.broker.pid && stats.pid == status.pid, h.diagnostics)
        #expect(stats.plugins.map(\.name) == status.plugins.map(\.name) && stats.plugins.map(\.connectedPID) == [plugin.pid], h.diagnostics)
      }
    }

    @Test("The sample plugins, the broker, the demo and the benchmark answer --help and --version without connecting anywhere, and refuse a bad option with a usage error on stderr")
    func commandLines() throws {
      try Harness.run("command-lines") { h in
        for product in ["uffd-broker", "snapshot-plugin", "swap-plugin", "zero-fill-plugin", "uffd-demo", "uffd-bench"] {
          // No socket reachable: --help must not try one.
          let environment = ["UFFD_BROKER_PLUGIN_SOCKET": h.directory + "/none.sock", "UFFD_BROKER_CLIENT_SOCKET": h.directory + "/none.sock"]
          let help = try FixtureProcess(label: "\(product)-help", executable: Harness.binDirectory + "/" + product, arguments: ["--help"],
                                        environment: environment, stdoutPath: h.directory + "/\(product)-help.stdout", stderrPath: h.directory + "/\(product)-help.stderr")
          #expect(help.wait(timeout: 10) == .exited(0) && help.stdout.contains("USAGE: \(product)"), h.diagnostics(help.stdout + help.stderr))
          let version = try FixtureProcess(label: "\(product)-version", executable: Harness.binDirectory + "/" + product, arguments: ["--version"],
                                           environment: environment, stdoutPath: h.directory + "/\(product)-version.stdout", stderrPath: h.directory + "/\(product)-version.stderr")
          #expect(version.wait(timeout: 10) == .exited(0) && version.stdout == uffdBrokerVersion + "\n", h.diagnostics(version.stdout + version.stderr))
          let bad = try FixtureProcess(label: "\(product)-bad", executable: Harness.binDirectory + "/" + product, arguments: ["--no-such-option"],
                                       environment: environment, stdoutPath: h.directory + "/\(product)-bad.stdout", stderrPath: h.directory + "/\(product)-bad.stderr")
          #expect(bad.wait(timeout: 10) == .exited(64) && bad.stderr.contains("Unknown option '--no-such-option'") && bad.stdout.isEmpty,
                  h.diagnostics(bad.stdout + bad.stderr))
        }
      }
    }

    @Test("uffd-bench restore runs every strategy end to end on a 4 MiB snapshot (its own broker and snapshot-plugin processes) and the worker's checksum of the read pages matches the file in each")
    func restoreBenchmark() throws {
      try Harness.run("restore-bench") { h in
        for percent in [100, 10] {
          let bench = try FixtureProcess(label: "restore-\(percent)", executable: Harness.binDirectory + "/uffd-bench",
                                         arguments: ["restore", "--mib", "4", "--percent", "\(percent)", "--rounds", "1", "--directory", h.directory],
                                         environment: [:], stdoutPath: h.directory + "/restore-\(percent).stdout", stderrPath: h.directory + "/restore-\(percent).stderr")
          #expect(bench.wait(timeout: 120) == .exited(0), h.diagnostics(bench.stdout + bench.stderr))
          let lines = bench.stdout.split(separator: "\n")
          for strategy in ["eager", "lazy-1", "lazy-16", "lazy-32", "local-1", "local-16", "local-32"] {
            #expect(lines.contains { $0.hasPrefix("round 1/1 \(strategy) ") }, "no round of \(strategy): \(bench.stdout)")
          }
          #expect(lines.last == "every round's checksum matched the file", h.diagnostics(bench.stdout + bench.stderr))
        }
      }
    }
  }
}
