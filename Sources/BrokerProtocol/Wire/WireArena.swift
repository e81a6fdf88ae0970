import CProtobufC
import Glibc

/// A bump allocator handed to protobuf-c's `unpack`, so decoding a message
/// costs no `malloc`: protobuf-c's own `free` is a no-op and `reset()` (before
/// the next decode) releases everything at once. Allocations of a page or more
/// are page aligned, so page bytes copied out of a message stay aligned.
///
/// Bounded: when the arena is full, a few overflow blocks are malloc'ed (freed
/// on reset); past that, allocation fails and so does the decode, which bounds
/// what a hostile peer can make us allocate.
public final class WireArena {
  private let base: UnsafeMutableRawPointer
  private let capacity: Int
  @exclusivity(unchecked) private var used = 0
  @exclusivity(unchecked) private var overflow: [UnsafeMutableRawPointer] = []
  private static let overflowLimit = 64
  private static let overflowBlockLimit = 8 << 20
  /// The allocator to pass to `*__unpack`; valid while this arena lives.
  @exclusivity(unchecked) public private(set) var allocator = ProtobufCAllocator()

  public init(capacity: Int = 4 << 20) {
    self.capacity = capacity
    base = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    overflow.reserveCapacity(Self.overflowLimit)
    allocator.alloc = { data, size in
      Unmanaged<WireArena>.fromOpaque(data!).takeUnretainedValue().allocate(size)
    }
    allocator.free = { _, _ in }
    allocator.allocator_data = Unmanaged.passUnretained(self).toOpaque()
  }

  deinit {
    reset()
    base.deallocate()
  }

  /// Releases every allocation; pointers into earlier decodes become invalid.
  public func reset() {
    used = 0
    for block in overflow { free(block) }
    overflow.removeAll(keepingCapacity: true)
  }

  /// Resets the arena and unpacks `bytes` into it with a generated `*__unpack`
  /// function; `what` names the message in the error for malformed bytes.
  func unpack<Message>(
    _ bytes: UnsafeRawBufferPointer, what: String,
    with unpack: (UnsafeMutablePointer<ProtobufCAllocator>?, Int, UnsafePointer<UInt8>?) -> UnsafeMutablePointer<Message>?
  ) throws(BrokerError) -> UnsafeMutablePointer<Message> {
    reset()
    let message = withUnsafeMutablePointer(to: &allocator) { unpack($0, bytes.count, bytes.baseAddress?.assumingMemoryBound(to: UInt8.self)) }
    guard let message else { throw BrokerError(.malformed, "\(what) could not be decoded") }
    return message
  }

  private func allocate(_ size: Int) -> UnsafeMutableRawPointer? {
    let alignment = size >= 4096 ? 4096 : 16
    let start = (used + alignment - 1) & ~(alignment - 1)
    if start + size <= capacity {
      used = start + size
      return base + start
    }
    guard overflow.count < Self.overflowLimit, size <= Self.overflowBlockLimit else { return nil }
    var block: UnsafeMutableRawPointer?
    guard posix_memalign(&block, alignment, max(size, 1)) == 0, let block else { return nil }
    overflow.append(block)
    return block
  }
}
