import CUserfaultfd
import Glibc
import Synchronization
import Userfaultfd

struct BenchError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// A child role of this executable (the file /proc/self/exe points to),
/// spawned with posix_spawn, its control socket on fd 3.
final class ChildProcess {
  let label: String
  let pid: pid_t
  /// The bench's end of the control socket (-1 once closed).
  private(set) var control: CInt
  private var reaped = false

  private init(label: String, pid: pid_t, control: CInt) {
    self.label = label
    self.pid = pid
    self.control = control
  }

  /// Starts `uffd-bench <arguments>` and waits for its ready byte.
  static func spawn(label: String, arguments: [String], readyTimeoutMilliseconds: Int32 = 15_000) throws(BenchError) -> ChildProcess {
    var pair: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
      throw BenchError("socketpair failed: errno \(errno)")
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    // dup2 onto 3 clears close-on-exec there; the bench's end stays close-on-exec,
    // so only this child holds the other end and sees end-of-stream when the bench goes.
    posix_spawn_file_actions_adddup2(&actions, pair[1], 3)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var none = sigset_t()
    sigemptyset(&none)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for signal in [SIGINT, SIGTERM, SIGPIPE] { sigaddset(&defaults, signal) }
    posix_spawnattr_setsigmask(&attributes, &none)
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

    let argv = (["uffd-bench"] + arguments).map { strdup($0) } + [nil]
    let environment = Self.environment().map { strdup($0) } + [nil]
    defer {
      argv.forEach { free($0) }
      environment.forEach { free($0) }
    }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, executablePath, &actions, &attributes, argv, environment)
    close(pair[1])
    guard rc == 0 else {
      close(pair[0])
      throw BenchError("cannot spawn the \(label) role: posix_spawn errno \(rc)")
    }
    let child = ChildProcess(label: label, pid: pid, control: pair[0])
    var byte: UInt8 = 0
    guard child.receive(&byte, count: 1, timeoutMilliseconds: readyTimeoutMilliseconds) == 1, byte == UInt8(ascii: "R") else {
      child.terminate()
      throw BenchError("the \(label) role did not become ready (see its messages above)")
    }
    return child
  }

  /// This executable, resolved (spawning "/proc/self/exe" itself would name every child "exe" in ps and perf).
  private static let executablePath: String = {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    return count > 0 ? String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "/proc/self/exe"
  }()

  /// This process's environment, for the child (reading `environ` is not concurrency-safe in Swift 6).
  private static func environment() -> [String] {
    guard let file = fopen("/proc/self/environ", "r") else { return [] }
    defer { fclose(file) }
    var entries: [String] = []
    var current: [UInt8] = []
    while true {
      let c = getc(file)
      if c == EOF { break }
      if c == 0 {
        entries.append(String(decoding: current, as: UTF8.self))
        current.removeAll(keepingCapacity: true)
      } else {
        current.append(UInt8(c))
      }
    }
    return entries
  }

  /// Asks the child for its counters.
  func stats() throws(BenchError) -> ChildStats {
    var request = UInt8(ascii: "S")
    guard control >= 0, send(control, &request, 1, CInt(MSG_NOSIGNAL)) == 1 else {
      throw BenchError("the \(label) role is gone (cannot send to its control socket)")
    }
    var stats = ChildStats()
    let size = MemoryLayout<ChildStats>.size
    let received = withUnsafeMutableBytes(of: &stats) { receive($0.baseAddress!, count: size, timeoutMilliseconds: 10_000) }
    guard received == size else { throw BenchError("the \(label) role did not report its counters") }
    return stats
  }

  private func receive(_ buffer: UnsafeMutableRawPointer, count: Int, timeoutMilliseconds: Int32) -> Int {
    var descriptor = pollfd(fd: control, events: Int16(POLLIN), revents: 0)
    let deadline = monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
    while true {
      let now = monotonicNanoseconds()
      guard now < deadline else { return -1 }
      let ready = poll(&descriptor, 1, Int32((deadline - now) / 1_000_000) + 1)
      if ready < 0 && errno == EINTR { continue }
      guard ready > 0 else { return -1 }
      let received = recv(control, buffer, count, 0)
      if received < 0 && errno == EINTR { continue }
      return received
    }
  }

  /// Closes the control socket (the child stops on end of stream), then
  /// SIGTERM, a grace period, SIGKILL; always reaps it.
  func terminate(graceMilliseconds: Int = 3_000) {
    if control >= 0 {
      close(control)
      control = -1
    }
    guard !reaped else { return }
    var status: CInt = 0
    kill(pid, SIGTERM)
    for _ in 0..<max(graceMilliseconds / 5, 1) {
      if waitpid(pid, &status, WNOHANG) != 0 {
        reaped = true
        return
      }
      usleep(5_000)
    }
    kill(pid, SIGKILL)
    waitpid(pid, &status, 0)
    reaped = true
  }
}

