import SystemPackage

/// What a resolving ioctl (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`,
/// `UFFDIO_POISON`) did. Races with the faulting process are outcomes, not errors:
/// the kernel reports them in the ioctl's result field (DESIGN §2).
public enum IoctlOutcome: Equatable, Sendable {
  /// The whole range was filled and its waiters woken (unless DONTWAKE was asked).
  case done
  /// Only `bytes` were filled (and woken); the rest hit EAGAIN. Retry the remainder later.
  case partial(bytes: Int)
  /// Nothing was done: a non-cooperative event (remove, unmap, remap, fork) is
  /// queued but not yet read, or the mappings are changing (EAGAIN, or a result of 0).
  /// Read the uffd, then redeliver.
  case notNow
  /// A page already exists in the range (EEXIST), e.g. another thread's fault was
  /// resolved first. The fault is resolved: wake the range.
  case alreadyPresent
  /// The range is no longer registered or mapped (ENOENT): the faulting thread
  /// must be woken so it can re-fault (and typically get SIGSEGV).
  case rangeGone
  /// The process that owns the memory exited (ESRCH, ENOSPC).
  case targetExited
  /// Any other failure (for instance EINVAL for a range this uffd did not register).
  case failed(Errno)

  /// True when the fault this ioctl answered needs no more work (done, or already present).
  public var isResolved: Bool {
    switch self {
    case .done, .alreadyPresent: return true
    default: return false
    }
  }

  /// True for `.failed`: neither a fill nor a race.
  public var isFailure: Bool {
    if case .failed = self { return true }
    return false
  }

  /// Classifies an ioctl's return code and the kernel's result field.
  /// - Parameters:
  ///   - rc: 0 or `-errno` from the shim.
  ///   - result: the `copy`/`zeropage`/`mapped`/`updated` field: bytes done or `-errno`.
  ///   - length: the number of bytes asked for.
  static func classify(rc: CInt, result: Int64, length: Int) -> IoctlOutcome {
    if rc == 0 { return .done }
    // A positive result is a partial fill, whatever the ioctl's errno.
    if result > 0 && result < length { return .partial(bytes: Int(result)) }
    if result >= Int64(length) && length > 0 { return .done }
    let errno = Errno(rawValue: -rc)
    switch errno {
    case .resourceTemporarilyUnavailable: return .notNow
    case .fileExists: return .alreadyPresent
    case .noSuchFileOrDirectory: return .rangeGone
    case .noSuchProcess, .noSpace: return .targetExited
    case .badFileDescriptor:
      // A descriptor we closed: a bug, not a race.
      preconditionFailure("userfaultfd ioctl failed with \(errno): a bug in the caller")
    default: return .failed(errno)
    }
  }
}
