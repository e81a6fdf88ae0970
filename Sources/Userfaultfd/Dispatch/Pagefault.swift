/// One page fault as the kernel reported it (`UFFD_EVENT_PAGEFAULT`).
public struct Pagefault: Hashable, Sendable {
  /// `UFFD_PAGEFAULT_FLAG_*`: why the thread faulted.
  public struct Flags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// A write access (otherwise a read).
    public static let write = Flags(rawValue: 1 << 0)
    /// A write to a write-protected page (WP mode).
    public static let writeProtect = Flags(rawValue: 1 << 1)
    /// A minor fault: the page is in the page cache but not mapped (MINOR mode).
    public static let minor = Flags(rawValue: 1 << 2)
  }

  /// The faulting address, rounded down to its page (the kernel's default without EXACT_ADDRESS).
  public var address: UInt
  /// Why the thread faulted (a write, a write-protect fault, a minor fault).
  public var flags: Flags
  /// The faulting thread's id, or 0 when `.threadID` was not granted.
  public var thread: Int32

  /// A fault as the kernel would report it (for tests and models).
  public init(address: UInt, flags: Flags, thread: Int32) {
    self.address = address
    self.flags = flags
    self.thread = thread
  }
}

/// A handler's answer to a page fault.
public enum PagefaultResult: Sendable, Equatable {
  /// The fault is resolved (the page is filled and its waiters woken).
  case resolved
  /// Not now: park the fault and deliver it again later (after the next batch of
  /// events, and on a timer with backoff).
  case notNow
  /// The handler took the fault away to answer later (for instance from another
  /// process) and will call `EventDispatcher.complete(_:_:)` with the result.
  case inFlight

  /// Turns the outcome of a resolving ioctl on `address..<address+length` into
  /// the fault's result, waking the range where the kernel did not:
  /// EEXIST (another fill won the race) and ENOENT (the range went away; the
  /// thread re-faults) are resolved after a wake; EAGAIN, a partial fill and
  /// unexpected failures are redelivered; a target that exited needs nothing more.
  public init(settling outcome: IoctlOutcome, address: UInt, length: Int, on uffd: UserfaultFD) {
    switch outcome {
    case .done, .targetExited:
      self = .resolved
    case .alreadyPresent, .rangeGone:
      _ = uffd.wake(address: address, length: length)
      self = .resolved
    case .partial, .notNow, .failed:
      self = .notNow
    }
  }
}
