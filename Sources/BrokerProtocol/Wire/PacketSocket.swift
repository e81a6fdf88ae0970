import CLinux
import Glibc
import LinuxSupport
import SystemPackage

/// Who is at the other end of a Unix socket (SO_PEERCRED, taken at connect time).
public struct PeerCredentials: Hashable, Sendable {
  /// The peer's pid when it connected (0 for a forked child, which never connected).
  public var pid: Int32
  /// Its effective uid (`unknown` when not known).
  public var uid: UInt32
  /// Its effective gid (`unknown` when not known).
  public var gid: UInt32

  /// Credentials as SO_PEERCRED reports them (or as the broker sent them).
  public init(pid: Int32, uid: UInt32, gid: UInt32) {
    self.pid = pid
    self.uid = uid
    self.gid = gid
  }

  /// The id that stands for "not known": (uid_t)-1, which the kernel never
  /// gives a process (SO_PEERCRED cannot report it).
  public static let unknown = UInt32.max
  /// Whether the uid and gid are known (a broker too old to send them is not).
  public var isKnown: Bool { uid != Self.unknown && gid != Self.unknown }
}

/// One end of an AF_UNIX SOCK_SEQPACKET connection: each send is one packet,
/// each receive one whole packet, with file descriptors riding along as
/// SCM_RIGHTS. Owns its descriptor and closes it on deinit.
public final class PacketSocket {
  /// The largest packet either side sends (the schema's documented limit).
  public static let maxPacketSize = 256 << 10
  /// Kernel buffer asked for each direction: room for a burst of page-carrying packets.
  static let bufferSize: CInt = 4 << 20

  /// The descriptor, owned by this object (for epoll and `poll`; do not close it).
  public let fd: CInt

  /// Takes ownership of a connected SOCK_SEQPACKET descriptor.
  public init(adopting fd: CInt) {
    self.fd = fd
    clinux_set_socket_buffers(fd, Self.bufferSize)
  }

  deinit { closeDescriptor(fd) }

  /// Connects to the broker listening at `path` (blocking socket), then, before
  /// anything is sent, checks who listens (SO_PEERCRED): root, this process's
  /// own uid, `brokerUID`, or (when `brokerUID` is nil) the uid in
  /// `UFFD_BROKER_UID`. Anyone else may be squatting on the path, waiting
  /// for a userfaultfd or for a plugin's pages: the connection is closed and
  /// `notAuthorized` thrown, naming the uid that listens.
  public static func connect(path: String, trusting brokerUID: UInt32? = nil) throws(BrokerError) -> PacketSocket {
    let socket: PacketSocket
    switch valueOrErrno(clinux_connect_unix(path)) {
    case .success(let fd): socket = PacketSocket(adopting: fd)
    case .failure(let errno): throw BrokerError(.io, "cannot connect to \(path)", errno: errno)
    }
    let listener = try socket.peerCredentials().uid
    let trusted = if let brokerUID { brokerUID } else { try SocketPaths.trustedBrokerUID }
    guard listener == 0 || listener == getuid() || listener == geteuid() || listener == trusted else {
      let others = trusted.map { ", uid \($0)" } ?? ""
      throw BrokerError(.notAuthorized, "\(path) is served by uid \(listener), not root\(others) or you (uid \(geteuid())); refusing to send it anything (if uid \(listener) runs your broker, say so with UFFD_BROKER_UID=\(listener))")
    }
    return socket
  }

  /// A connected pair (for a spawned child or a test).
  public static func pair() throws(BrokerError) -> (PacketSocket, PacketSocket) {
    var fds: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
      throw BrokerError(.io, "socketpair failed", errno: Errno(rawValue: errno))
    }
    return (PacketSocket(adopting: fds[0]), PacketSocket(adopting: fds[1]))
  }

  /// The peer's pid, uid and gid.
  public func peerCredentials() throws(BrokerError) -> PeerCredentials {
    var pid: pid_t = 0
    var uid: uid_t = 0
    var gid: gid_t = 0
    let rc = clinux_peer_credentials(fd, &pid, &uid, &gid)
    guard rc == 0 else { throw BrokerError(.io, "SO_PEERCRED failed", errno: Errno(rawValue: -rc)) }
    return PeerCredentials(pid: pid, uid: uid, gid: gid)
  }

  /// What a send did.
  public enum SendResult: Equatable {
    /// The packet is queued whole.
    case sent
    /// The socket is non-blocking and its buffer is full: try again on EPOLLOUT.
    case wouldBlock
  }

  /// Sends `bytes` as one packet, with `fds` attached (they stay open here).
  @discardableResult
  public func send(_ bytes: UnsafeRawBufferPointer, fds: UnsafeBufferPointer<CInt>? = nil) throws(BrokerError) -> SendResult {
    let n = clinux_send_with_fds(fd, bytes.baseAddress, bytes.count, fds?.baseAddress, CInt(fds?.count ?? 0))
    if n >= 0 { return .sent }
    let errno = Errno(rawValue: CInt(-n))
    if errno == .resourceTemporarilyUnavailable { return .wouldBlock }
    if errno == .brokenPipe || errno == .connectionReset { throw BrokerError(.disconnected, "the peer closed the connection", errno: errno) }
    throw BrokerError(.io, "sending a packet failed", errno: errno)
  }

  /// What a receive got.
  public enum ReceiveResult: Equatable {
    /// A packet of this many bytes arrived (descriptors, if any, appended to `fds`).
    case packet(Int)
    /// Non-blocking socket, nothing queued.
    case wouldBlock
    /// The peer closed the connection.
    case closed
  }

  /// Receives one packet into `buffer`; descriptors that came with it are
  /// appended to `fds` and are the caller's to close. A packet larger than
  /// `buffer` (or with too many descriptors) is an error: its descriptors are closed.
  public func receive(into buffer: UnsafeMutableRawBufferPointer, fds: inout [CInt], blocking: Bool = false) throws(BrokerError) -> ReceiveResult {
    var received: (CInt, CInt, CInt, CInt, CInt, CInt, CInt, CInt) = (-1, -1, -1, -1, -1, -1, -1, -1)
    var count: CInt = 0
    var truncated: CInt = 0
    let n = withUnsafeMutableBytes(of: &received) { raw in
      clinux_recv_with_fds(fd, buffer.baseAddress, buffer.count, raw.baseAddress!.assumingMemoryBound(to: CInt.self), &count, &truncated, blocking ? 0 : CInt(MSG_DONTWAIT))
    }
    if n < 0 {
      let errno = Errno(rawValue: CInt(-n))
      if errno == .resourceTemporarilyUnavailable { return .wouldBlock }
      if errno == .connectionReset { return .closed }
      throw BrokerError(.io, "receiving a packet failed", errno: errno)
    }
    if count > 0 {  // rare: only registration packets carry descriptors
      let arrived = withUnsafeBytes(of: &received) { Array($0.bindMemory(to: CInt.self).prefix(Int(count))) }
      if truncated != 0 { arrived.forEach(closeDescriptor) } else { fds.append(contentsOf: arrived) }
    }
    if truncated != 0 {
      throw BrokerError(.tooLarge, "a packet larger than \(buffer.count) bytes or with too many descriptors was refused")
    }
    if n == 0 && count == 0 { return .closed }
    return .packet(n)
  }

  /// Sets a receive timeout for blocking receives (0: none).
  public func setReceiveTimeout(milliseconds: Int) {
    var tv = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
    _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
  }
}

