import Glibc
import SystemPackage

/// The C shims return `-errno` on failure; this turns such a value into a typed result.
/// Every call into `CUserfaultfd` and `CLinux` goes through one of these helpers, so errno
/// handling lives in one place (the shims already retry EINTR where it matters).
@inlinable
package func valueOrErrno<I: FixedWidthInteger & SignedInteger>(_ value: I) -> Result<I, Errno> {
  value < 0 ? .failure(Errno(rawValue: CInt(truncatingIfNeeded: -value))) : .success(value)
}

/// Closes `fd` once. Never retried: on Linux the descriptor is gone even when close reports EINTR.
@inlinable
package func closeDescriptor(_ fd: CInt) {
  if fd >= 0 { _ = Glibc.close(fd) }
}

/// CLOCK_MONOTONIC in nanoseconds.
@inlinable
package func monotonicNanoseconds() -> UInt64 {
  var now = timespec()
  clock_gettime(CLOCK_MONOTONIC, &now)
  return UInt64(truncatingIfNeeded: now.tv_sec) &* 1_000_000_000 &+ UInt64(truncatingIfNeeded: now.tv_nsec)
}

/// The system page size. `@usableFromInline`: public default arguments use it (`EventDispatcher`, `RegionSpec`).
@usableFromInline
package let systemPageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
