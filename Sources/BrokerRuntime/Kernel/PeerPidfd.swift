import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport
import SystemPackage

/// A pidfd of the process at the other end of a connection: the broker kills
/// through it and names that process to plugins, so it must be the one that
/// connected, not whichever process has its pid by now.
enum PeerPidfd {
  /// How the pidfd is taken.
  enum Method: String {
    /// `SO_PEERPIDFD` (Linux 6.5): the kernel's own record of the connecting process, exact.
    case connection
    /// `pidfd_open` of `SO_PEERCRED`'s pid, then checked against the
    /// connection's uid and gid: what a kernel before 6.5 allows.
    case pid
  }

  /// `UFFD_BROKER_PIDFD=pid` takes the pid path even where `SO_PEERPIDFD`
  /// works (to test it on a new kernel); otherwise the pid path is used only
  /// where the kernel lacks the socket option.
  static let preferred: Method = getenv("UFFD_BROKER_PIDFD").map { String(cString: $0) } == Method.pid.rawValue ? .pid : .connection

  /// A pidfd of `peer`'s process (connected on `socket`), or why none can be had.
  static func take(of socket: CInt, peer: PeerCredentials) -> Result<OwnedDescriptor, Errno> {
    if preferred == .connection {
      switch valueOrErrno(clinux_peer_pidfd(socket)) {
      case .success(let pidfd): return .success(OwnedDescriptor(pidfd))
      case .failure(.protocolNotAvailable), .failure(.invalidArgument): break  // a kernel before 6.5
      case .failure(let errno): return .failure(errno)
      }
    }
    return open(pid: peer.pid, expecting: peer)
  }

  /// A pidfd of `pid`, kept only if its process has `peer`'s uid and gid and
  /// is still alive once they were read (so the read was of that process and
  /// not of a later one with its pid). A pid reused by a process of the same
  /// uid and gid between connect and accept goes unnoticed: the README says so.
  static func open(pid: pid_t, expecting peer: PeerCredentials) -> Result<OwnedDescriptor, Errno> {
    let pidfd: OwnedDescriptor
    switch valueOrErrno(clinux_pidfd_open(pid)) {
    case .success(let fd): pidfd = OwnedDescriptor(fd)
    case .failure(let errno): return .failure(errno)
    }
    guard let (uid, gid) = effectiveIDs(of: pid), uid == peer.uid, gid == peer.gid,
          clinux_pidfd_send_signal(pidfd.rawValue, 0) == 0
    else { return .failure(.noSuchProcess) }
    return .success(pidfd)
  }

  /// The effective uid and gid in `/proc/PID/status` (its `Uid:` and `Gid:`
  /// lines list real, effective, saved and filesystem ids).
  static func effectiveIDs(of pid: pid_t) -> (uid: UInt32, gid: UInt32)? {
    guard let file = fopen("/proc/\(pid)/status", "r") else { return nil }
    defer { fclose(file) }
    var uid: UInt32?
    var gid: UInt32?
    var line = [CChar](repeating: 0, count: 256)
    while uid == nil || gid == nil, fgets(&line, CInt(line.count), file) != nil {
      let fields = String(cString: line).split(whereSeparator: { $0 == "\t" || $0 == " " || $0 == "\n" })
      guard fields.count >= 3, let effective = UInt32(fields[2]) else { continue }
      if fields[0] == "Uid:" { uid = effective } else if fields[0] == "Gid:" { gid = effective }
    }
    guard let uid, let gid else { return nil }
    return (uid, gid)
  }
}
