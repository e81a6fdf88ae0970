import CBrokerWire

/// Writes a `BrokerToPlugin` that carries only page faults (and
/// `packets_applied`) straight in the protobuf wire format: the bytes
/// `protobuf_c_message_pack` makes for the same message, in the same order.
///
/// Why by hand: this is the one message every fault sends, and protobuf-c's
/// generic packer walks each nested message's descriptor twice (once for its
/// length prefix, once to write it); it was the largest single item of the
/// broker's user time per fault. Every other message, and every decode, still
/// goes through protobuf-c. Debug builds pack each batch both ways and compare,
/// and a unit test compares them on edge values.
enum FaultBatchWriter {
  // Field tags: (number << 3) | wire type (0 varint, 2 length-delimited).
  private static let eventsTag: UInt8 = 3 << 3 | 2          // BrokerToPlugin.events
  private static let packetsAppliedTag: UInt8 = 4 << 3      // BrokerToPlugin.packets_applied
  private static let pagefaultTag: UInt8 = 1 << 3 | 2       // Event.pagefault

  /// The most bytes one fault takes: two tags and two lengths of one byte
  /// each (a Pagefault is at most 72 bytes) and the fields at their longest.
  static let maxBytesPerFault = 4 + maxPagefaultBytes
  private static let maxPagefaultBytes = 5 * 11 + 6 + 11  // five uint64, a uint32, an int32 (sign-extended: 10 bytes)

  /// Writes the message into `out`, which must hold `count * maxBytesPerFault + 11` bytes.
  static func write(_ faults: UnsafePointer<Uffdbroker__Pagefault>, count: Int, packetsApplied: UInt64, into out: UnsafeMutablePointer<UInt8>) -> Int {
    var cursor = out
    for index in 0..<count {
      let fault = faults[index]
      let size = pagefaultSize(fault)
      cursor.put(eventsTag)
      cursor.putVarint(UInt64(size + 2))  // the Event: its tag, one length byte, the Pagefault
      cursor.put(pagefaultTag)
      cursor.putVarint(UInt64(size))
      cursor.putField(1, fault.fault_id)
      cursor.putField(2, fault.client_id)
      cursor.putField(3, fault.region_id)
      cursor.putField(4, fault.address)
      cursor.putField(5, fault.offset)
      cursor.putField(6, UInt64(fault.flags))
      cursor.putField(7, UInt64(bitPattern: Int64(fault.thread_id)))  // int32 is sign-extended on the wire
    }
    if packetsApplied != 0 {
      cursor.put(packetsAppliedTag)
      cursor.putVarint(packetsApplied)
    }
    return out.distance(to: cursor)
  }

  /// A Pagefault's encoded size: proto3 leaves out fields that are zero.
  private static func pagefaultSize(_ fault: Uffdbroker__Pagefault) -> Int {
    fieldSize(fault.fault_id) + fieldSize(fault.client_id) + fieldSize(fault.region_id) + fieldSize(fault.address)
      + fieldSize(fault.offset) + fieldSize(UInt64(fault.flags)) + fieldSize(UInt64(bitPattern: Int64(fault.thread_id)))
  }

  @inline(__always)
  private static func fieldSize(_ value: UInt64) -> Int { value == 0 ? 0 : 1 + varintSize(value) }

  @inline(__always)
  static func varintSize(_ value: UInt64) -> Int { (64 - (value | 1).leadingZeroBitCount + 6) / 7 }
}

extension UnsafeMutablePointer<UInt8> {
  @inline(__always)
  fileprivate mutating func put(_ byte: UInt8) {
    pointee = byte
    self += 1
  }

  @inline(__always)
  fileprivate mutating func putVarint(_ value: UInt64) {
    var value = value
    while value >= 0x80 {
      put(UInt8(truncatingIfNeeded: value) | 0x80)
      value >>= 7
    }
    put(UInt8(value))
  }

  /// A varint field with a one-byte tag (fields 1–15), left out when zero.
  @inline(__always)
  fileprivate mutating func putField(_ number: UInt8, _ value: UInt64) {
    guard value != 0 else { return }
    put(number << 3)
    putVarint(value)
  }
}
