import BrokerProtocol
import ClientSDK
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Sockets only where they cannot be squatted: the broker takes nobody's
  /// place and serves only from a directory no one else can write, and the
  /// SDKs hand nothing to a listener that is not root, theirs, or named.
  @Suite("Socket placement")
  struct SocketPlacement {
    @Test("A second broker on the same sockets refuses to start (EX_CANTCREAT), and the first keeps serving on them")
    func secondBrokerRefused() throws {
      try Harness.run("second-broker") { h in
        try h.startPlugin(name: "pattern", mode: "pattern")
        let second = try Self.startBroker(in: h.directory, label: "second", sockets: [h.clientSocket, h.pluginSocket, h.controlSocket])
        let status = second.wait(timeout: 10)
        #expect(status == .exited(73), h.diagnostics("second broker: \(second.stderr)"))
        #expect(second.stderr == "uffd-broker: a broker already serves \(h.clientSocket) (stop it first, or choose other sockets)\n", h.diagnostics)
        // Nothing of the first broker's was taken: the same sockets, the same broker answering.
        for path in [h.clientSocket, h.pluginSocket, h.controlSocket] { #expect(Self.isSocket(path), h.diagnostics("\(path) is gone")) }
        #expect(try h.status().pid == h.broker.pid, h.diagnostics)
        let touch = try h.runClient("touch", mib: 1, threads: 1, plugin: "pattern")
        #expect(touch.status == .exited(0), h.diagnostics(touch.stdout + touch.stderr))
        // A dead broker's sockets (no listener) are replaced, as on every restart.
        try h.killAndRestartBroker()
        #expect(try h.status().pid == h.broker.pid, h.diagnostics)
      }
    }

    @Test("Something at a socket path that is not a socket (a file, a symlink) is never removed: the broker refuses to start")
    func nonSocketKept() throws {
      try Self.withDirectory("not-socket") { directory in
        let sockets = ["client.sock", "plugin.sock", "control.sock"].map { directory + "/" + $0 }
        try writeTextFile(sockets[0], "precious\n")
        let first = try Self.startBroker(in: directory, label: "file", sockets: sockets)
        #expect(first.wait(timeout: 10) == .exited(73), "\(first.stderr)")
        #expect(first.stderr.contains("\(sockets[0]) exists and is not a socket; not removing it"), "\(first.stderr)")
        #expect(readTextFile(sockets[0]) == "precious\n")
        // A symlink at the last path: the first two are bound, then given back (removed) when it refuses.
        unlink(sockets[0])
        try writeTextFile(directory + "/target", "kept\n")
        #expect(symlink(directory + "/target", sockets[2]) == 0)
        let second = try Self.startBroker(in: directory, label: "symlink", sockets: sockets)
        #expect(second.wait(timeout: 10) == .exited(73), "\(second.stderr)")
        #expect(second.stderr.contains("\(sockets[2]) exists and is not a socket"), "\(second.stderr)")
        var info = stat()
        #expect(lstat(sockets[2], &info) == 0 && info.st_mode & S_IFMT == S_IFLNK)
        #expect(readTextFile(directory + "/target") == "kept\n")
        #expect(access(sockets[0], F_OK) != 0 && access(sockets[1], F_OK) != 0, "the refused broker left its sockets behind")
      }
    }

    @Test("A socket directory another uid owns, or that others may write, is refused with its owner and mode; none is bound there",
          .enabled(if: getuid() == 0, "needs root to give a directory to another uid"))
    func unsafeDirectoryRefused() throws {
      try Self.withDirectory("unsafe-dir") { directory in
        let cases: [(String, (String) -> Void, String)] = [
          ("foreign", { chown($0, 65534, 65534) }, "(owner uid 65534, mode 700) is owned by neither the broker's uid (0) nor root"),
          ("world-writable", { chmod($0, 0o777) }, "(owner uid 0, mode 777) is writable by others"),
          ("sticky", { chmod($0, 0o1777) }, "(owner uid 0, mode 1777) is writable by others"),
        ]
        for (label, spoil, reason) in cases {
          let sockets = directory + "/" + label
          #expect(mkdir(sockets, 0o700) == 0)
          spoil(sockets)
          let broker = try Self.startBroker(in: directory, label: label, sockets: ["client", "plugin", "control"].map { "\(sockets)/\($0).sock" })
          #expect(broker.wait(timeout: 10) == .exited(73), "\(label): \(broker.stderr)")
          #expect(broker.stderr.hasPrefix("uffd-broker: the socket directory \(sockets) \(reason): another user could replace"), "\(label): \(broker.stderr)")
          #expect(Self.entries(sockets).isEmpty, "\(label): \(Self.entries(sockets))")
          rmdir(sockets)
        }
      }
    }

    @Test("Client, plugin and status refuse a listener run by another uid before sending anything; a named uid is accepted",
          .enabled(if: getuid() == 0, "needs root to run the fake broker as another uid"))
    func squatterRefused() throws {
      try Self.withSquatter("squatter", connections: 5) { directory, socket, squatter in
        let refusal = "\(socket) is served by uid 65534, not root or you (uid 0); refusing to send it anything"
        let environment = ["UFFD_BROKER_CLIENT_SOCKET": socket, "UFFD_BROKER_PLUGIN_SOCKET": socket, "UFFD_BROKER_UID": ""]
        // A client process: its userfaultfd must not go to the squatter.
        let client = try FixtureProcess(
          label: "client", executable: Harness.fixtureExecutable, arguments: ["client", "touch", "1", "1", "pattern"], environment: environment,
          stdoutPath: directory + "/client.stdout", stderrPath: directory + "/client.stderr")
        #expect(client.wait(timeout: 20) == .exited(1), "\(client.stdout)")
        #expect(client.stdout.contains("error: not registering with the broker at \(socket): \(refusal)"), "\(client.stdout)")
        // A plugin process: no Hello (and no pages) for the squatter.
        let plugin = try FixtureProcess(
          label: "plugin", executable: Harness.fixtureExecutable, arguments: ["plugin", "pattern", "pattern"], environment: environment,
          stdoutPath: directory + "/plugin.stdout", stderrPath: directory + "/plugin.stderr")
        #expect(plugin.wait(timeout: 20) == .exited(1), "\(plugin.stderr)")
        #expect(plugin.stderr.contains("plugin: \(refusal)"), "\(plugin.stderr)")
        // `uffd-broker status` and the control channel.
        let status = try FixtureProcess(
          label: "status", executable: Harness.brokerExecutable, arguments: ["status", "--control-socket", socket], environment: [:],
          stdoutPath: directory + "/status.stdout", stderrPath: directory + "/status.stderr")
        #expect(status.wait(timeout: 20) == .exited(69), "\(status.stderr)")
        #expect(status.stderr.contains(refusal), "\(status.stderr)")
        #expect(throws: BrokerError(.notAuthorized, refusal + " (if uid 65534 runs your broker, say so with UFFD_BROKER_UID=65534)")) {
          try ControlChannel.status(socketPath: socket, timeoutMilliseconds: 1000)
        }
        // Named as the broker's uid, it is accepted.
        _ = try PacketSocket.connect(path: socket, trusting: 65534)
        #expect(squatter.wait(timeout: 20) == .exited(0), "\(squatter.stdout)")
        #expect(squatter.stdout.hasSuffix("squatter: 5 connections, 0 packets, 0 descriptors\n"), "\(squatter.stdout)")
      }
    }

    @Test("The C and Python plugin SDKs refuse a listener run by another uid before sending anything",
          .enabled(if: getuid() == 0 && ConformanceLanguage.cToolchainPresent && BrokerIntegrationTests.PythonPlugin.python != nil,
                   "needs root, the C SDK's toolchain and python3 with protobuf"))
    func squatterRefusedByOtherSDKs() throws {
      try Self.withSquatter("squatter-sdks", connections: 2) { directory, socket, squatter in
        let environment = ["UFFD_BROKER_PLUGIN_SOCKET": socket, "UFFD_BROKER_UID": "", "PYTHONPATH": BrokerIntegrationTests.PythonPlugin.sdk, "PYTHONDONTWRITEBYTECODE": "1"]
        let python = try #require(BrokerIntegrationTests.PythonPlugin.python)
        let plugins = [
          ("c", try ConformanceLanguage.cExecutable.get(), ["squatted"], "held by uid 65534, not root or you; refusing to send it anything"),
          ("python", python, [ConformanceLanguage.sources + "/python/conformance_plugin.py", "squatted"], "is served by uid 65534, not root or you"),
        ]
        for (label, executable, arguments, refusal) in plugins {
          let plugin = try FixtureProcess(
            label: label, executable: executable, arguments: arguments, environment: environment,
            stdoutPath: directory + "/\(label).stdout", stderrPath: directory + "/\(label).stderr")
          let status = plugin.wait(timeout: 20)
          #expect(status != nil && status != .exited(0), "\(label): \(plugin.stderr)")
          #expect(plugin.stderr.contains(refusal), "\(label): \(plugin.stderr)")
        }
        #expect(squatter.wait(timeout: 20) == .exited(0), "\(squatter.stdout)")
        #expect(squatter.stdout.hasSuffix("squatter: 2 connections, 0 packets, 0 descriptors\n"), "\(squatter.stdout)")
      }
    }

    @Test("Without XDG_RUNTIME_DIR a non-root broker, client and status have no default socket (no /tmp): each says what to set",
          .enabled(if: getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0, "needs root and setpriv to run as another uid"))
    func noDefaultInTmp() throws {
      try Self.withDirectory("no-default") { directory in
        let unset = ["XDG_RUNTIME_DIR", "UFFD_BROKER_CLIENT_SOCKET", "UFFD_BROKER_PLUGIN_SOCKET", "UFFD_BROKER_CONTROL_SOCKET"].flatMap { ["-u", $0] }
        let asNobody = unset + ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        let runs: [(String, [String], Int32, String)] = [
          ("broker", [Harness.brokerExecutable], 78, "uffd-broker: no safe default for the client socket: XDG_RUNTIME_DIR is not set"),
          ("status", [Harness.brokerExecutable, "status"], 78, "uffd-broker status: no safe default for the control socket"),
          ("client", [Harness.fixtureExecutable, "client", "touch", "1", "1", "pattern"], 1,
           "error: no broker socket to register with: no safe default for the client socket"),
        ]
        for (label, command, expected, message) in runs {
          let process = try FixtureProcess(
            label: label, executable: "/usr/bin/env", arguments: asNobody + command, environment: [:],
            stdoutPath: "\(directory)/\(label).stdout", stderrPath: "\(directory)/\(label).stderr")
          #expect(process.wait(timeout: 20) == .exited(expected), "\(label): \(process.stdout) \(process.stderr)")
          #expect((process.stdout + process.stderr).contains(message), "\(label): \(process.stdout) \(process.stderr)")
          #expect(access("/tmp/uffd-broker-65534", F_OK) != 0, "\(label) made /tmp/uffd-broker-65534")
        }
      }
    }

    @Test("A socket path through a symbolic link into another user's directory is refused (the directories really gone through are checked)",
          .enabled(if: getuid() == 0, "needs root to give a directory to another uid"))
    func symlinkedParentRefused() throws {
      try Self.withDirectory("symlinked") { directory in
        let theirs = directory + "/theirs"
        #expect(mkdir(theirs, 0o755) == 0 && mkdir(theirs + "/run", 0o700) == 0 && chown(theirs, 65534, 65534) == 0)
        #expect(symlink(theirs, directory + "/link") == 0)
        let sockets = ["client", "plugin", "control"].map { "\(directory)/link/run/\($0).sock" }
        let broker = try Self.startBroker(in: directory, label: "symlinked", sockets: sockets)
        #expect(broker.wait(timeout: 10) == .exited(73), "\(broker.stderr)")
        #expect(broker.stderr.contains("(owner uid 65534, mode 755) is owned by neither the broker's uid (0) nor root"), "\(broker.stderr)")
        #expect(Self.entries(theirs + "/run").isEmpty)
        rmdir(theirs + "/run")
        unlink(directory + "/link")
      }
    }

    // MARK: - Helpers

    /// A broker on explicit `sockets` (client, plugin, control), its output in `directory`.
    static func startBroker(in directory: String, label: String, sockets: [String]) throws -> FixtureProcess {
      try FixtureProcess(
        label: "broker-\(label)", executable: Harness.brokerExecutable,
        arguments: ["--client-socket", sockets[0], "--plugin-socket", sockets[1], "--control-socket", sockets[2]], environment: [:],
        stdoutPath: "\(directory)/broker-\(label).stdout", stderrPath: "\(directory)/broker-\(label).stderr")
    }

    /// Runs `body` with a fresh private directory, removed afterwards (with one level of subdirectories).
    /// A fake broker of uid 65534 listening in a directory of its own (`broker-fixture squatter`),
    /// counting what the next `connections` send it.
    static func withSquatter(_ label: String, connections: Int, _ body: (_ directory: String, _ socket: String, FixtureProcess) throws -> Void) throws {
      try withDirectory(label) { directory in
        chmod(directory, 0o755)  // nobody must reach its own directory inside
        let path = directory + "/squat"
        #expect(mkdir(path, 0o755) == 0 && chown(path, 65534, 65534) == 0)
        let socket = path + "/broker.sock"
        let squatter = try FixtureProcess(
          label: "squatter", executable: Harness.fixtureExecutable, arguments: ["squatter", socket, "\(connections)"], environment: [:],
          stdoutPath: directory + "/squatter.stdout", stderrPath: directory + "/squatter.stderr")
        try #require(waitUntil(timeout: 10) { isSocket(socket) || !squatter.isRunning } && squatter.isRunning, "\(squatter.stdout)")
        try body(directory, socket, squatter)
      }
    }

    static func withDirectory(_ label: String, _ body: (String) throws -> Void) throws {
      var template = Array("/tmp/uffd-it-\(label)-XXXXXX".utf8CString)
      guard let made = mkdtemp(&template) else { throw HarnessError("mkdtemp failed: \(errno)") }
      let directory = String(cString: made)
      defer {
        for entry in entries(directory) { removeDirectory(directory + "/" + entry) }
        removeDirectory(directory)
      }
      try body(directory)
    }

    static func isSocket(_ path: String) -> Bool {
      var info = stat()
      return lstat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK
    }

    /// The names in `directory` (without . and ..).
    static func entries(_ directory: String) -> [String] {
      guard let dir = opendir(directory) else { return [] }
      defer { closedir(dir) }
      var names: [String] = []
      while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
      }
      return names.sorted()
    }
  }
}
