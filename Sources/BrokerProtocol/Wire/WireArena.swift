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
  /// The allocator's state lives outside the object: protobuf-c calls back
  /// with a raw pointer to it, and no reference is retained per allocation.
  private struct State {
    var base: UnsafeMutableRawPointer
    var capacity: Int
    var used = 0
    var overflow: UnsafeMutablePointer<UnsafeMutableRawPointer>
    var overflowCount = 0
  }
  private let state: UnsafeMutablePointer<State>
  private static let overflowLimit = 64
  private static let overflowBlockLimit = 8 << 20
  /// The allocator to pass to `*__unpack`; valid while this arena lives.
  public private(set) var allocator = ProtobufCAllocator()

  /// An arena of `capacity` bytes (page aligned), allocated once.
  public init(capacity: Int = 4 << 20) {
    state = .allocate(capacity: 1)
    state.initialize(to: State(
      base: UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096), capacity: capacity,
      overflow: .allocate(capacity: Self.overflowLimit)))
    allocator.alloc = { data, size in WireArena.allocate(size, in: data!.assumingMemoryBound(to: State.self)) }
    allocator.free = { _, _ in }
    allocator.allocator_data = UnsafeMutableRawPointer(state)
  }

  deinit {
    reset()
    state.pointee.base.deallocate()
    state.pointee.overflow.deallocate()
    state.deallocate()
  }

  /// Releases every allocation; pointers into earlier decodes become invalid.
  public func reset() {
    state.pointee.used = 0
    for index in 0..<state.pointee.overflowCount { free(state.pointee.overflow[index]) }
    state.pointee.overflowCount = 0
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

  private static func allocate(_ size: Int, in state: UnsafeMutablePointer<State>) -> UnsafeMutableRawPointer? {
    let alignment = size >= 4096 ? 4096 : 16
    let start = (state.pointee.used + alignment - 1) & ~(alignment - 1)
    if start + size <= state.pointee.capacity {
      state.pointee.used = start + size
      return state.pointee.base + start
    }
    guard state.pointee.overflowCount < overflowLimit, size <= overflowBlockLimit else { return nil }
    var block: UnsafeMutableRawPointer?
    guard posix_memalign(&block, alignment, max(size, 1)) == 0, let block else { return nil }
    state.pointee.overflow[state.pointee.overflowCount] = block
    state.pointee.overflowCount += 1
    return block
  }
}

/// protobuf-c's bytes for `message`: measured, then packed into an array of that size.
func protobufCPacked<Message>(
  _ message: Message, size: (UnsafePointer<Message>?) -> Int, pack: (UnsafePointer<Message>?, UnsafeMutablePointer<UInt8>?) -> Int
) -> [UInt8] {
  withUnsafePointer(to: message) { pointer in
    var bytes = [UInt8](repeating: 0, count: size(pointer))
    _ = pack(pointer, &bytes)
    return bytes
  }
}
