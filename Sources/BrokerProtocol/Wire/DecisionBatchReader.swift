/// Reads a `PluginToBroker` that carries only decisions where it lies: a
/// decision's bytes are left in the packet, not copied out.
///
/// Why by hand: the broker receives one such packet per fault, and protobuf-c
/// copies every `bytes` field into its allocator: a 4 KiB copy per fault plus
/// its generic field walk, about an eighth of the broker's user time per fault.
/// The reader takes only the plain layout (top-level field 2 only; in a
/// decision, fields 1–7 with their own wire types) and answers nil for
/// anything else, which protobuf-c then decodes (or refuses). Where it answers,
/// it reads what protobuf-c reads (`WireReader`); a repeated field's last value
/// wins. Debug builds decode each packet both ways and compare; the fuzzer
/// compares the two on every input.
enum DecisionBatchReader {
  /// Reads up to `capacity` decisions into `out`; nil if the packet is not in
  /// the plain layout, is malformed, or holds more decisions.
  static func read(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutablePointer<DecodedDecision>, capacity: Int) -> Int? {
    guard let base = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return 0 }  // empty: no decisions
    var reader = WireReader(at: base, end: base + bytes.count)
    var count = 0
    while !reader.isAtEnd {
      guard count < capacity, reader.byte() == WireTag.lengthDelimited(2), let fields = reader.lengthDelimited(),
            let decision = readDecision(fields)
      else { return nil }
      out[count] = decision
      count += 1
    }
    return count
  }

  private static func readDecision(_ fields: WireReader) -> DecodedDecision? {
    var reader = fields
    var faultID: UInt64 = 0, kind: UInt64 = 0, address: UInt64 = 0, length: UInt64 = 0, sharedOffset: UInt64 = 0
    var shared = false
    var data = UnsafeRawBufferPointer(start: nil, count: 0)
    while !reader.isAtEnd {
      switch reader.byte() {
      case WireTag.varint(1): guard let value = reader.varint() else { return nil }; faultID = value
      case WireTag.varint(2): guard let value = reader.varint() else { return nil }; kind = value
      case WireTag.varint(3): guard let value = reader.varint() else { return nil }; address = value
      case WireTag.varint(4): guard let value = reader.varint() else { return nil }; length = value
      case WireTag.lengthDelimited(5): guard let bytes = reader.lengthDelimited() else { return nil }; data = bytes.bytes
      case WireTag.varint(6): guard let value = reader.bool() else { return nil }; shared = value
      case WireTag.varint(7): guard let value = reader.varint() else { return nil }; sharedOffset = value
      default: return nil
      }
    }
    return DecodedDecision(faultID: faultID, kind: UInt32(truncatingIfNeeded: kind), address: address, length: length,
                           data: data, sharedOffset: shared ? sharedOffset : nil)
  }
}
