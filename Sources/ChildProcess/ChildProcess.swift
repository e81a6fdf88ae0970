import CLinux
import Glibc
import LinuxSupport

/// A child process, spawned and torn down explicitly: `terminate()` sends
/// SIGTERM, waits, then SIGKILLs, and always reaps. Used by the broker's
/// plugin supervisor, the demo, the benchmark and the integration tests.
public final class ChildProcess {
  public enum Status: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    init(_ raw: CInt) {
      self = raw & 0x7F == 0 ? .exited((raw >> 8) & 0xFF) : .signaled(raw & 0x7F)
    }

    public var description: String {
      switch self {
      case .exited(let code): return "exit \(code)"
      case .signaled(let signal): return "signal \(signal)"
      }
    }
  }

  public struct SpawnError: Error, CustomStringConvertible {
    public var executable: String
    public var errno: CInt
    public var description: String { "cannot start \(executable): \(String(cString: strerror(errno)))" }
  }

  /// Who a child runs as: set in the child after its descriptors are opened
  /// and before exec (supplementary groups, then gid, then uid: real,
  /// effective and saved), so nothing of the parent's privileges crosses.
  public struct Credentials: Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups (empty: none).
    public var groups: [UInt32]
    public init(uid: UInt32, gid: UInt32, groups: [UInt32] = []) {
      self.uid = uid
      self.gid = gid
      self.groups = groups
    }
  }

  /// Where the child's descriptors come from.
  public struct Options: Sendable {
    public var stdin: String?
    public var stdout: String?
    public var stderr: String?
    /// Truncate the stdout/stderr files (default: append).
    public var truncate = false
    /// Descriptors of ours that become the child's fds 3, 4, ... in this order
    /// (a control socket, say, or listening sockets handed over as systemd
    /// does); at most 16. They stay open here.
    public var descriptors: [CInt]
    /// The child leads a process group of its own (kill(-pid) reaches its children too).
    public var newProcessGroup = false
    /// Run the child as another user (nil: as this process). Needs
    /// CAP_SETUID/CAP_SETGID unless they are this process's own.
    public var credentials: Credentials?
    /// Set `PR_SET_NO_NEW_PRIVS` in the child: no exec (setuid binaries, file
    /// capabilities) can ever give it privileges it did not start with.
    public var noNewPrivileges = false
    public init(stdin: String? = nil, stdout: String? = nil, stderr: String? = nil, truncate: Bool = false, descriptors: [CInt] = [], newProcessGroup: Bool = false,
                credentials: Credentials? = nil, noNewPrivileges: Bool = false) {
      self.stdin = stdin
      self.stdout = stdout
      self.stderr = stderr
      self.truncate = truncate
      self.descriptors = descriptors
      self.newProcessGroup = newProcessGroup
      self.credentials = credentials
      self.noNewPrivileges = noNewPrivileges
    }
  }

  public let pid: pid_t
  /// Readable once the child exits (poll it, or hand it to an epoll loop).
  public let pidfd: CInt
  public let executable: String
  public private(set) var status: Status?

  /// Starts `executable` with `arguments`, this process's environment plus
  /// `environment`, and stdout/stderr appended to files if given.
  public convenience init(_ executable: String, _ arguments: [String] = [], environment: [String: String] = [:], stdout: String? = nil, stderr: String? = nil) throws(SpawnError) {
    try self.init(executable, arguments, environment: environment, options: Options(stdout: stdout, stderr: stderr))
  }

  /// Starts `executable` with `arguments` (argv[0] is the executable), this
  /// process's environment plus `environment`, descriptors as `options` say.
  public init(_ executable: String, _ arguments: [String] = [], environment: [String: String] = [:], options: Options) throws(SpawnError) {
    var variables: [String] = []
    var cursor = environ
    while let entry = cursor.pointee {
      let text = String(cString: entry)
      if let name = text.split(separator: "=", maxSplits: 1).first, environment[String(name)] == nil { variables.append(text) }
      cursor += 1
    }
    variables += environment.map { "\($0.key)=\($0.value)" }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp = variables.map { strdup($0) } + [nil]
    defer {
      argv.forEach { free($0) }
      envp.forEach { free($0) }
    }
    let groups = options.credentials?.groups ?? []
    let pid = options.stdin.withOptionalCString { stdin in
      options.stdout.withOptionalCString { stdout in
        options.stderr.withOptionalCString { stderr in
          groups.withUnsafeBufferPointer { groups in options.descriptors.withUnsafeBufferPointer { descriptors in
            var spawn = clinux_spawn_options(
              stdin_path: stdin, stdout_path: stdout, stderr_path: stderr, truncate: options.truncate ? 1 : 0,
              descriptors: descriptors.baseAddress, ndescriptors: CInt(descriptors.count), new_process_group: options.newProcessGroup ? 1 : 0,
              set_credentials: options.credentials == nil ? 0 : 1, uid: options.credentials?.uid ?? 0, gid: options.credentials?.gid ?? 0,
              groups: groups.baseAddress, ngroups: CInt(groups.count), no_new_privs: options.noNewPrivileges ? 1 : 0)
            return clinux_spawn(executable, argv, envp, &spawn)
          } }
        }
      }
    }
    guard pid > 0 else { throw SpawnError(executable: executable, errno: -pid) }
    self.pid = pid
    self.pidfd = clinux_pidfd_open(pid)
    self.executable = executable
  }

  deinit {
    if status == nil { terminate(graceMilliseconds: 500) }
    closeDescriptor(pidfd)
  }

  /// Reaps the child if it has exited; nil while it runs.
  @discardableResult
  public func poll() -> Status? {
    if let status { return status }
    var raw: CInt = 0
    guard waitpid(pid, &raw, WNOHANG) == pid else { return nil }
    status = Status(raw)
    return status
  }

  /// Waits up to `timeoutMilliseconds` (-1: forever) for the child to exit.
  @discardableResult
  public func wait(timeoutMilliseconds: Int = -1) -> Status? {
    let deadline = timeoutMilliseconds < 0 ? UInt64.max : monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
    while poll() == nil {
      let now = monotonicNanoseconds()
      if now >= deadline { return nil }
      var fd = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
      let remaining = deadline == .max ? 1000 : CInt(min((deadline - now) / 1_000_000 + 1, 1000))
      _ = Glibc.poll(&fd, 1, pidfd >= 0 ? remaining : 10)
    }
    return status
  }

  /// Sends `signal` (default SIGTERM), waits up to `graceMilliseconds`, then
  /// SIGKILLs; returns how the child ended. Safe to call after it exited.
  @discardableResult
  public func terminate(signal: CInt = SIGTERM, graceMilliseconds: Int = 2000) -> Status {
    if let status = poll() { return status }
    kill(pid, signal)
    if let status = wait(timeoutMilliseconds: graceMilliseconds) { return status }
    kill(pid, SIGKILL)
    return wait()!
  }

  /// The path of this executable.
  public static var currentExecutable: String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    return count > 0 ? String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "/proc/self/exe"
  }

  /// The directory of this executable: where SwiftPM put its sibling products.
  public static var productsDirectory: String {
    let path = currentExecutable
    return String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
  }
}

extension Optional<String> {
  /// Calls `body` with a C string, or with nil.
  func withOptionalCString<Result>(_ body: (UnsafePointer<CChar>?) -> Result) -> Result {
    switch self {
    case .some(let text): return text.withCString { body($0) }
    case .none: return body(nil)
    }
  }
}
