import Glibc
import Testing

/// How a child process ended.
enum ExitStatus: Equatable, CustomStringConvertible {
  case exited(Int32)
  case signaled(Int32)

  init(waitStatus status: Int32) {
    // WIFEXITED / WEXITSTATUS / WTERMSIG (the macros do not import).
    if status & 0x7f == 0 {
      self = .exited((status >> 8) & 0xff)
    } else {
      self = .signaled(status & 0x7f)
    }
  }

  var description: String {
    switch self {
    case .exited(let code): "exited(\(code))"
    case .signaled(let signal): "signaled(\(signal))"
    }
  }
}

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

/// A child process started with posix_spawn: stdin from /dev/null, stdout and
/// stderr to files, its own process group (so a teardown can reach whatever
/// it spawned), default signal dispositions and an empty signal mask.
/// Reaped by `poll`/`wait`/`stop`; killed with SIGKILL on deinit if still alive.
final class FixtureProcess {
  let label: String
  let pid: pid_t
  let stdoutPath: String
  let stderrPath: String
  private(set) var status: ExitStatus?

  /// - Parameter appendOutput: append to the output files instead of truncating them (a restarted process).
  init(label: String, executable: String, arguments: [String], environment: [String: String], stdoutPath: String, stderrPath: String, appendOutput: Bool = false) throws {
    self.label = label
    self.stdoutPath = stdoutPath
    self.stderrPath = stderrPath

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    let mode = O_WRONLY | O_CREAT | (appendOutput ? O_APPEND : O_TRUNC)
    posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, mode, 0o644)
    posix_spawn_file_actions_addopen(&actions, 2, stderrPath, mode, 0o644)

    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var none = sigset_t()
    sigemptyset(&none)
    posix_spawnattr_setsigmask(&attributes, &none)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for signal in [SIGINT, SIGTERM, SIGPIPE, SIGCHLD, SIGHUP, SIGQUIT] { sigaddset(&defaults, signal) }
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    posix_spawnattr_setpgroup(&attributes, 0)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))

    // The environment: ours, with the overrides.
    var merged: [String: String] = [:]
    var cursor = environ
    while let entry = cursor.pointee {
      let text = String(cString: entry)
      if let equals = text.firstIndex(of: "=") { merged[String(text[..<equals])] = String(text[text.index(after: equals)...]) }
      cursor += 1
    }
    for (key, value) in environment { merged[key] = value }

    let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
      argv.forEach { free($0) }
      envp.forEach { free($0) }
    }
    var child: pid_t = 0
    let rc = posix_spawn(&child, executable, &actions, &attributes, argv, envp)
    guard rc == 0 else { throw HarnessError("posix_spawn \(executable) failed: \(String(cString: strerror(rc)))") }
    pid = child
  }

  deinit {
    if status == nil {
      kill(pid, SIGKILL)
      var raw: Int32 = 0
      waitpid(pid, &raw, 0)
    }
  }

  /// The exit status if the process has ended (reaping it), else nil.
  @discardableResult
  func poll() -> ExitStatus? {
    if let status { return status }
    var raw: Int32 = 0
    let rc = waitpid(pid, &raw, WNOHANG)
    if rc == pid { status = ExitStatus(waitStatus: raw) }
    return status
  }

  var isRunning: Bool { poll() == nil }

  /// Waits up to `timeout` seconds. On timeout the process is killed with
  /// SIGKILL (and reaped), the test gets an issue, and nil is returned.
  func wait(timeout: Double, sourceLocation: SourceLocation = #_sourceLocation) -> ExitStatus? {
    if waitUntil(timeout: timeout, interval: 0.005, { poll() != nil }) { return status }
    kill(pid, SIGKILL)
    var raw: Int32 = 0
    waitpid(pid, &raw, 0)
    status = ExitStatus(waitStatus: raw)
    Issue.record("\(label) (pid \(pid)) did not exit within \(timeout) s; killed. stdout: \(stdout) stderr: \(stderr)", sourceLocation: sourceLocation)
    return nil
  }

  /// SIGTERM, up to `grace` seconds, then SIGKILL. Returns how it ended.
  @discardableResult
  func stop(grace: Double = 3) -> ExitStatus {
    if let status = poll() { return status }
    kill(pid, SIGTERM)
    if !waitUntil(timeout: grace, interval: 0.005, { poll() != nil }) {
      kill(pid, SIGKILL)
      var raw: Int32 = 0
      waitpid(pid, &raw, 0)
      status = ExitStatus(waitStatus: raw)
    }
    return status!
  }

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
