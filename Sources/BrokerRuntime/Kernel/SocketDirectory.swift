import BrokerProtocol
import Glibc

/// The directory a broker socket lies in, made the broker's own before it
/// binds there: whoever can write to the directory, or to one above it, can
/// remove the broker's socket and put a listener of their own in its place.
///
/// 1. A missing directory is created (`mode`, as the umask allows); its parent must exist.
/// 2. The directory itself (not followed if a symlink: that is refused) must be
///    owned by the broker's uid or root and writable by no one else (group or other).
/// 3. Each directory above it must be owned by the broker's uid or root, and
///    writable by no one else unless sticky (as `/tmp` is: others cannot rename or
///    remove what is not theirs there): those the path names (from `/`, for a
///    relative one too) and those it really goes through (symbolic links resolved).
/// Otherwise `prepare` throws `notAuthorized`, naming the path, its owner and mode.
enum SocketDirectory {
  static func prepare(forSocketAt socketPath: String, mode: mode_t) throws(BrokerError) {
    let directory = parent(of: socketPath)
    if mkdir(directory, mode) != 0 && errno != EEXIST {
      let error = errno
      throw BrokerError(.io, "cannot create the socket directory \(directory)", errno: .init(rawValue: error))
    }
    let me = geteuid()
    var info = stat()
    guard lstat(directory, &info) == 0 else {
      throw BrokerError(.io, "cannot inspect the socket directory \(directory)", errno: .init(rawValue: errno))
    }
    guard info.st_mode & S_IFMT == S_IFDIR else {
      let what = info.st_mode & S_IFMT == S_IFLNK ? "a symbolic link" : "not a directory"
      throw BrokerError(.notAuthorized, "the socket directory \(directory) is \(what); refusing to serve there")
    }
    try check(directory, info, me: me, allowSticky: false, role: "the socket directory")
    let named = directory.hasPrefix("/") ? directory : currentDirectory() + "/" + directory
    try checkChain(from: parent(of: named), me: me)
    guard let resolved = realpath(parent(of: named), nil) else {
      throw BrokerError(.io, "cannot resolve the directory above \(directory)", errno: .init(rawValue: errno))
    }
    defer { free(resolved) }
    try checkChain(from: String(cString: resolved), me: me)
  }

  /// Checks `directory` and every one above it, up to `/`.
  private static func checkChain(from directory: String, me: uid_t) throws(BrokerError) {
    var info = stat()
    var above = directory
    while true {
      guard stat(above, &info) == 0 else {
        throw BrokerError(.io, "cannot inspect \(above), above the socket directory", errno: .init(rawValue: errno))
      }
      try check(above, info, me: me, allowSticky: true, role: "above the socket directory,")
      if above == "/" { return }
      above = parent(of: above)
    }
  }

  private static func currentDirectory() -> String {
    guard let cwd = getcwd(nil, 0) else { return "/" }
    defer { free(cwd) }
    return String(cString: cwd)
  }

  private static func check(_ path: String, _ info: stat, me: uid_t, allowSticky: Bool, role: String) throws(BrokerError) {
    let mode = info.st_mode & 0o7777
    let owned = info.st_uid == me || info.st_uid == 0
    let othersWrite = mode & 0o022 != 0 && !(allowSticky && mode & S_ISVTX != 0)
    guard owned && !othersWrite else {
      let problem = owned ? "is writable by others" : "is owned by neither the broker's uid (\(me)) nor root"
      throw BrokerError(.notAuthorized, """
        \(role) \(path) (owner uid \(info.st_uid), mode \(String(mode, radix: 8))) \(problem): another user could replace \
        the broker's sockets there; refusing to serve (use a directory only the broker's user or root can write)
        """)
    }
  }

  /// The directory part of `path`: "/" for "/x", "." for a bare name.
  private static func parent(of path: String) -> String {
    var trimmed = Substring(path)
    while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
    guard let slash = trimmed.lastIndex(of: "/") else { return "." }
    return slash == trimmed.startIndex ? "/" : String(trimmed[..<slash])
  }
}
