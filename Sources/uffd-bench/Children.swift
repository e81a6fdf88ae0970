import CLinux
import ChildProcess
import Glibc
import LinuxSupport
import Synchronization

struct BenchError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// A child role of this executable, its control socket on fd 3.
final class RoleProcess {
  let label: String
  private let process: ChildProcess
  /// The bench's end of the control socket (-1 once closed).
  private(set) var control: CInt

  var pid: pid_t { process.pid }

  private init(label: String, process: ChildProcess, control: CInt) {
    self.label = label
    self.process = process
    self.control = control
  }

  /// Starts `uffd-bench <arguments>` and waits for its ready byte.
  static func spawn(label: String, arguments: [String], readyTimeoutMilliseconds: Int32 = 15_000) throws(BenchError) -> RoleProcess {
    var pair: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
      throw BenchError("socketpair failed: errno \(errno)")
    }
    // Our end stays close-on-exec: only the child holds the other, and sees
    // end-of-stream when the bench goes away.
    defer { close(pair[1]) }
    let process: ChildProcess
    do {
      process = try ChildProcess(ChildProcess.currentExecutable, arguments, options: .init(descriptors: [pair[1]]))
    } catch {
      close(pair[0])
      throw BenchError("cannot spawn the \(label) role: \(error)")
    }
    let child = RoleProcess(label: label, process: process, control: pair[0])
    var byte: UInt8 = 0
    guard child.receive(&byte, count: 1, timeoutMilliseconds: readyTimeoutMilliseconds) == 1, byte == UInt8(ascii: "R") else {
      child.terminate()
      throw BenchError("the \(label) role did not become ready (see its messages above)")
    }
    return child
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
    process.terminate(graceMilliseconds: graceMilliseconds)
  }
}

/// The broker and plugin processes of a run: started once, shared by every
/// round, torn down explicitly at the end (and on failure).
final class BenchProcesses {
  let directory: String
  let clientSocket: String
  let pluginSocket: String
  let broker: RoleProcess
  private(set) var plugins: [String: RoleProcess] = [:]

  var all: [RoleProcess] { [broker] + plugins.keys.sorted().compactMap { plugins[$0] } }

  /// Starts the broker, then each plugin (they connect to it and say Hello before reporting ready).
  init(plugins instances: [PluginInstance]) throws(BenchError) {
    var template = Array("/tmp/uffd-bench.XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw BenchError("mkdtemp failed: errno \(errno)") }
    directory = String(cString: made)
    clientSocket = directory + "/client.sock"
    pluginSocket = directory + "/plugin.sock"
    do {
      broker = try RoleProcess.spawn(label: "broker", arguments: ["--role", "broker", "--client-socket", clientSocket, "--plugin-socket", pluginSocket])
    } catch {
      rmdir(directory)
      throw error
    }
    do {
      for instance in instances {
        plugins[instance.name] = try RoleProcess.spawn(
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

  /// Waits (up to 250 ms) until the broker's malloc count holds still for 5 ms:
  /// the previous round's clients are closed asynchronously (unmap events,
  /// socket close, Closed to the plugins), and that work belongs to no window.
  func settle() throws(BenchError) {
    var last = try broker.stats().mallocCalls
    for _ in 0..<50 {
      usleep(5_000)
      let now = try broker.stats().mallocCalls
      if now == last { return }
      last = now
    }
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
  /// The first `roleCount` descriptors are control sockets, the rest pidfds.
  private let roleCount: Int
  /// Removed (files, then the directory) before exiting on failure.
  private let leftovers: [String]
  private let thread = Mutex<pthread_t?>(nil)

  /// A signalfd for SIGINT/SIGTERM (blocked in every thread), or -1.
  private let signals: CInt

  /// Watches the roles of `processes` (their control sockets) and `others`
  /// (processes of other executables, by pidfd: readable once they exit).
  init(processes: BenchProcesses?, others: [(label: String, process: ChildProcess)] = [], signals: CInt) {
    self.signals = signals
    let children = processes?.all ?? []
    controls = children.map(\.control) + others.map(\.process.pidfd)
    pids = children.map(\.pid) + others.map(\.process.pid)
    labels = children.map(\.label) + others.map(\.label)
    roleCount = children.count
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
      // A pidfd turns readable when its process exits.
      for index in 0..<count { descriptors[index] = pollfd(fd: controls[index], events: index < roleCount ? 0 : Int16(POLLIN), revents: 0) }
      descriptors[count] = pollfd(fd: signals, events: Int16(POLLIN), revents: 0)  // fd -1 is ignored by poll
      let ready = poll(descriptors, nfds_t(count + 1), 100)
      if stopping.load(ordering: .relaxed) { return }
      if ready > 0 {
        for index in 0..<count where descriptors[index].revents & Int16(POLLHUP | POLLERR | POLLIN) != 0 {
          die("the \(labels[index]) process (pid \(pids[index])) exited unexpectedly")
        }
        if descriptors[count].revents != 0 { die("interrupted by signal \(clinux_read_signal(signals))") }
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
