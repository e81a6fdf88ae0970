import CBrokerWire

/// Writes a `BrokerToPlugin` that carries only page faults (and
/// `packets_applied`) straight in the protobuf wire format: the bytes
/// `protobuf_c_message_pack` makes for the same message, in the same order.
///
/// Why by hand: this is the one message every fault sends, and protobuf-c's
/// generic packer walks each nested message's descriptor twice (once for its
/// length prefix, once to write it); it was the largest single item of the
/// broker's user time per fault. Debug builds pack each batch both ways and
/// compare, and a unit test compares them on edge values.
enum FaultBatchWriter {
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
      cursor.put(WireTag.lengthDelimited(3))  // BrokerToPlugin.events
      cursor.putVarint(UInt64(size + 2))       // the Event: its tag, one length byte, the Pagefault
      cursor.put(WireTag.lengthDelimited(1))  // Event.pagefault
      cursor.putVarint(UInt64(size))
      cursor.putVarintField(1, fault.fault_id)
      cursor.putVarintField(2, fault.client_id)
      cursor.putVarintField(3, fault.region_id)
      cursor.putVarintField(4, fault.address)
      cursor.putVarintField(5, fault.offset)
      cursor.putVarintField(6, UInt64(fault.flags))
      cursor.putVarintField(7, UInt64(bitPattern: Int64(fault.thread_id)))  // int32 is sign-extended on the wire
    }
    cursor.putVarintField(4, packetsApplied)  // BrokerToPlugin.packets_applied
    return out.distance(to: cursor)
  }

  /// A Pagefault's encoded size: proto3 leaves out fields that are zero.
  private static func pagefaultSize(_ fault: Uffdbroker__Pagefault) -> Int {
    varintFieldSize(fault.fault_id) + varintFieldSize(fault.client_id) + varintFieldSize(fault.region_id) + varintFieldSize(fault.address)
      + varintFieldSize(fault.offset) + varintFieldSize(UInt64(fault.flags)) + varintFieldSize(UInt64(bitPattern: Int64(fault.thread_id)))
  }
}
