import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport

/// Files a plugin opens because a client named them (a region's argument),
/// confined to configured directories and checked against the client's rights.
///
/// A plugin is a deputy: it acts for whichever client registered the region,
/// with privileges of its own that the client may not have. So a path from a
/// client is opened only:
/// 1. beneath one of `roots` (absolute directories, opened once, here): the
///    path must name a file under one, and is resolved with `openat2` from
///    that directory with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so neither
///    `..` nor a symlink anywhere on the way (planted by the client, say) leads
///    out of it;
/// 2. as a regular file (no FIFO, device or directory);
/// 3. if the client could read it itself (`PeerCredentials.checkMayRead`).
///
/// Every refusal throws `pluginRefused` with the reason, which the client's
/// Register reports. The plugin holds the descriptor it returns: a delegated
/// file is this descriptor, never a path the broker opens.
public final class ClientFiles {
  private struct Root {
    var path: String
    var fd: CInt
  }
  private let roots: [Root]

  /// Opens each of `roots` (absolute paths of directories). Throws naming the
  /// first that is not one. No roots: every path is refused.
  public init(roots: [String]) throws(BrokerError) {
    var opened: [Root] = []
    for path in roots {
      let trimmed = path.count > 1 && path.hasSuffix("/") ? String(path.dropLast()) : path
      guard trimmed.hasPrefix("/") else {
        opened.forEach { closeDescriptor($0.fd) }
        throw BrokerError(.malformed, "root \(path) is not an absolute path")
      }
      let fd = clinux_open_directory(trimmed)
      guard fd >= 0 else {
        let reason = String(cString: strerror(-fd))
        opened.forEach { closeDescriptor($0.fd) }
        throw BrokerError(.malformed, "root \(path) is not a directory this plugin can reach: \(reason)")
      }
      opened.append(Root(path: trimmed, fd: fd))
    }
    self.roots = opened
  }

  deinit { roots.forEach { closeDescriptor($0.fd) } }

  /// The directories paths are confined to.
  public var rootPaths: [String] { roots.map(\.path) }

  /// Opens `path` read-only for `client` (see the type's rules). Returns the
  /// descriptor (close-on-exec; the caller owns it), or throws `pluginRefused`
  /// saying why not.
  public func open(_ path: String, for client: PeerCredentials) throws(BrokerError) -> CInt {
    guard let (root, relative) = locate(path) else {
      let allowed = roots.isEmpty ? "no root is configured" : "the roots are \(roots.map(\.path).joined(separator: ", "))"
      throw BrokerError(.pluginRefused, "\(path) is outside the directories this plugin serves files from (\(allowed))")
    }
    let fd = clinux_open_beneath(root.fd, relative)
    guard fd >= 0 else {
      let reason = switch -fd {
      case ELOOP: "a symlink is on the way (not followed)"
      case EXDEV: "it leads out of \(root.path)"
      case ENOSYS: "openat2 is not available (Linux 5.6 or later is needed)"
      default: String(cString: strerror(-fd))
      }
      throw BrokerError(.pluginRefused, "cannot open \(path): \(reason)")
    }
    do throws(BrokerError) {
      var info = stat()
      guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
        throw BrokerError(.pluginRefused, "\(path) is not a regular file")
      }
      // openat2 opened it non-blocking (a FIFO must not hang the plugin); reads want blocking.
      _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
      try client.checkMayRead(fd, path: path)
      return fd
    } catch {
      closeDescriptor(fd)
      throw error
    }
  }

  /// The root `path` lies under, and the rest of it (never empty): by whole
  /// components, so /srv/snap does not cover /srv/snapshots.
  private func locate(_ path: String) -> (Root, String)? {
    for root in roots {
      let prefix = root.path == "/" ? "/" : root.path + "/"
      guard path.hasPrefix(prefix) else { continue }
      let relative = String(path.dropFirst(prefix.count))
      if !relative.isEmpty { return (root, relative) }
    }
    return nil
  }
}

extension PeerCredentials {
  /// Checks that this client could read the open file `fd` itself (`path`
  /// names it in the error): read permission on the file and search
  /// permission on every directory above it (by the path the kernel gives the
  /// descriptor), by its owner, group and mode bits. Root (uid 0) may read
  /// anything. What the broker does not send is decided against the client:
  /// unknown ids (an older broker) are refused; supplementary groups are not
  /// known, so where the client is neither owner nor in the primary group,
  /// both the group and the other bits must allow it; a file with a POSIX
  /// ACL is refused (its mode bits do not tell who may read it). Throws
  /// `pluginRefused` saying what the client may not do.
  public func checkMayRead(_ fd: CInt, path: String) throws(BrokerError) {
    guard isKnown else { throw BrokerError(.pluginRefused, "the broker did not say who the client is; refusing \(path)") }
    if uid == 0 { return }
    var info = stat()
    guard fstat(fd, &info) == 0 else { throw BrokerError(.pluginRefused, "cannot stat \(path): \(String(cString: strerror(errno)))") }
    guard permits(info, 4) else {
      throw BrokerError(.pluginRefused, "client uid \(uid) (gid \(gid)) may not read \(path) (owner \(info.st_uid), group \(info.st_gid), mode \(String(info.st_mode & 0o7777, radix: 8)))")
    }
    guard clinux_has_access_acl(fd) == 0 else {
      throw BrokerError(.pluginRefused, "\(path) has an access ACL, which this plugin does not evaluate; refusing it to client uid \(uid)")
    }
    // Every directory above it: the client needs search (x) permission on each.
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let count = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
    guard count > 0 else { throw BrokerError(.pluginRefused, "cannot tell where \(path) lies: \(String(cString: strerror(errno)))") }
    let real = String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard real.hasPrefix("/"), !real.hasSuffix(" (deleted)") else { throw BrokerError(.pluginRefused, "\(path) is no longer in the file system") }
    var directory = ""
    for component in real.split(separator: "/").dropLast() {
      directory += "/" + component
      var above = stat()
      guard lstat(directory.isEmpty ? "/" : directory, &above) == 0, permits(above, 1) else {
        throw BrokerError(.pluginRefused, "client uid \(uid) (gid \(gid)) may not reach \(path): no search permission on \(directory)")
      }
    }
    var top = stat()
    guard stat("/", &top) == 0, permits(top, 1) else { throw BrokerError(.pluginRefused, "client uid \(uid) may not search /") }
  }

  /// Whether the mode bits of `info` grant `bit` (4 read, 1 search) to this
  /// client, as the kernel picks the class: owner, else group, else others.
  private func permits(_ info: stat, _ bit: mode_t) -> Bool {
    let mode = info.st_mode
    if info.st_uid == uid { return mode & (bit << 6) != 0 }
    if info.st_gid == gid { return mode & (bit << 3) != 0 }
    // It may be in the file's group through a supplementary group, which the
    // kernel would check instead of the other bits: both must allow it.
    return mode & bit != 0 && mode & (bit << 3) != 0
  }
}
