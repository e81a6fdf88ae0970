import Glibc

/// A private anonymous mapping, unmapped on deinit: memory for a client to
/// have served by the broker. Release it only once no thread touches it, and
/// before the `BrokerClient` that serves it.
public final class AnonymousMemory: @unchecked Sendable {
  // @unchecked: the pointer is immutable; what threads do with the bytes is theirs to order.
  /// The first byte (page aligned); valid while this object lives.
  public let base: UnsafeMutableRawPointer
  /// The mapping's length in bytes: the length asked for, rounded up to pages.
  public let length: Int

  /// Maps `length` bytes (rounded up to pages), readable and writable, not
  /// populated. Throws `ClientError` with mmap's errno.
  public init(length: Int) throws(ClientError) {
    let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    let rounded = (length + pageSize - 1) / pageSize * pageSize
    let pointer = mmap(nil, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    guard let pointer, pointer != MAP_FAILED else {
      throw ClientError("cannot map \(rounded) bytes", errno: errno)
    }
    base = pointer
    self.length = rounded
  }

  deinit { munmap(base, length) }

  /// `base` as an address (`RegionSpec.base`).
  public var address: UInt { UInt(bitPattern: base) }
  /// The whole mapping, for reading and writing; valid while this object lives.
  public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }
}
