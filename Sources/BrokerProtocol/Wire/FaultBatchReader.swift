/// Reads a `BrokerToPlugin` that carries only page faults (and
/// `packets_applied`): what a plugin receives for every fault.
///
/// Why by hand: protobuf-c unpacks each fault into three nested messages it
/// allocates and initialises, a good part of the plugin's user time per
/// fault. The reader takes only the plain layout (top-level fields 3 and 4; an
/// Event holding field 1; a Pagefault's fields 1–7 as varints) and answers nil
/// for anything else, which protobuf-c then decodes (or refuses). Where it
/// answers, it reads what protobuf-c reads (`WireReader`): a repeated field's
/// last value wins, and a Pagefault given twice in one Event replaces the
/// first (a oneof member is replaced, not merged). Debug builds decode each
/// packet both ways and compare; the fuzzer compares the two on every input.
enum FaultBatchReader {
  /// Reads up to `capacity` faults into `out`; nil if the packet is not in the
  /// plain layout, is malformed, or holds more faults.
  static func read(_ bytes: UnsafeRawBufferPointer, into out: UnsafeMutablePointer<PagefaultEvent>, capacity: Int) -> (count: Int, packetsApplied: UInt64)? {
    guard let base = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return (0, 0) }  // empty: no events
    var reader = WireReader(at: base, end: base + bytes.count)
    var count = 0
    var packetsApplied: UInt64 = 0
    while !reader.isAtEnd {
      switch reader.byte() {
      case WireTag.lengthDelimited(3):
        guard count < capacity, let event = reader.lengthDelimited(), let fault = readEvent(event) else { return nil }
        out[count] = fault
        count += 1
      case WireTag.varint(4):
        guard let value = reader.varint() else { return nil }
        packetsApplied = value
      default:
        return nil
      }
    }
    return (count, packetsApplied)
  }

  /// nil also for an Event of no kind: protobuf-c decodes it, and the SDK refuses it.
  private static func readEvent(_ event: WireReader) -> PagefaultEvent? {
    var reader = event
    var fault: PagefaultEvent?
    while !reader.isAtEnd {
      guard reader.byte() == WireTag.lengthDelimited(1), let fields = reader.lengthDelimited(), let read = readPagefault(fields) else { return nil }
      fault = read
    }
    return fault
  }

  private static func readPagefault(_ fields: WireReader) -> PagefaultEvent? {
    var reader = fields
    var faultID: UInt64 = 0, clientID: UInt64 = 0, regionID: UInt64 = 0, address: UInt64 = 0, offset: UInt64 = 0, flags: UInt64 = 0, thread: UInt64 = 0
    while !reader.isAtEnd {
      let tag = reader.byte()
      guard let value = reader.varint() else { return nil }
      switch tag {
      case WireTag.varint(1): faultID = value
      case WireTag.varint(2): clientID = value
      case WireTag.varint(3): regionID = value
      case WireTag.varint(4): address = value
      case WireTag.varint(5): offset = value
      case WireTag.varint(6): flags = value
      case WireTag.varint(7): thread = value
      default: return nil
      }
    }
    // uint32 and int32 fields keep the low 32 bits of their varint.
    return PagefaultEvent(faultID: faultID, clientID: clientID, regionID: regionID, address: UInt(address), offset: offset,
                          flags: .init(rawValue: UInt64(UInt32(truncatingIfNeeded: flags))), threadID: Int32(truncatingIfNeeded: thread))
  }
}
