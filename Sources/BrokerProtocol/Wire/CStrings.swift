import CBrokerWire
import Glibc

/// C strings (and region structs) that must outlive one `pack` call: freed together.
///
/// Exclusivity is unchecked: `reset()` reads the three arrays after every event
/// batch, and with dynamic checks the event micro-benchmark took ~20 ns more
/// (111 → 134 ns; README, Benchmark). A pool is used by one thread.
final class CStringPool {
  @exclusivity(unchecked) private var strings: [UnsafeMutablePointer<CChar>] = []
  @exclusivity(unchecked) private var regions: [UnsafeMutablePointer<Uffdbroker__Region>] = []
  @exclusivity(unchecked) private var arrays: [UnsafeMutableRawPointer] = []

  deinit { reset() }

  func reset() {
    guard !(strings.isEmpty && regions.isEmpty && arrays.isEmpty) else { return }  // every batch of faults
    strings.forEach { free($0) }
    regions.forEach { $0.deallocate() }
    arrays.forEach { $0.deallocate() }
    arrays.removeAll(keepingCapacity: true)
    strings.removeAll(keepingCapacity: true)
    regions.removeAll(keepingCapacity: true)
  }

  func string(_ value: String) -> UnsafeMutablePointer<CChar> {
    let copy = strdup(value)!
    strings.append(copy)
    return copy
  }

  /// A packed-ready `Region` message for `spec`, alive until `reset()`.
  func region(_ spec: RegionSpec) -> UnsafeMutablePointer<Uffdbroker__Region> {
    let message = UnsafeMutablePointer<Uffdbroker__Region>.allocate(capacity: 1)
    uffdbroker__region__init(message)
    message.pointee.id = spec.id
    message.pointee.address = UInt64(spec.base)
    message.pointee.length = UInt64(spec.length)
    message.pointee.page_size = UInt32(clamping: spec.pageSize)
    message.pointee.plugin = string(spec.plugin)
    message.pointee.argument = string(spec.argument)
    message.pointee.backing_offset = spec.backingOffset
    if case .sharedMemory(let fileOffset) = spec.backing {
      message.pointee.backing = UFFDBROKER__BACKING__BACKING_SHARED_MEMORY
      message.pointee.file_offset = fileOffset
    }
    (message.pointee.n_swapped_out, message.pointee.swapped_out) = extents(spec.swappedOut)
    (message.pointee.n_pieces, message.pointee.pieces) = pieces(spec.pieces)
    (message.pointee.n_dropped, message.pointee.dropped) = extents(spec.dropped)
    (message.pointee.n_unknown, message.pointee.unknown) = extents(spec.unknown)
    regions.append(message)
    return message
  }

