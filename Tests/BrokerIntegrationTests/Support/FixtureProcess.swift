import ChildProcess
import Glibc
import Testing

/// How a child process ended.
typealias ExitStatus = ChildProcess.Status

/// Monotonic seconds, for deadlines.
func now() -> Double {
  var spec = timespec()
  clock_gettime(CLOCK_MONOTONIC, &spec)
  return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
}

/// Polls `condition` every `interval` seconds until it holds or `timeout` passes.
@discardableResult
func waitUntil(timeout: Double, interval: Double = 0.01, _ condition: () -> Bool) -> Bool {
  let deadline = now() + timeout
  while true {
    if condition() { return true }
    if now() >= deadline { return false }
    usleep(useconds_t(interval * 1e6))
  }
}

/// A child process of a test (the project's `ChildProcess`): stdin from
/// /dev/null, stdout and stderr to files, its own process group (so a teardown
/// can reach whatever it spawned). Killed and reaped on deinit if still alive.
final class FixtureProcess {
  let label: String
  let stdoutPath: String
  let stderrPath: String
  private let process: ChildProcess

  var pid: pid_t { process.pid }
  var status: ExitStatus? { process.poll() }

  /// - Parameter appendOutput: append to the output files instead of truncating them (a restarted process).
  /// - Parameter descriptors: descriptors of the test's that become the process's 3, 4, ...
  init(label: String, executable: String, arguments: [String], environment: [String: String], stdoutPath: String, stderrPath: String, appendOutput: Bool = false,
       descriptors: [CInt] = []) throws {
    self.label = label
    self.stdoutPath = stdoutPath
    self.stderrPath = stderrPath
    do {
      process = try ChildProcess(executable, arguments, environment: environment, options: .init(
        stdin: "/dev/null", stdout: stdoutPath, stderr: stderrPath, truncate: !appendOutput, descriptors: descriptors, newProcessGroup: true))
    } catch {
      throw HarnessError("\(error)")
    }
  }

  deinit { process.terminate(signal: SIGKILL, graceMilliseconds: 1000) }

  /// The exit status if the process has ended (reaping it), else nil.
  @discardableResult
  func poll() -> ExitStatus? { process.poll() }

  var isRunning: Bool { poll() == nil }

  /// Waits until one of `processes` ends (its pidfd is readable) or `timeout`
  /// seconds pass; reaps nothing (`poll()` does).
  static func waitForAnyExit(_ processes: [FixtureProcess], timeout: Double) {
    var entries = processes.map { pollfd(fd: $0.process.pidfd, events: Int16(POLLIN), revents: 0) }
    _ = Glibc.poll(&entries, nfds_t(entries.count), Int32(timeout * 1000))
  }

  /// Waits up to `timeout` seconds. On timeout the process is killed with
  /// SIGKILL (and reaped), the test gets an issue, and nil is returned.
  func wait(timeout: Double, sourceLocation: SourceLocation = #_sourceLocation) -> ExitStatus? {
    if let status = process.wait(timeoutMilliseconds: Int(timeout * 1000)) { return status }
    process.terminate(signal: SIGKILL, graceMilliseconds: 1000)
    Issue.record("\(label) (pid \(pid)) did not exit within \(timeout) s; killed. stdout: \(stdout) stderr: \(stderr)", sourceLocation: sourceLocation)
    return nil
  }

  /// SIGTERM, up to `grace` seconds, then SIGKILL. Returns how it ended.
  @discardableResult
  func stop(grace: Double = 3) -> ExitStatus { process.terminate(graceMilliseconds: Int(grace * 1000)) }

  var stdout: String { readTextFile(stdoutPath) }
  var stderr: String { readTextFile(stderrPath) }
}

struct HarnessError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// The whole file as UTF-8 text ("" if it does not exist).
func readTextFile(_ path: String) -> String {
  guard let file = fopen(path, "r") else { return "" }
  defer { fclose(file) }
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 65536)
  while true {
    let n = fread(&chunk, 1, chunk.count, file)
    if n <= 0 { break }
    bytes.append(contentsOf: chunk[..<n])
  }
  return String(decoding: bytes, as: UTF8.self)
}

/// A handshake with a fixture client through two FIFOs: the client writes a
/// line to `ready` when it reaches a step (`FixtureClient.gate`), then waits
/// until the test opens `go`. Pass `environment` to the client.
struct Gate {
  let ready: String
  let go: String
  var environment: [String: String] { ["FIXTURE_READY": ready, "FIXTURE_GO": go] }
  /// The same, for a client the test restarts the broker under: past the gate it waits for its re-attach.
  var reattaching: [String: String] { environment.merging(["FIXTURE_REATTACH": "1"]) { $1 } }

  init(in directory: String) throws {
    ready = directory + "/gate-ready"
    go = directory + "/gate-go"
    guard mkfifo(ready, 0o600) == 0, mkfifo(go, 0o600) == 0 else { throw HarnessError("mkfifo failed: \(errno)") }
  }

  /// The step the client reached, or nil if it did not within `timeout` seconds.
  func awaitClient(timeout: Double = 20) -> String? {
    let fd = open(ready, O_RDONLY | O_NONBLOCK)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var text = ""
    let deadline = now() + timeout
    while now() < deadline {
      var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
      guard poll(&poller, 1, 100) >= 0 else { return nil }
      var buffer = [UInt8](repeating: 0, count: 256)
      let n = read(fd, &buffer, buffer.count)
      if n > 0 { text += String(decoding: buffer[..<n], as: UTF8.self) }
      if text.hasSuffix("\n") { return String(text.dropLast()) }
    }
    return nil
  }

  /// Lets the client go on.
  func release() {
    let fd = open(go, O_WRONLY | O_NONBLOCK)
    if fd >= 0 {
      _ = write(fd, "go\n", 3)
      close(fd)
    }
  }
}
