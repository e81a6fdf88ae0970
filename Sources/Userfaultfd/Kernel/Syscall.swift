import CUserfaultfd
import Glibc
import SystemPackage

/// The shim returns `-errno` on failure; this turns such a value into a typed result.
/// Every call into `CUserfaultfd` goes through one of these helpers, so errno
/// handling lives in one place (the shim already retries EINTR where it matters).
@inlinable
public func valueOrErrno<I: FixedWidthInteger & SignedInteger>(_ value: I) -> Result<I, Errno> {
  value < 0 ? .failure(Errno(rawValue: CInt(truncatingIfNeeded: -value))) : .success(value)
}

/// Closes `fd` once. Never retried: on Linux the descriptor is gone even when close reports EINTR.
@inlinable
public func closeDescriptor(_ fd: CInt) {
  if fd >= 0 { _ = Glibc.close(fd) }
}

/// CLOCK_MONOTONIC in nanoseconds.
@inlinable
public func monotonicNanoseconds() -> UInt64 { cuffd_monotonic_ns() }

/// The system page size.
public let systemPageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
