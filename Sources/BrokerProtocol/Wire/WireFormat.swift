// The protobuf wire format, for the hand-written codecs of the per-fault
// messages (FaultBatchWriter/Reader, DecisionBatchWriter/Reader). Each reads
// and writes exactly what protobuf-c does for the same message; see them for
// why they exist and how they are checked against protobuf-c.

/// Field tags with a one-byte encoding: (number << 3) | wire type.
enum WireTag {
  static func varint(_ number: UInt8) -> UInt8 { number << 3 }
  static func lengthDelimited(_ number: UInt8) -> UInt8 { number << 3 | 2 }
}

/// The encoded size of `value` as a varint.
@inline(__always)
func varintSize(_ value: UInt64) -> Int { (64 - (value | 1).leadingZeroBitCount + 6) / 7 }

/// The size of a varint field with a one-byte tag; proto3 leaves out zeros.
@inline(__always)
func varintFieldSize(_ value: UInt64) -> Int { value == 0 ? 0 : 1 + varintSize(value) }

extension UnsafeMutablePointer<UInt8> {
  @inline(__always)
  mutating func put(_ byte: UInt8) {
    pointee = byte
    self += 1
  }

  @inline(__always)
  mutating func putVarint(_ value: UInt64) {
    var value = value
    while value >= 0x80 {
      put(UInt8(truncatingIfNeeded: value) | 0x80)
      value >>= 7
    }
    put(UInt8(value))
  }

  /// A varint field with a one-byte tag (fields 1–15), left out when zero.
  @inline(__always)
  mutating func putVarintField(_ number: UInt8, _ value: UInt64) {
    guard value != 0 else { return }
    put(WireTag.varint(number))
    putVarint(value)
  }
}

/// Reads protobuf-encoded bytes as protobuf-c does. Every read returns nil
/// where protobuf-c would fail, or where the readers leave it to protobuf-c.
struct WireReader {
  var position: UnsafePointer<UInt8>
  let end: UnsafePointer<UInt8>

  init(at position: UnsafePointer<UInt8>, end: UnsafePointer<UInt8>) {
    self.position = position
    self.end = end
  }

  var isAtEnd: Bool { position >= end }

  mutating func byte() -> UInt8? {
    guard position < end else { return nil }
    defer { position += 1 }
    return position.pointee
  }

  /// A varint of at most 10 bytes, its low 64 bits (protobuf-c's uint64;
  /// its uint32, int32 and enums keep the low 32 of these).
  mutating func varint() -> UInt64? {
    var value: UInt64 = 0
    for index in 0..<10 {
      guard let byte = byte() else { return nil }
      value |= UInt64(byte & 0x7F) << (7 * index)
      if byte < 0x80 { return value }
    }
    return nil
  }

  /// protobuf-c's bool: true if any bit of the varint is set, even past the 64th.
  mutating func bool() -> Bool? {
    var any = false
    for _ in 0..<10 {
      guard let byte = byte() else { return nil }
      any = any || byte & 0x7F != 0
      if byte < 0x80 { return any }
    }
    return nil
  }

  /// A length prefix, then a reader of that many bytes (skipped here).
  /// protobuf-c reads at most 5 bytes of a length prefix (found by fuzzing:
  /// a longer one is an error there).
  mutating func lengthDelimited() -> WireReader? {
    var value: UInt64 = 0
    for index in 0..<5 {
      guard let byte = byte() else { return nil }
      value |= UInt64(byte & 0x7F) << (7 * index)
      if byte < 0x80 {
        guard value <= UInt64(position.distance(to: end)) else { return nil }
        defer { position += Int(value) }
        return WireReader(at: position, end: position + Int(value))
      }
    }
    return nil
  }

  /// The bytes of this reader.
  var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: position, count: position.distance(to: end)) }
}

/// What a hand-written reader read from a decoder's current packet, in place
/// of protobuf-c's message. `count` is nil when protobuf-c decoded the packet.
struct ReadInPlace<Item> {
  /// More items than this in one packet go to protobuf-c.
  static var capacity: Int { 1024 }
  /// nil for a decoder that leaves every packet to protobuf-c.
  let items: UnsafeMutablePointer<Item>?
  var count: Int?

  init(enabled: Bool) { items = enabled ? .allocate(capacity: Self.capacity) : nil }

  func deallocate() { items?.deallocate() }

  func item(at index: Int) -> Item? {
    guard let items, let count, index < count else { return nil }
    return items[index]
  }
}
