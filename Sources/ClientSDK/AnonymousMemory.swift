import Glibc
import LinuxSupport

/// A private anonymous mapping, unmapped on deinit: memory for a client to
/// have served by the broker, of small pages or of huge ones (`MAP_HUGETLB`).
/// Release it only once no thread touches it, and before the `BrokerClient`
/// that serves it.
public final class AnonymousMemory: Mapped, @unchecked Sendable {
  // @unchecked: the pointer is immutable; what threads do with the bytes is theirs to order.
  /// The first byte (page aligned); valid while this object lives.
  public let base: UnsafeMutableRawPointer
  /// The mapping's length in bytes: the length asked for, rounded up to pages.
  public let length: Int
  /// Its page size: the system's, or the huge page size asked for (`RegionSpec.pageSize`).
  public let pageSize: Int

  /// Maps `length` bytes (rounded up to pages), readable and writable, not
  /// populated. `hugePageSize` (2 MiB, say; one of the kernel's huge page
  /// sizes): huge pages from the kernel's hugetlb pool (`MAP_HUGETLB`), which
  /// must hold enough free pages when they are filled (`/proc/sys/vm/nr_hugepages`).
  /// Throws `ClientError` with mmap's errno (ENOMEM: no pool reserved; EINVAL: no such huge page size).
  public init(length: Int, hugePageSize: Int? = nil) throws(ClientError) {
    let pageSize = hugePageSize ?? systemPageSize
    guard pageSize > 0, pageSize & (pageSize - 1) == 0 else { throw ClientError("a page size must be a power of two (got \(pageSize))") }
    let rounded = (length + pageSize - 1) / pageSize * pageSize
    // MAP_HUGETLB names its page size by log2 at MAP_HUGE_SHIFT (26).
    let huge = hugePageSize == nil ? 0 : MAP_HUGETLB | CInt(pageSize.trailingZeroBitCount) << 26
    let pointer = mmap(nil, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | huge, -1, 0)
    guard let pointer, pointer != MAP_FAILED else {
      throw ClientError("cannot map \(rounded) bytes of \(pageSize)-byte pages", errno: errno)
    }
    base = pointer
    self.length = rounded
    self.pageSize = pageSize
  }

  deinit { munmap(base, length) }
}

/// Memory this SDK maps for regions: where it lies and how long it is.
public protocol Mapped {
  /// The first byte.
  var base: UnsafeMutableRawPointer { get }
  /// Bytes mapped, a multiple of the page size.
  var length: Int { get }
}

extension Mapped {
  /// `base` as an address (`RegionSpec.base`).
  public var address: UInt { UInt(bitPattern: base) }
  /// The whole mapping, for reading and writing; valid while the mapping lives.
  public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }
}
