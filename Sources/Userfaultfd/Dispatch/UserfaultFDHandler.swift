/// Receives the events of one userfaultfd, in the spirit of the seed's
/// `UserfaultFDHandler`.
///
/// Contract:
/// - Called by an `EventDispatcher` on the one thread that drives it; never
///   concurrently. Handlers need no locks of their own for dispatcher calls.
/// - Ordering: non-pagefault events (`removed`, `unmapped`, `remapped`, `forked`)
///   are delivered before any page fault read after them, each group in read
///   order. A fault parked with `.notNow` may be delivered again after later events.
/// - A fault on a page that is already outstanding (parked or in flight) is not
///   delivered twice; resolving the page wakes every thread waiting on it.
/// - `closed` is delivered exactly once, last; nothing follows it.
public protocol UserfaultFDHandler: AnyObject {
  /// A thread faulted on `fault.address`. Resolve it (typically with
  /// `uffd.copy` or `uffd.zero` and `PagefaultResult(settling:…)`) and return
  /// `.resolved`; return `.notNow` to have it redelivered; or `.inFlight` to
  /// answer later through `EventDispatcher.complete`. The faulting thread stays
  /// blocked until the page is filled or woken.
  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult

  /// `MADV_DONTNEED`/`MADV_REMOVE` dropped the pages in `range`: the next
  /// access faults again. The madvising thread is released once the event is read.
  func removed(_ range: Range<UInt>)

  /// `munmap` (or a mapping replaced by `mmap(MAP_FIXED)`) removed `range`;
  /// it is no longer registered.
  func unmapped(_ range: Range<UInt>)

  /// `mremap` moved `length` bytes from `from` to `to`; the registration moved
  /// too. The kernel follows it with `unmapped` of the old range.
  func remapped(from: UInt, to: UInt, length: Int)

  /// The process forked (requires `.eventFork`); `child` intercepts the child's
  /// copy of the registered ranges. The default drops it, which closes it: the
  /// child's unfilled pages then read as zeros.
  func forked(_ child: UserfaultFD)

  /// The dispatcher stopped: `error` is nil after `stop()`, or the read error
  /// that ended it. Delivered exactly once, last.
  func closed(_ error: UserfaultFDError?)
}

extension UserfaultFDHandler {
  public func forked(_ child: UserfaultFD) {}
  public func closed(_ error: UserfaultFDError?) {}
}
