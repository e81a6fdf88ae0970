import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport
import Userfaultfd

/// Watches the broker connection from a thread of its own. When the broker
/// goes away it re-attaches (every 100 ms) until the policy's deadline, then
/// fails closed as the policy says.
final class Monitor: @unchecked Sendable {
  // @unchecked: `thread` and `fallback` are set before the thread starts or on it, and read after it is joined.
  private let connection: Connection
  private let policy: BrokerLossPolicy
  private let stopEvent: CInt
  private var thread: pthread_t?
  private var fallback: UserfaultFDDispatcher?

  init(connection: Connection, policy: BrokerLossPolicy) {
    self.connection = connection
    self.policy = policy
    stopEvent = clinux_eventfd()
    if case .reattach = policy, stopEvent >= 0 {
      thread = spawnThread { [self] in run() }
    }
  }

  func stop() {
    var one: UInt64 = 1
    _ = write(stopEvent, &one, 8)
    if let thread { pthread_join(thread, nil) }
    thread = nil
    fallback?.stop()
    closeDescriptor(stopEvent)
  }

  /// Waits up to `milliseconds` for the socket to hang up (or for stop); true if stopping.
  private func wait(socket: CInt, milliseconds: CInt) -> (stopping: Bool, hungUp: Bool) {
    var fds = [pollfd(fd: stopEvent, events: Int16(POLLIN), revents: 0), pollfd(fd: socket, events: Int16(POLLIN) | 0x2000 /* POLLRDHUP, a GNU name */, revents: 0)]
    if poll(&fds, socket >= 0 ? 2 : 1, milliseconds) < 0 { return (false, false) }
    let hungUp = socket >= 0 && fds[1].revents & ~Int16(POLLIN) != 0
    if socket >= 0 && fds[1].revents & Int16(POLLIN) != 0 && !hungUp {
      // The broker said where regions lie now; a request in progress reads its own reply first.
      connection.withLock { $0.readNotifications() }
    }
    return (fds[0].revents != 0, hungUp)
  }

  private func run() {
    guard case .reattach(let within, let otherwise) = policy else { return }
    while true {
      let socket = connection.withLock { $0.socket?.fd ?? -1 }
      let (stopping, hungUp) = wait(socket: socket, milliseconds: -1)
      if stopping { return }
      guard hungUp else { continue }
      let deadline = monotonicNanoseconds() + UInt64(within) * 1_000_000
      var lastError = ClientError("the broker went away")
      var attached = false
      while !attached && monotonicNanoseconds() < deadline {
        do {
          try connection.withLock { (state) throws(ClientError) in try state.attach() }
          attached = true
        } catch {
          lastError = error
          if wait(socket: -1, milliseconds: 100).stopping { return }
        }
      }
      if !attached {
        giveUp(otherwise, ClientError("no broker came back within \(within) ms (\(lastError))"))
        return
      }
    }
  }

  private func giveUp(_ otherwise: BrokerLossPolicy.Otherwise, _ error: ClientError) {
    switch otherwise {
    case .terminate:
      let message = "uffd-broker client: \(error): brokered memory cannot be served; aborting rather than reading wrong memory\n"
      message.withCString { _ = write(2, $0, strlen($0)) }
      abort()
    case .call(let handler):
      handler(error)
    case .poison:
      let uffd = connection.withLock { $0.uffd }
      let regions = connection.withLock { $0.regions }
      fallback = try? UserfaultFDDispatcher.start(uffd: uffd, handler: PoisoningHandler(regions: regions))
      // Faults the dead broker had read are gone from the queue: wake their
      // threads so they fault again, now into the poisoning handler.
      for region in regions { _ = uffd.wake(address: region.base, length: region.length) }
    }
  }
}

/// Fails closed: every fault on a page that was never filled is poisoned, so
/// the access gets SIGBUS instead of zeros.
private final class PoisoningHandler: UserfaultFDHandler {
  /// Where huge pages are (a whole huge page is poisoned at once there).
  let hugePages: [(range: Range<UInt>, pageSize: Int)]

  init(regions: [RegionSpec]) {
    hugePages = regions.filter { $0.pageSize != systemPageSize }.map { ($0.range, $0.pageSize) }
  }

  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    let pageSize = hugePages.first { $0.range.contains(fault.address) }?.pageSize ?? systemPageSize
    let page = fault.address & ~UInt(pageSize - 1)
    return PagefaultResult(settling: uffd.poison(address: page, length: pageSize), address: page, length: pageSize, on: uffd)
  }
  func removed(_ range: Range<UInt>) {}
  func unmapped(_ range: Range<UInt>) {}
  func remapped(from: UInt, to: UInt, length: Int) {}
}
