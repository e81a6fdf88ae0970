import CLinux
import Glibc
import LinuxSupport
import SystemPackage

/// The in-process event loop (the seed's `StartWaitingForEvents`): a thread of
/// its own polls one userfaultfd and drives an `EventDispatcher` with it, so
/// the handler is called on that thread, in order, with parked faults
/// redelivered on their backoff timer even when no other event arrives.
///
/// State the handler shares with other threads is its own to lock. Call
/// `stop()` from one thread, never the handler's: the loop thread holds the
/// dispatcher (and through it `uffd`) until then.
public final class UserfaultFDDispatcher: @unchecked Sendable {
  // @unchecked: `core` is touched only by the loop thread until `stop()` joins it.
  private let core: EventDispatcher
  private let stopEvent: CInt
  private var thread: pthread_t?

  /// Starts a thread that serves `uffd` with `handler` until `stop()` (or a
  /// read error). The handler is called only on that thread. Throws
  /// `.systemCall` if the stop event (an eventfd) cannot be created; nothing
  /// is started then.
  public static func start(uffd: UserfaultFD, handler: any UserfaultFDHandler, pageSize: Int = systemPageSize) throws(UserfaultFDError) -> UserfaultFDDispatcher {
    let stopEvent: CInt
    switch valueOrErrno(clinux_eventfd()) {
    case .success(let fd): stopEvent = fd
    case .failure(let errno): throw UserfaultFDError(.systemCall, "cannot create the dispatcher's stop event", syscall: "eventfd", errno: errno)
    }
    let dispatcher = UserfaultFDDispatcher(core: EventDispatcher(uffd: uffd, handler: handler, pageSize: pageSize), stopEvent: stopEvent)
    dispatcher.thread = spawnThread { dispatcher.run() }
    return dispatcher
  }

  private init(core: EventDispatcher, stopEvent: CInt) {
    self.core = core
    self.stopEvent = stopEvent
  }

  deinit { closeDescriptor(stopEvent) }

  /// Stops the loop, waits for its thread, and delivers `closed(nil)` if the
  /// loop had not closed already. Idempotent; must not be called from the handler.
  public func stop() {
    guard let thread else { return }
    var one: UInt64 = 1
    _ = write(stopEvent, &one, 8)
    pthread_join(thread, nil)
    self.thread = nil
  }

  /// Page faults read (`EventDispatcher.faultsRead`); read the counters after `stop()`.
  public var faultsRead: Int { core.faultsRead }
  /// Faults merged into one outstanding on the same page; read after `stop()`.
  public var faultsMerged: Int { core.faultsMerged }
  /// Parked faults delivered again; read after `stop()`.
  public var redeliveries: Int { core.redeliveries }

  private func run() {
    var fds = [pollfd(fd: core.uffd.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopEvent, events: Int16(POLLIN), revents: 0)]
    while !core.isClosed {
      var timeout: CInt = -1
      if let due = core.nextDeadline {
        let now = monotonicNanoseconds()
        timeout = due <= now ? 0 : CInt(min((due - now + 999_999) / 1_000_000, 1000))
      }
      let ready = poll(&fds, 2, timeout)
      if ready < 0 {
        if errno == EINTR { continue }
        core.close(UserfaultFDError(.systemCall, "poll failed", syscall: "poll", errno: Errno(rawValue: errno)))
        break
      }
      if fds[1].revents != 0 { break }
      if fds[0].revents & Int16(POLLERR | POLLNVAL) != 0 {
        core.close(UserfaultFDError(.closed, "the userfaultfd reported an error"))
        break
      }
      if fds[0].revents != 0 { core.drain() }
      core.redeliverDue()
    }
    core.close(nil)
  }
}
