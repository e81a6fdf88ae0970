import BrokerProtocol
import Foundation
import Glibc
import Testing

/// One broker daemon with its fixture plugins and clients, in a private temp
/// directory (sockets, broker log, plugin event logs, child stdout/stderr).
///
/// Use `Harness.run { harness in ... }`: it starts the broker, runs the body,
/// and tears everything down in every path (children: SIGTERM → wait →
/// SIGKILL; then the broker, which must exit 0 on SIGTERM; then its process
/// group). The temp directory is removed when the test passed, kept (and
/// named in the issue) when it did not.
final class Harness {
  /// Where the test bundle, `uffd-broker` and `broker-fixture` were built.
  static let binDirectory: String = {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    precondition(n > 0, "cannot read /proc/self/exe")
    let path = String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return String(path[..<path.lastIndex(of: "/")!])
  }()
  static var brokerExecutable: String { binDirectory + "/uffd-broker" }
  static var fixtureExecutable: String { binDirectory + "/broker-fixture" }

  let directory: String
  let clientSocket: String
  let pluginSocket: String
  let controlSocket: String
  let brokerLogPath: String
  /// The uid the broker and its fixture processes run as (nil: the test's own).
  let user: UInt32?
  private(set) var broker: FixtureProcess!
  /// With socket activation: the client and plugin sockets the test listens on
  /// and hands to every broker it starts, as systemd's .socket units would.
  private(set) var handedOver: [PacketListener] = []
  private var children: [FixtureProcess] = []
  private var counter = 0

  /// A configured plugin the broker spawns itself (written to the config file).
  struct SpawnedPlugin {
    var name: String
    var arguments: [String]
    /// A product beside the test bundle; nil: `broker-fixture`.
    var product: String? = nil
    /// Its config's `user` (nil: left out, the broker's default: `nobody` for
    /// a root broker). Root by default here, said explicitly as the broker
    /// requires: the fixture plugins write their event logs into the
    /// harness's private directory.
    var user: String? = "root"
    var group: String? = nil
  }

