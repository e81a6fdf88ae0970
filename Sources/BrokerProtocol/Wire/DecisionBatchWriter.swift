import CBrokerWire
import Glibc

/// Writes a `PluginToBroker` that carries only decisions (what a plugin sends
/// for every fault) straight in the protobuf wire format: the bytes
/// `protobuf_c_message_pack` makes for the same message, in the same order.
/// Why by hand, and how it is checked: as `FaultBatchWriter`.
enum DecisionBatchWriter {
  /// Writes the decisions into `out`, which must hold their bytes plus `DecisionBatchEncoder.decisionBound` each.
  static func write(_ decisions: UnsafePointer<Uffdbroker__Decision>, count: Int, into out: UnsafeMutablePointer<UInt8>) -> Int {
    var cursor = out
    for index in 0..<count {
      let decision = decisions[index]
      let kind = UInt64(bitPattern: Int64(Int32(bitPattern: decision.kind.rawValue)))  // an enum is an int32 on the wire
      let data = decision.data.len
      let size = varintFieldSize(decision.fault_id) + varintFieldSize(kind) + varintFieldSize(decision.address)
        + varintFieldSize(decision.length) + (data == 0 ? 0 : 1 + varintSize(UInt64(data)) + data)
        + (decision.shared == 0 ? 0 : 2) + varintFieldSize(decision.shared_offset)
      cursor.put(WireTag.lengthDelimited(2))  // PluginToBroker.decisions
      cursor.putVarint(UInt64(size))
      cursor.putVarintField(1, decision.fault_id)
      cursor.putVarintField(2, kind)
      cursor.putVarintField(3, decision.address)
      cursor.putVarintField(4, decision.length)
      if data > 0 {
        cursor.put(WireTag.lengthDelimited(5))
        cursor.putVarint(UInt64(data))
        memcpy(cursor, decision.data.data, data)
        cursor += data
      }
      cursor.putVarintField(6, decision.shared == 0 ? 0 : 1)
      cursor.putVarintField(7, decision.shared_offset)
    }
    return out.distance(to: cursor)
  }
}
