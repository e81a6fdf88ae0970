import BrokerProtocol
import CLinux
import CSystemd
import Glibc
import LinuxSupport

/// The listening sockets a service manager handed the broker (systemd's socket
/// activation: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), each recognized
/// as the client, plugin or control socket.
///
/// 1. Only descriptors meant for this process are taken (libsystemd's
///    `sd_listen_fds_with_names`: `LISTEN_PID` must be ours). The `LISTEN_*`
///    variables are then unset, so spawned plugins never see them, and the
///    descriptors are close-on-exec.
/// 2. Each must be a listening AF_UNIX SOCK_SEQPACKET socket (`sd_is_socket_unix`)
///    bound to a filesystem path; anything else is refused, named by its number and name.
/// 3. Its role comes from its name (`FileDescriptorName=client`, `plugin` or
///    `control`), else from its path being the configured path of a role. One
///    with neither is refused as unknown, as is one whose name and path say two
///    different roles, and a second one for a role.
/// 4. The client and plugin sockets must both be handed over; a control socket
///    that is not is bound by the broker itself.
/// 5. The broker serves each at the path it is bound to (that replaces the
///    configured path of its role) and never removes its file
///    (`PacketListener.init(inheriting:path:)`): it is the service manager's,
///    which keeps it listening while the broker restarts.
///
/// A refusal throws `BrokerError` (`malformed`) saying what was wrong, after
/// closing every descriptor handed over; the broker then does not start.
enum InheritedListeners {
  enum Role: String, CaseIterable, Sendable {
    case client, plugin, control
  }

  /// One descriptor handed over, as found (the input of `assign`).
  struct Candidate: Equatable, Sendable {
    var fd: CInt
    /// Its `LISTEN_FDNAMES` entry (systemd: `FileDescriptorName=`, else the
    /// socket unit's name; libsystemd says "unknown" when none is given).
    var name: String
    /// The absolute path it is bound to (nil: unnamed or abstract).
    var path: String?
    /// Whether it is a listening AF_UNIX SOCK_SEQPACKET socket.
    var isPacketListener: Bool

    var label: String { "descriptor \(fd) (name \"\(name)\"\(path.map { ", bound at \($0)" } ?? ""))" }
  }

  /// Takes the descriptors handed over (none: an empty dictionary, and the
  /// broker binds its sockets itself). `configured`: each role's configured
  /// socket path.
  static func take(configured: [Role: String]) throws(BrokerError) -> [Role: PacketListener] {
    var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
    let count = sd_listen_fds_with_names(1, &names)
    defer {
      if let names {
        for index in 0..<Int(max(count, 0)) { free(names[index]) }
        free(names)
      }
    }
    guard count >= 0 else {
      throw BrokerError(.malformed, "the sockets handed over by the service manager (LISTEN_FDS, LISTEN_FDNAMES) cannot be read", errno: .init(rawValue: -count))
    }
    var candidates: [Candidate] = []
    for index in 0..<Int(count) {
      let fd = SD_LISTEN_FDS_START + CInt(index)
      let name = names?[index].map { String(cString: $0) } ?? "unknown"
      candidates.append(Candidate(fd: fd, name: name, path: boundPath(fd), isPacketListener: sd_is_socket_unix(fd, CInt(SOCK_SEQPACKET.rawValue), 1, nil, 0) > 0))
    }
    var listeners: [Role: PacketListener] = [:]
    do {
      for (role, candidate) in try assign(candidates, configured: configured.mapValues(absolute)) {
        listeners[role] = try PacketListener(inheriting: candidate.fd, path: candidate.path!)
      }
    } catch {
      for candidate in candidates where !listeners.values.contains(where: { $0.fd == candidate.fd }) { closeDescriptor(candidate.fd) }
      throw error
    }
    return listeners
  }

  /// Which role each descriptor serves (rules 2 to 4); pure, so it is tested
  /// without a service manager. `configured` paths are absolute.
  static func assign(_ candidates: [Candidate], configured: [Role: String]) throws(BrokerError) -> [Role: Candidate] {
    var assigned: [Role: Candidate] = [:]
    for candidate in candidates {
      guard candidate.isPacketListener else {
        throw BrokerError(.malformed, "\(candidate.label), handed over by the service manager, is not a listening AF_UNIX SOCK_SEQPACKET socket; refusing to start (the socket unit must use ListenSequentialPacket=)")
      }
      guard let path = candidate.path else {
        throw BrokerError(.malformed, "\(candidate.label), handed over by the service manager, is not bound to a filesystem path; refusing to start")
      }
      let byName = Role(rawValue: candidate.name)
      let byPath = Role.allCases.first { configured[$0] == path }
      guard let role = byName ?? byPath else {
        let known = Role.allCases.compactMap { role in configured[role].map { "\(role) \($0)" } }.joined(separator: ", ")
        throw BrokerError(.malformed, """
          \(candidate.label), handed over by the service manager, is none of the broker's sockets; refusing to start \
          (name it client, plugin or control with FileDescriptorName=, or bind it at a configured path: \(known))
          """)
      }
      if let byName, let byPath, byName != byPath {
        throw BrokerError(.malformed, "\(candidate.label) is named \(byName) but bound at the \(byPath) socket's configured path; refusing to start")
      }
      if let other = assigned[role] {
        throw BrokerError(.malformed, "the service manager handed over two \(role) sockets, descriptors \(other.fd) and \(candidate.fd); refusing to start")
      }
      assigned[role] = candidate
    }
    if !candidates.isEmpty {
      for role in [Role.client, .plugin] where assigned[role] == nil {
        let given = candidates.map(\.label).joined(separator: ", ")
        throw BrokerError(.malformed, """
          the service manager handed over no \(role) socket (only \(given)); refusing to start \
          (the socket unit must pass both the client and the plugin socket, FileDescriptorName=client and plugin)
          """)
      }
    }
    return assigned
  }

  /// The path `fd` is bound to, made absolute (nil: none).
  private static func boundPath(_ fd: CInt) -> String? {
    var buffer = [CChar](repeating: 0, count: 128)
    let length = clinux_socket_path(fd, &buffer, buffer.count)
    guard length > 0 else { return nil }
    return absolute(String(decoding: buffer[..<Int(length)].map { UInt8(bitPattern: $0) }, as: UTF8.self))
  }

  /// `path` from the working directory if relative.
  static func absolute(_ path: String) -> String {
    guard !path.hasPrefix("/"), let cwd = getcwd(nil, 0) else { return path }
    defer { free(cwd) }
    return String(cString: cwd) + "/" + path
  }
}