/// A listening SOCK_SEQPACKET socket at a filesystem path, created with a
/// given mode (so that no one else can connect in the window before chmod).
/// With `stream`, a SOCK_STREAM one, for peers that speak another protocol
/// (a Firecracker VMM); its connections are read through `PacketSocket` too.
///
/// It takes nobody's place (`clinux_listen_unix`):
/// 1. Something at the path that is not a socket is never removed: `init` throws.
/// 2. A socket something still answers on (a live broker) is left alone: `init` throws `nameTaken`.
/// 3. Only a dead socket (no listener) is replaced.
/// 4. On deinit the socket file is removed only if it is still the one this listener made.
/// 5. A listener handed over already bound (`init(inheriting:path:)`, systemd's
///    socket activation) is made non-blocking, and its file is never removed:
///    it is its maker's, which may pass it to the broker's next run.
public final class PacketListener {
  /// The listening descriptor (non-blocking), owned by this object.
  public let fd: CInt
  /// The socket's path.
  public let path: String
  /// The socket file this listener made (nil: inherited, not ours to remove).
  private let made: (device: UInt64, inode: UInt64)?

  /// Listens at `path` with file mode `mode` (see the type's rules); with
  /// `stream`, a SOCK_STREAM socket. Throws `nameTaken` when a live broker
  /// serves the path, `notAuthorized` when something else than a socket is
  /// there, `io` for any other failure.
  public init(path: String, mode: mode_t = 0o600, backlog: CInt = 128, stream: Bool = false) throws(BrokerError) {
    var device: UInt64 = 0
    var inode: UInt64 = 0
    switch valueOrErrno(clinux_listen_unix(path, stream ? 1 : 0, mode, backlog, &device, &inode)) {
    case .success(let fd): self.fd = fd
    case .failure(.fileExists):
      throw BrokerError(.notAuthorized, "\(path) exists and is not a socket; not removing it (remove it yourself, or choose another path)")
    case .failure(.addressInUse):
      throw BrokerError(.nameTaken, "a broker already serves \(path) (stop it first, or choose other sockets)")
    case .failure(let errno): throw BrokerError(.io, "cannot listen on \(path)", errno: errno)
    }
    self.path = path
    made = (device, inode)
  }

  /// Takes ownership of `fd`, a listening socket bound at `path` by someone
  /// else (the caller checked what it is), and makes it non-blocking: the
  /// accept loop reads until EAGAIN. Throws `io` if it cannot.
  public init(inheriting fd: CInt, path: String) throws(BrokerError) {
    if case .failure(let errno) = valueOrErrno(clinux_set_nonblocking(fd)) {
      throw BrokerError(.io, "cannot make the inherited socket \(path) non-blocking", errno: errno)
    }
    self.fd = fd
    self.path = path
    made = nil
  }

  /// Whether this listener bound its socket itself (false: it was handed over).
  public var isInherited: Bool { made == nil }

  deinit {
    closeDescriptor(fd)
    if let made { _ = clinux_unlink_socket(path, made.device, made.inode) }
  }

  /// Accepts one pending connection (non-blocking); nil when none is pending.
  public func accept() throws(BrokerError) -> PacketSocket? {
    switch valueOrErrno(clinux_accept(fd)) {
    case .success(let connection): return PacketSocket(adopting: connection)
    case .failure(let errno):
      if errno == .resourceTemporarilyUnavailable || errno == .connectionAbort { return nil }
      throw BrokerError(.io, "accept failed", errno: errno)
    }
  }
}