  /// A repeated `string` field; freed with the pool.
  func strings(_ values: [String]) -> (Int, UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) {
    guard !values.isEmpty else { return (0, nil) }
    let array = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: values.count)
    for (index, value) in values.enumerated() { array[index] = string(value) }
    arrays.append(UnsafeMutableRawPointer(array))
    return (values.count, array)
  }

  /// A repeated message field, one message per value (`initialize`d, then `fill`ed); freed with the pool.
  func repeated<Value, Message>(
    _ values: [Value], initialize: (UnsafeMutablePointer<Message>) -> Void, _ fill: (inout Message, Value) -> Void
  ) -> (Int, UnsafeMutablePointer<UnsafeMutablePointer<Message>?>?) {
    guard !values.isEmpty else { return (0, nil) }
    let messages = UnsafeMutablePointer<Message>.allocate(capacity: values.count)
    let pointers = UnsafeMutablePointer<UnsafeMutablePointer<Message>?>.allocate(capacity: values.count)
    for (index, value) in values.enumerated() {
      initialize(messages + index)
      fill(&messages[index], value)
      pointers[index] = messages + index
    }
    arrays.append(UnsafeMutableRawPointer(messages))
    arrays.append(UnsafeMutableRawPointer(pointers))
    return (values.count, pointers)
  }

  func pieces(_ pieces: [RegionPiece]) -> (Int, UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Piece>?>?) {
    repeated(pieces, initialize: uffdbroker__piece__init) { message, piece in
      message.address = UInt64(piece.address)
      message.offset = piece.offset
      message.length = UInt64(piece.length)
    }
  }

  func extents(_ ranges: [Range<UInt64>]) -> (Int, UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Extent>?>?) {
    repeated(ranges, initialize: uffdbroker__extent__init) { message, range in
      message.offset = range.lowerBound
      message.length = range.upperBound - range.lowerBound
    }
  }

  /// A packed repeated integer field's values; freed with the pool.
  func integers(_ values: [UInt64]) -> (Int, UnsafeMutablePointer<UInt64>?) {
    guard !values.isEmpty else { return (0, nil) }
    let array = UnsafeMutablePointer<UInt64>.allocate(capacity: values.count)
    array.initialize(from: values, count: values.count)
    arrays.append(UnsafeMutableRawPointer(array))
    return (values.count, array)
  }

  /// A pointer array for a repeated field; freed with the pool.
  func regionArray(_ specs: [RegionSpec]) -> UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Region>?> {
    let array = UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Region>?>.allocate(capacity: max(specs.count, 1))
    for (index, spec) in specs.enumerated() { array[index] = region(spec) }
    arrays.append(UnsafeMutableRawPointer(array))
    return array
  }
}

extension RegionSpec {
  /// Reads a decoded `Region`; checks the numbers fit this platform.
  init(decoding message: UnsafePointer<Uffdbroker__Region>) throws(BrokerError) {
    let m = message.pointee
    guard m.length <= UInt64(Int.max), m.address <= UInt64(UInt.max) else { throw BrokerError(.badRegion, "region \(m.id) does not fit the address space") }
    self.init(
      id: m.id, base: UInt(m.address), length: Int(m.length), pageSize: Int(m.page_size),
      plugin: String(cString: m.plugin), argument: String(cString: m.argument), backingOffset: m.backing_offset,
      swappedOut: try decodeExtents(m.n_swapped_out, m.swapped_out, of: "region \(m.id)"),
      pieces: try decodePieces(m.n_pieces, m.pieces, of: "region \(m.id)"),
      dropped: try decodeExtents(m.n_dropped, m.dropped, of: "region \(m.id)"),
      unknown: try decodeExtents(m.n_unknown, m.unknown, of: "region \(m.id)"),
      backing: try Self.backing(m))
  }

  /// An unknown backing is refused: a broker must not fill memory in a way it does not know.
  private static func backing(_ m: Uffdbroker__Region) throws(BrokerError) -> Backing {
    switch m.backing {
    case UFFDBROKER__BACKING__BACKING_ANONYMOUS: return .anonymous
    case UFFDBROKER__BACKING__BACKING_SHARED_MEMORY: return .sharedMemory(fileOffset: m.file_offset)
    default: throw BrokerError(.badRegion, "region \(m.id): unknown backing \(m.backing.rawValue)")
    }
  }
}

/// Reads a repeated `Piece` field: at most `RegionSpec.maxExtents`, each fitting the address space.
func decodePieces(_ count: Int, _ pieces: UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Piece>?>?, of what: String) throws(BrokerError) -> [RegionPiece] {
  guard count <= RegionSpec.maxPieces else { throw BrokerError(.limit, "\(what): more than \(RegionSpec.maxPieces) pieces") }
  var result: [RegionPiece] = []
  for index in 0..<count {
    guard let piece = pieces?[index]?.pointee, piece.length <= UInt64(Int.max), piece.address <= UInt64(UInt.max) - piece.length,
          piece.offset <= UInt64.max - piece.length
    else { throw BrokerError(.malformed, "\(what): piece \(index) does not fit the address space") }
    result.append(RegionPiece(address: UInt(piece.address), offset: piece.offset, length: Int(piece.length)))
  }
  return result
}