/// The broker and plugin processes of a run: started once, shared by every
/// round, torn down explicitly at the end (and on failure).
final class BenchProcesses {
  let directory: String
  let clientSocket: String
  let pluginSocket: String
  let broker: ChildProcess
  private(set) var plugins: [String: ChildProcess] = [:]

  var all: [ChildProcess] { [broker] + plugins.keys.sorted().compactMap { plugins[$0] } }

  /// Starts the broker, then each plugin (they connect to it and say Hello before reporting ready).
  init(plugins instances: [PluginInstance]) throws(BenchError) {
    var template = Array("/tmp/uffd-bench.XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw BenchError("mkdtemp failed: errno \(errno)") }
    directory = String(cString: made)
    clientSocket = directory + "/client.sock"
    pluginSocket = directory + "/plugin.sock"
    do {
      broker = try ChildProcess.spawn(label: "broker", arguments: ["--role", "broker", "--client-socket", clientSocket, "--plugin-socket", pluginSocket])
    } catch {
      rmdir(directory)
      throw error
    }
    do {
      for instance in instances {
        plugins[instance.name] = try ChildProcess.spawn(
          label: "plugin \(instance.name)",
          arguments: ["--role", "plugin", "--name", instance.name, "--mode", instance.kind.rawValue, "--plugin-socket", pluginSocket])
      }
    } catch {
      shutdown()
      throw error
    }
  }

  /// The summed counters of the named plugins.
  func pluginStats(_ names: [String]) throws(BenchError) -> ChildStats {
    var total = ChildStats()
    for name in names {
      guard let plugin = plugins[name] else { throw BenchError("plugin \(name) was not started") }
      total = total + (try plugin.stats())
    }
    return total
  }

  /// Broker first: its shutdown closes the plugins' connections, and they exit.
  func shutdown() {
    broker.terminate()
    for child in plugins.values { child.terminate() }
    unlink(clientSocket)
    unlink(pluginSocket)
    rmdir(directory)
  }
}

/// Fails the run instead of hanging: a thread that wakes every 100 ms and
/// exits the process (killing the children) if a child died or a round
/// outlived its deadline. It allocates nothing, so the round's malloc count is untouched.
final class Watchdog: Sendable {
  private let deadline = Atomic<UInt64>(0)
  private let stopping = Atomic<Bool>(false)
  private let controls: [CInt]
  private let pids: [pid_t]
  private let labels: [String]
  /// Removed (files, then the directory) before exiting on failure.
  private let leftovers: [String]
  private let thread = Mutex<pthread_t?>(nil)

  /// A signalfd for SIGINT/SIGTERM (blocked in every thread), or -1.
  private let signals: CInt

  init(processes: BenchProcesses?, signals: CInt) {
    self.signals = signals
    let children = processes?.all ?? []
    controls = children.map(\.control)
    pids = children.map(\.pid)
    labels = children.map(\.label)
    leftovers = processes.map { [$0.clientSocket, $0.pluginSocket, $0.directory] } ?? []
    let handle = spawnThread { [self] in watch() }
    thread.withLock { $0 = handle }
  }

  /// Fails the run if `disarm` is not called within `seconds`.
  func arm(seconds: UInt64) {
    deadline.store(monotonicNanoseconds() + seconds * 1_000_000_000, ordering: .relaxed)
  }

  func disarm() { deadline.store(0, ordering: .relaxed) }

  func stop() {
    stopping.store(true, ordering: .relaxed)
    if let handle = thread.withLock({ $0.take() }) { pthread_join(handle, nil) }
  }

  private func watch() {
    let count = controls.count
    let descriptors = UnsafeMutablePointer<pollfd>.allocate(capacity: count + 1)
    defer { descriptors.deallocate() }
    while !stopping.load(ordering: .relaxed) {
      // Only hang-ups are asked for on the control sockets (events 0): the main thread owns their data.
      for index in 0..<count { descriptors[index] = pollfd(fd: controls[index], events: 0, revents: 0) }
      descriptors[count] = pollfd(fd: signals, events: Int16(POLLIN), revents: 0)  // fd -1 is ignored by poll
      let ready = poll(descriptors, nfds_t(count + 1), 100)
      if stopping.load(ordering: .relaxed) { return }
      if ready > 0 {
        for index in 0..<count where descriptors[index].revents & Int16(POLLHUP | POLLERR) != 0 {
          die("the \(labels[index]) process (pid \(pids[index])) exited unexpectedly")
        }
        if descriptors[count].revents != 0 { die("interrupted by signal \(cuffd_read_signal(signals))") }
      }
      let due = deadline.load(ordering: .relaxed)
      if due != 0 && monotonicNanoseconds() > due { die("a round did not finish within its deadline (a fault was never resolved?)") }
    }
  }

  private func die(_ message: String) -> Never {
    let line = "uffd-bench: FAILED: \(message)\n"
    _ = line.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
    for pid in pids { kill(pid, SIGKILL) }
    for path in leftovers { _ = unlink(path) == 0 || rmdir(path) == 0 }
    _exit(1)
  }
}