  /// Starts a broker (debug logging), with a config file if any field is given
  /// (`$DIR` in a field stands for the harness's directory), and waits for it to serve.
  private init(label: String, spawned: [SpawnedPlugin], pluginDeadlineMilliseconds: Int?, configFields: [String], user: UInt32?, socketActivation: Bool,
               brokerEnvironment: [String: String]) throws {
    self.brokerEnvironment = brokerEnvironment
    var template = Array("/tmp/uffd-it-\(label)-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw HarnessError("mkdtemp failed: \(errno)") }
    directory = String(cString: made)
    self.user = user
    // The broker's socket directory must be its own: the whole temp directory, then.
    if let user, chown(directory, user, user) != 0 { throw HarnessError("cannot chown \(directory) to \(user): \(errno)") }
    clientSocket = directory + "/client.sock"
    pluginSocket = directory + "/plugin.sock"
    controlSocket = directory + "/control.sock"
    brokerLogPath = directory + "/broker.log"
    for executable in [Self.brokerExecutable, Self.fixtureExecutable] where access(executable, X_OK) != 0 {
      throw HarnessError("\(executable) is missing: build with `swift build --build-tests`")
    }
    var arguments = ["--client-socket", clientSocket, "--plugin-socket", pluginSocket, "--control-socket", controlSocket, "--log-level", "debug"]
    if !spawned.isEmpty || pluginDeadlineMilliseconds != nil || !configFields.isEmpty {
      var fields = configFields.map { $0.replacingOccurrences(of: "$DIR", with: directory) }
      if !spawned.isEmpty { fields.append(Self.pluginsField(spawned)) }
      if let pluginDeadlineMilliseconds { fields.append("\"pluginDeadlineMilliseconds\": \(pluginDeadlineMilliseconds)") }
      let path = directory + "/config.json"
      try writeTextFile(path, "{\(fields.joined(separator: ", "))}\n")
      arguments += ["--config", path]
    }
    brokerArguments = arguments
    if socketActivation {
      precondition(user == nil, "a socket-activated broker runs as the test's uid")
      for path in [clientSocket, pluginSocket] {
        let listener = try PacketListener(path: path, mode: 0o600)
        // Blocking, as systemd hands them over (NonBlocking=no): the broker must cope.
        _ = fcntl(listener.fd, F_SETFL, fcntl(listener.fd, F_GETFL) & ~O_NONBLOCK)
        handedOver.append(listener)
      }
    }
    try startBroker()
  }

  /// The config's `"plugins": [...]` field for `spawned`.
  static func pluginsField(_ spawned: [SpawnedPlugin]) -> String {
    let plugins = spawned.map { plugin in
      let args = plugin.arguments.map(jsonString).joined(separator: ", ")
      let executable = plugin.product.map { binDirectory + "/" + $0 } ?? fixtureExecutable
      let identity = [("user", plugin.user), ("group", plugin.group)].compactMap { key, value in value.map { ", \"\(key)\": \(jsonString($0))" } }.joined()
      return "{\"name\": \(jsonString(plugin.name)), \"executable\": \(jsonString(executable)), \"arguments\": [\(args)]\(identity)}"
    }
    return "\"plugins\": [\(plugins.joined(separator: ", "))]"
  }

  private var brokerArguments: [String] = []
  /// Set in the broker's environment beside `environment` (a test may change it for a restart).
  var brokerEnvironment: [String: String]

  /// Starts the broker and waits until it answers on its control socket
  /// (it listens on every socket before it serves any).
  private func startBroker() throws {
    broker = if handedOver.isEmpty {
      try spawn(
        label: "uffd-broker", executable: Self.brokerExecutable, arguments: brokerArguments, environment: environment.merging(brokerEnvironment) { $1 },
        stdoutPath: directory + "/broker.stdout", stderrPath: brokerLogPath, appendOutput: true)
    } else {
      try Self.spawnBroker(
        label: "uffd-broker", arguments: brokerArguments, environment: environment.merging(brokerEnvironment) { $1 }, handing: handedOver.map(\.fd),
        stdoutPath: directory + "/broker.stdout", stderrPath: brokerLogPath, appendOutput: true)
    }
    let serving = waitUntil(timeout: 10) { !broker.isRunning || (try? status())?.pid == broker.pid }
    guard serving, broker.isRunning else {
      broker.stop()
      throw HarnessError("the broker did not start serving: \(broker.status.map { "\($0)" } ?? "timed out"); log:\n\(brokerLog)")
    }
  }

  /// Starts the broker again after `stopBroker()` (on the same sockets and config).
  func restartStoppedBroker() throws {
    precondition(!broker.isRunning, "stop the broker first")
    try startBroker()
  }

  /// Starts `uffd-broker` with `arguments` (as the test's uid) as systemd's
  /// socket activation does: `descriptors` become its 3, 4, ..., with
  /// `LISTEN_FDS`, `LISTEN_FDNAMES` (`names`, colon-separated) and `LISTEN_PID`
  /// set to its own pid (a shell that execs the broker: same pid).
  static func spawnBroker(label: String, arguments: [String], environment: [String: String], handing descriptors: [CInt], names: [String] = ["client", "uffd-broker.socket"],
                          stdoutPath: String, stderrPath: String, appendOutput: Bool = false) throws -> FixtureProcess {
    let activation = ["LISTEN_FDS": "\(descriptors.count)", "LISTEN_FDNAMES": names.joined(separator: ":")]
    return try FixtureProcess(
      label: label, executable: "/bin/sh", arguments: ["-c", #"LISTEN_PID=$$ exec "$0" "$@""#, brokerExecutable] + arguments,
      environment: environment.merging(activation) { $1 }, stdoutPath: stdoutPath, stderrPath: stderrPath, appendOutput: appendOutput, descriptors: descriptors)
  }

  /// Kills the broker with SIGKILL (no cleanup of its own) and starts a new one
  /// on the same sockets and config; its log continues in the same file.
  func killAndRestartBroker() throws {
    killBroker()
    try startBroker()
    brokerKilledByTest = false
  }

  /// Kills the broker with SIGKILL, for good.
  func killBroker() {
    kill(broker.pid, SIGKILL)
    _ = broker.stop(grace: 5)
    brokerKilledByTest = true
  }

  /// The environment of every fixture process.
  var environment: [String: String] {
    ["UFFD_BROKER_CLIENT_SOCKET": clientSocket, "UFFD_BROKER_PLUGIN_SOCKET": pluginSocket]
  }

  /// Runs `body` against a fresh broker and tears everything down afterwards,
  /// whatever happens. The broker must still be alive at the end and exit 0 on SIGTERM.
  /// `socketActivation`: the test listens on the client and plugin sockets and
  /// hands them to the broker (`spawnBroker`), which binds only its control socket.
  static func run(
    _ label: String, spawning spawned: [SpawnedPlugin] = [], pluginDeadlineMilliseconds: Int? = nil, configFields: [String] = [],
    user: UInt32? = nil, socketActivation: Bool = false, brokerEnvironment: [String: String] = [:], sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (Harness) throws -> Void
  ) throws {
    let harness = try Harness(label: label, spawned: spawned, pluginDeadlineMilliseconds: pluginDeadlineMilliseconds, configFields: configFields, user: user,
                              socketActivation: socketActivation, brokerEnvironment: brokerEnvironment)
    var finished = false
    defer { harness.tearDown(keep: !finished, sourceLocation: sourceLocation) }
    try body(harness)
    finished = true
  }

  /// Set when a failure message was built: the temp directory is kept for a look.
  private var keepDirectory = false

  /// A comment for `#expect`/`#require` (evaluated only when they fail): the
  /// temp directory, which is then kept, and the tail of the broker log.
  var diagnostics: Comment { diagnostics("") }

  /// `diagnostics` after a note of the test's own.
  func diagnostics(_ note: String) -> Comment {
    keepDirectory = true
    return Comment(rawValue: (note.isEmpty ? "" : note + "\n") + "kept \(directory)\n--- broker log (tail):\n\(tail(brokerLog, lines: 40))")
  }

  private var brokerStoppedByTest = false
  /// The test killed the broker on purpose (`killBroker`): its status is not checked.
  private var brokerKilledByTest = false

  /// Stops every child, then the broker (SIGTERM, up to 5 s, then SIGKILL); for
  /// tests that check what the broker leaves behind. Teardown still checks the status.
  @discardableResult
  func stopBroker() -> ExitStatus {
    for child in children.reversed() { child.stop(grace: 2) }
    brokerStoppedByTest = broker.isRunning
    return broker.stop(grace: 5)
  }

  private func tearDown(keep: Bool, sourceLocation: SourceLocation) {
    let brokerAlive = broker.isRunning || brokerStoppedByTest
    for child in children.reversed() { child.stop(grace: 2) }
    let status = broker.stop(grace: 5)
    // Anything the broker spawned and left behind.
    kill(-broker.pid, SIGKILL)
    var ok = !keep
    if brokerKilledByTest {
      // Killed on purpose; nothing to check.
    } else if !brokerAlive {
      ok = false
      Issue.record("the broker died during the test: \(status)\n--- \(directory)\n--- broker log (tail):\n\(tail(brokerLog, lines: 40))", sourceLocation: sourceLocation)
    } else if status != .exited(0) {
      ok = false
      Issue.record("the broker did not exit cleanly on SIGTERM: \(status)\n--- \(directory)\n--- broker log (tail):\n\(tail(brokerLog, lines: 40))", sourceLocation: sourceLocation)
    }
    if ok && !keepDirectory && getenv("UFFD_IT_KEEP") == nil { removeDirectory(directory) }
  }

  // MARK: - Processes

  /// Starts a process, as `user` if given (through setpriv: same pid, no groups).
  private func spawn(label: String, executable: String, arguments: [String], environment: [String: String], stdoutPath: String, stderrPath: String,
                     appendOutput: Bool = false, user: UInt32? = nil) throws -> FixtureProcess {
    let (executable, arguments) = if let user = user ?? self.user {
      (Self.setpriv, ["--reuid=\(user)", "--regid=\(user)", "--clear-groups", executable] + arguments)
    } else {
      (executable, arguments)
    }
    return try FixtureProcess(label: label, executable: executable, arguments: arguments, environment: environment,
                              stdoutPath: stdoutPath, stderrPath: stderrPath, appendOutput: appendOutput)
  }

  static let setpriv = "/usr/bin/setpriv"

  private func nextLabel(_ kind: String) -> String {
    counter += 1
    return "\(kind)-\(counter)"
  }

  /// Starts `broker-fixture plugin NAME MODE EVENTLOG` and, unless told not to,
  /// waits until the broker logs its connection.
  @discardableResult
  func startPlugin(name: String, mode: String, waitForConnection: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) throws -> FixtureProcess {
    try startPluginProcess(name: name, executable: Self.fixtureExecutable, arguments: ["plugin", name, mode, eventLogPath(name)], waitForConnection: waitForConnection)
  }

  /// Starts one of the sample plugins of `Examples/` (`product` names its executable).
  @discardableResult
  func startSamplePlugin(_ product: String, name: String, arguments: [String] = []) throws -> FixtureProcess {
    try startPluginProcess(name: name, executable: Self.binDirectory + "/" + product, arguments: [name] + arguments, waitForConnection: true)
  }

  /// Starts a plugin process (`executable ARGUMENTS...` with the harness's
  /// environment and `extraEnvironment`) and, unless told not to, waits until
  /// the broker lists it as connected.
  func startPluginProcess(name: String, executable: String, arguments: [String], extraEnvironment: [String: String] = [:],
                          waitForConnection: Bool) throws -> FixtureProcess {
    let label = nextLabel("plugin-\(name)")
    let plugin = try spawn(
      label: label, executable: executable, arguments: arguments,
      environment: environment.merging(extraEnvironment) { $1 }, stdoutPath: "\(directory)/\(label).stdout", stderrPath: "\(directory)/\(label).stderr")
    children.append(plugin)
    if waitForConnection {
      // Connected is enough: a plugin may legitimately exit soon after (exit-after:N).
      waitForStatus(timeout: 10) { $0.plugins.contains { $0.connectedPID == plugin.pid } || !plugin.isRunning }
      guard (try? status())?.plugins.contains(where: { $0.connectedPID == plugin.pid }) == true else {
        throw HarnessError("plugin \(name) did not connect: \(plugin.status.map { "\($0)" } ?? "timed out"); stderr: \(plugin.stderr)\nbroker log:\n\(tail(brokerLog, lines: 20))")
      }
    }
    return plugin
  }

  /// Starts `broker-fixture client SCENARIO MIB THREADS PLUGIN [LOOPS]`, with `extraEnvironment` added,
  /// as `user` (nil: the harness's user).
  func startClient(_ scenario: String, mib: Int, threads: Int, plugin: String, loops: Int? = nil, extraEnvironment: [String: String] = [:],
                   user: UInt32? = nil) throws -> FixtureProcess {
    let label = nextLabel("client-\(scenario)")
    var arguments = ["client", scenario, "\(mib)", "\(threads)", plugin]
    if let loops { arguments.append("\(loops)") }
    let client = try spawn(
      label: label, executable: Self.fixtureExecutable, arguments: arguments, environment: environment.merging(extraEnvironment) { $1 },
      stdoutPath: "\(directory)/\(label).stdout", stderrPath: "\(directory)/\(label).stderr", user: user ?? self.user)
    children.append(client)
    return client
  }

  /// Starts `broker-fixture ARGUMENTS...` (a role other than plugin or client).
  func startFixture(_ arguments: [String]) throws -> FixtureProcess {
    let label = nextLabel(arguments[0])
    let process = try spawn(label: label, executable: Self.fixtureExecutable, arguments: arguments, environment: environment,
                            stdoutPath: "\(directory)/\(label).stdout", stderrPath: "\(directory)/\(label).stderr")
    children.append(process)
    return process
  }

  struct ClientOutcome {
    /// nil: it timed out (and was killed; an issue was recorded).
    var status: ExitStatus?
    var stdout: String
    var stderr: String
    var pid: pid_t
    /// The last line of stdout: what the client checked.
    var summary: String { stdout.split(separator: "\n").last.map(String.init) ?? "" }
  }

  /// Runs a fixture client to its end (killing it after `timeout` seconds).
  func runClient(_ scenario: String, mib: Int, threads: Int, plugin: String, loops: Int? = nil, timeout: Double = 30, extraEnvironment: [String: String] = [:],
                 user: UInt32? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> ClientOutcome {
    let client = try startClient(scenario, mib: mib, threads: threads, plugin: plugin, loops: loops, extraEnvironment: extraEnvironment, user: user)
    let status = client.wait(timeout: timeout, sourceLocation: sourceLocation)
    if status == nil { keepDirectory = true }
    return ClientOutcome(status: status, stdout: client.stdout, stderr: client.stderr, pid: client.pid)
  }

  // MARK: - Status, logs and descriptors

  /// What the broker says it is doing (`uffd-broker status`): the tests'
  /// view of its counters and connections. Its log is for people.
  func status() throws -> BrokerStatus {
    try ControlChannel.status(socketPath: controlSocket, brokerUID: user)
  }

  /// Polls the status until `condition` holds (true) or `timeout` passes (false).
  @discardableResult
  func waitForStatus(timeout: Double = 5, _ condition: (BrokerStatus) -> Bool) -> Bool {
    waitUntil(timeout: timeout) { (try? status()).map(condition) ?? false }
  }

  /// Waits until the broker has handled every packet `plugin` sent (true), or `timeout` passes.
  @discardableResult
  func waitUntilHandled(_ plugin: ManualPlugin, timeout: Double = 5) -> Bool {
    waitForStatus(timeout: timeout) { $0.plugin(plugin.name)?.packetsApplied == plugin.packetsSent }
  }

  var brokerLog: String { readTextFile(brokerLogPath) }

  func eventLogPath(_ plugin: String) -> String { "\(directory)/events-\(plugin).log" }

  /// The fixture plugin's event log (all its incarnations), one event per line.
  func eventLog(_ plugin: String) -> [String] {
    readTextFile(eventLogPath(plugin)).split(separator: "\n").map(String.init)
  }

  /// Open descriptors of the broker process.
  func brokerDescriptorCount() -> Int { descriptorCount(pid: broker.pid) }

  /// Polls until the broker's descriptor count is `expected` (true) or `timeout` passes (false).
  func waitForBrokerDescriptors(_ expected: Int, timeout: Double = 5) -> Bool {
    waitUntil(timeout: timeout, interval: 0.02) { brokerDescriptorCount() == expected }
  }
}

/// Entries of /proc/PID/fd (-1 if unreadable).
func descriptorCount(pid: pid_t) -> Int {
  guard let dir = opendir("/proc/\(pid)/fd") else { return -1 }
  defer { closedir(dir) }
  var count = 0
  while let entry = readdir(dir) {
    let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    if name != "." && name != ".." { count += 1 }
  }
  return count
}

func tail(_ text: String, lines: Int) -> String {
  text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
}

/// `text` as a JSON string literal (for the config files tests write).
func jsonString(_ text: String) -> String {
  String(decoding: (try? JSONEncoder().encode(text)) ?? Data("\"\"".utf8), as: UTF8.self)
}

func writeTextFile(_ path: String, _ text: String) throws {
  guard let file = fopen(path, "w") else { throw HarnessError("cannot write \(path): \(errno)") }
  defer { fclose(file) }
  fputs(text, file)
}

/// rm -r of a directory of plain files and sockets (no subdirectories are made).
func removeDirectory(_ path: String) {
  guard let dir = opendir(path) else { return }
  while let entry = readdir(dir) {
    let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    if name != "." && name != ".." { unlink("\(path)/\(name)") }
  }
  closedir(dir)
  rmdir(path)
}

/// Who a root broker runs a spawned plugin as when its config names no user:
/// `uffd-plugin` where the system has it (scripts/install.sh creates it), else `nobody`.
let defaultPluginUser: (uid: UInt32, gid: UInt32) = {
  for name in ["uffd-plugin", "nobody"] {
    if let entry = getpwnam(name) { return (entry.pointee.pw_uid, entry.pointee.pw_gid) }
  }
  return (65534, 65534)
}()