/// Reads a repeated `Extent` field: at most `RegionSpec.maxExtents`, none wrapping past 2^64.
func decodeExtents(_ count: Int, _ extents: UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Extent>?>?, of what: String) throws(BrokerError) -> [Range<UInt64>] {
  guard count <= RegionSpec.maxExtents else { throw BrokerError(.limit, "\(what): more than \(RegionSpec.maxExtents) extents") }
  var ranges: [Range<UInt64>] = []
  ranges.reserveCapacity(count)
  for index in 0..<count {
    // No region is longer than Int.max: a longer extent would also trap `Range.count` (found by fuzzing).
    guard let extent = extents?[index]?.pointee, extent.length <= UInt64(Int.max), extent.offset <= UInt64.max - extent.length else {
      throw BrokerError(.malformed, "\(what): extent \(index) is too long or wraps")
    }
    ranges.append(extent.offset..<extent.offset + extent.length)
  }
  return ranges
}

extension Hello {
  init(decoding message: UnsafePointer<Uffdbroker__Hello>) throws(BrokerError) {
    // protobuf-c stores any 32-bit value for an enum: a peer's -1 arrives as
    // 0xFFFFFFFF, which `Int32(_:)` would trap on (found by fuzzing).
    let raw = Int32(bitPattern: message.pointee.role.rawValue)
    guard let role = Role(rawValue: raw) else {
      throw BrokerError(.version, "unknown role \(raw) in Hello")
    }
    self.init(role: role, name: String(cString: message.pointee.name), version: message.pointee.version)
  }

  func encode(into message: inout Uffdbroker__Hello, pool: CStringPool) {
    uffdbroker__hello__init(&message)
    message.version = version
    message.role = Uffdbroker__Role(rawValue: UInt32(role.rawValue))
    message.name = pool.string(name)
  }
}

extension BrokerError {
  init(decoding message: UnsafePointer<Uffdbroker__Error>) {
    // Any 32-bit value may arrive (see Hello); the transport-only codes (100
    // and up) never go on the wire, so they read as unknown too, not as
    // `.disconnected` & co. (both found by fuzzing).
    let code = Code(rawValue: Int32(bitPattern: message.pointee.code.rawValue)).flatMap { $0.rawValue < 100 ? $0 : nil }
    self.init(code ?? .unspecified, String(cString: message.pointee.message))
  }

  func encode(into message: inout Uffdbroker__Error, pool: CStringPool) {
    uffdbroker__error__init(&message)
    // Transport-only codes never go on the wire as such.
    let wire: Code = code.rawValue < 100 ? code : .internal
    message.code = Uffdbroker__ErrorCode(rawValue: UInt32(wire.rawValue))
    message.message = pool.string(self.message)
  }
}

/// The names of a `DescriptorStore`: at most `DescriptorStoreLimits.descriptors`, each 1 to `nameBytes` bytes.
func decodeStoreNames(_ store: UnsafeMutablePointer<Uffdbroker__DescriptorStore>?) throws(BrokerError) -> [String] {
  guard let store = store?.pointee else { return [] }
  guard store.n_names <= DescriptorStoreLimits.descriptors else {
    throw BrokerError(.limit, "a descriptor store holds at most \(DescriptorStoreLimits.descriptors) descriptors")
  }
  var names: [String] = []
  for index in 0..<store.n_names {
    guard let raw = store.names[index] else { throw BrokerError(.malformed, "a descriptor store name is missing") }
    let name = String(cString: raw)
    guard !name.isEmpty, name.utf8.count <= DescriptorStoreLimits.nameBytes else {
      throw BrokerError(.malformed, "a descriptor store name must have 1 to \(DescriptorStoreLimits.nameBytes) bytes")
    }
    names.append(name)
  }
  return names
}
