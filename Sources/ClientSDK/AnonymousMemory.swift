import Glibc

/// A private anonymous mapping, unmapped on deinit: memory for a client to
/// have served by the broker.
public final class AnonymousMemory: @unchecked Sendable {
  // @unchecked: the pointer is immutable; what threads do with the bytes is theirs to order.
  public let base: UnsafeMutableRawPointer
  public let length: Int

  /// Maps `length` bytes (rounded up to pages), readable and writable, not populated.
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

  public var address: UInt { UInt(bitPattern: base) }
  public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }
}
