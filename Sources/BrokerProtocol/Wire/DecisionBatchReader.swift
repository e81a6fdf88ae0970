/// Reads a `PluginToBroker` that carries only decisions where it lies: a
/// decision's bytes are left in the packet, not copied out.
///
/// Why by hand: the broker receives one such packet per fault, and protobuf-c
/// copies every `bytes` field into its allocator: a 4 KiB copy per fault plus
/// its generic field walk, about an eighth of the broker's user time per fault.
/// The reader takes only the plain layout (top-level field 2 only; in a
/// decision, fields 1–7 with their own wire types) and answers nil for
/// anything else, which protobuf-c then decodes (or refuses). Where it answers,
/// it reads what protobuf-c reads: a repeated field's last value wins, varints
/// of up to 10 bytes keep their low 64 bits (32 for the enum), a bool is true
/// if any of its varint's bits is, a length prefix has at most 5 bytes. Debug builds decode each packet both ways and
/// compare; the fuzzer compares the two on every input.
enum DecisionBatchReader {
  /// Reads up to `capacity` decisions into `out`; nil if the packet is not in
  /// the plain layout, is malformed, or holds more decisions.
  static func read(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutablePointer<DecodedDecision>, capacity: Int) -> Int? {
    guard let base = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return 0 }  // empty: no decisions
    var cursor = Cursor(at: base, end: base + bytes.count)
    var count = 0
    while !cursor.isAtEnd {
      guard count < capacity, cursor.byte() == 2 << 3 | 2, let length = cursor.length(),
            let decision = readDecision(Cursor(at: cursor.position, end: cursor.position + length))
      else { return nil }
      cursor.position += length
      out[count] = decision
      count += 1
    }
    return count
  }

  private static func readDecision(_ fields: Cursor) -> DecodedDecision? {
    var cursor = fields
    var faultID: UInt64 = 0, kind: UInt64 = 0, address: UInt64 = 0, length: UInt64 = 0, sharedOffset: UInt64 = 0
    var shared = false
    var data = UnsafeRawBufferPointer(start: nil, count: 0)
    while !cursor.isAtEnd {
      guard let tag = cursor.byte() else { return nil }
      switch tag {
      case 1 << 3: guard let value = cursor.varint() else { return nil }; faultID = value
      case 2 << 3: guard let value = cursor.varint() else { return nil }; kind = value
      case 3 << 3: guard let value = cursor.varint() else { return nil }; address = value
      case 4 << 3: guard let value = cursor.varint() else { return nil }; length = value
      case 5 << 3 | 2:
        guard let count = cursor.length() else { return nil }
        data = UnsafeRawBufferPointer(start: cursor.position, count: count)
        cursor.position += count
      case 6 << 3: guard let value = cursor.bool() else { return nil }; shared = value
      case 7 << 3: guard let value = cursor.varint() else { return nil }; sharedOffset = value
      default: return nil
      }
    }
    return DecodedDecision(faultID: faultID, kind: UInt32(truncatingIfNeeded: kind), address: address, length: length,
                           data: data, sharedOffset: shared ? sharedOffset : nil)
  }

  private struct Cursor {
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

    /// A varint of at most 10 bytes, its low 64 bits.
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

    /// A length prefix that fits in what is left. protobuf-c reads at most 5
    /// bytes of it (found by fuzzing: a longer one is an error there).
    mutating func length() -> Int? {
      var value: UInt64 = 0
      for index in 0..<5 {
        guard let byte = byte() else { return nil }
        value |= UInt64(byte & 0x7F) << (7 * index)
        if byte < 0x80 { return value <= UInt64(position.distance(to: end)) ? Int(value) : nil }
      }
      return nil
    }
  }
}
