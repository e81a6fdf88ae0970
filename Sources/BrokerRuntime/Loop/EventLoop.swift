import BrokerCore
import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport
import SystemPackage

/// What an epoll registration stands for: a kind and the id of its owner.
struct Token: Hashable {
  enum Kind: UInt64 {
    case clientListener = 1, pluginListener, signal, wakeup, clientSocket, clientUffd, clientPidfd, plugin, child, controlListener, control, firecrackerListener
  }
  var kind: Kind
  var id: UInt64

  var rawValue: UInt64 { kind.rawValue << 56 | (id & 0x00FF_FFFF_FFFF_FFFF) }
  init(_ kind: Kind, _ id: UInt64 = 0) {
    self.kind = kind
    self.id = id
  }
  init?(rawValue: UInt64) {
    guard let kind = Kind(rawValue: rawValue >> 56) else { return nil }
    self.init(kind, rawValue & 0x00FF_FFFF_FFFF_FFFF)
  }
}

/// A thin epoll wrapper: level-triggered readiness for tokens.
final class EventLoop {
  let epoll: CInt
  private let ready: UnsafeMutablePointer<clinux_ready>
  static let batch = 64

  init() throws(BrokerError) {
    switch valueOrErrno(clinux_epoll_create()) {
    case .success(let fd): epoll = fd
    case .failure(let errno): throw BrokerError(.io, "epoll_create failed", errno: errno)
    }
    ready = .allocate(capacity: Self.batch)
  }

  deinit {
    closeDescriptor(epoll)
    ready.deallocate()
  }

  func add(_ fd: CInt, _ token: Token, events: UInt32 = clinux_epollin) throws(BrokerError) {
    let rc = clinux_epoll_ctl(epoll, clinux_epoll_add, fd, events, token.rawValue)
    if rc < 0 { throw BrokerError(.io, "epoll_ctl(ADD) failed", errno: Errno(rawValue: -rc)) }
  }

  func modify(_ fd: CInt, _ token: Token, events: UInt32) {
    _ = clinux_epoll_ctl(epoll, clinux_epoll_mod, fd, events, token.rawValue)
  }

  func remove(_ fd: CInt) {
    _ = clinux_epoll_ctl(epoll, clinux_epoll_del, fd, 0, 0)
  }

  /// Waits up to `timeout` ms (-1: forever); returns how many registrations are ready.
  func wait(timeout: CInt) -> Int {
    max(Int(clinux_epoll_wait(epoll, ready, CInt(Self.batch), timeout)), 0)
  }

  /// The `index`th ready registration of the last `wait` and its epoll events.
  func ready(at index: Int) -> (token: Token?, events: UInt32) {
    (Token(rawValue: ready[index].token), ready[index].events)
  }
}
