import CBrokerWire
import Testing
import Userfaultfd
@testable import BrokerProtocol

/// The plugin's side of the hand-written codecs: fault packets read without
/// protobuf-c, decision packets written without it; both as protobuf-c would.
@Suite("Plugin-side wire codecs")
struct PluginSideCodecTests {
  /// Decodes `bytes` with and without `FaultBatchReader`: they must agree.
  static func bothWays(_ bytes: [UInt8]) -> (events: [BrokerEvent]?, readInPlace: Bool) {
    bytes.withUnsafeBytes { raw in compare(raw) }
  }

  static func compare(_ raw: UnsafeRawBufferPointer) -> (events: [BrokerEvent]?, readInPlace: Bool) {
    let fast = EventBatchDecoder()
    let slow = EventBatchDecoder(readsInPlace: false)
    let fastEvents = events(fast, raw)
    let slowEvents = events(slow, raw)
    #expect(fastEvents == slowEvents && fast.packetsApplied == slow.packetsApplied)
    return (fastEvents, fast.wasReadInPlace)
  }

  /// Every event of the packet, nil if the packet or one event is refused.
  static func events(_ decoder: EventBatchDecoder, _ raw: UnsafeRawBufferPointer) -> [BrokerEvent]? {
    do {
      try decoder.decode(raw)
      return try (0..<decoder.eventCount).map { index throws(BrokerError) in try decoder.event(at: index) }
    } catch {
      return nil
    }
  }

  @Test("the broker's fault batches are read without protobuf-c, to the same faults", arguments: [1, 3, 512])
  func faultBatches(count: Int) {
    let encoder = EventBatchEncoder()
    FaultBatchWriterTests.faults(count: count).forEach(encoder.append)
    encoder.packetsApplied = 77
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 8)
    defer { buffer.deallocate() }
    let (events, inPlace) = Self.bothWays(Array(buffer[..<encoder.encode(into: buffer)]))
    #expect(events?.count == count && inPlace)
  }

  @Test("the wire's corners read as protobuf-c reads them", arguments: [
    // A Pagefault given twice in one Event: the second replaces the first (fault id 2, no client id).
    [0x1A, 0x0A, 0x0A, 0x04, 0x08, 0x01, 0x10, 0x05, 0x0A, 0x02, 0x08, 0x02],
    // flags and thread id in ten bytes each: their low 32 bits; packets_applied twice: the last.
    [0x1A, 0x18, 0x0A, 0x16, 0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
     0x38, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x20, 0x05, 0x20, 0x06],
    // An empty Pagefault, and an empty packet.
    [0x1A, 0x02, 0x0A, 0x00],
    [],
  ] as [[UInt8]])
  func corners(_ bytes: [UInt8]) {
    let (events, inPlace) = Self.bothWays(bytes)
    #expect(events != nil && inPlace)
  }

  @Test("anything else goes to protobuf-c: other events, unknown fields, an Event of no kind, what it refuses", arguments: [
    [0x1A, 0x04, 0x32, 0x02, 0x08, 0x01],        // a RegionClosed
    [0x1A, 0x00],                                // an Event of no kind (the SDK refuses it)
    [0x1A, 0x04, 0x0A, 0x02, 0x40, 0x01],        // Pagefault field 8: unknown
    [0x0A, 0x02, 0x08, 0x01],                    // a Hello
    [0x1A, 0x05, 0x0A, 0x03, 0x08],              // truncated
    [0x1A, 0x80, 0x80, 0x80, 0x80, 0x10],        // a length prefix past INT_MAX
  ] as [[UInt8]])
  func declined(_ bytes: [UInt8]) {
    let (_, inPlace) = Self.bothWays(bytes)
    #expect(!inPlace)
  }

  @Test("decision packets are protobuf-c's bytes: every kind, inline bytes, shared offsets, edge values")
  func decisionBytes() {
    let page = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13) })
    let encoder = DecisionBatchEncoder()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 8)
    defer { buffer.deallocate() }
    page.withUnsafeBytes { data in
      let cases: [(UInt64, DecisionKind, UInt, Int, UnsafeRawBufferPointer?, UInt64?)] = [
        (0, .copy, 0x7F00_0000_0000, 4096, data, nil), (.max, .zero, .max, 1 << 30, nil, nil),
        (1 << 35, .retry, 0, 0, nil, nil), (3, .poison, 4096, 4096, nil, nil),
        (4, .copy, 8192, 65536, nil, 1 << 20), (5, .copy, 8192, 4096, nil, 0), (6, .copy, 1, 1, UnsafeRawBufferPointer(rebasing: data[..<1]), nil),
      ]
      for (faultID, kind, address, length, bytes, shared) in cases {
        encoder.append(faultID: faultID, kind: kind, address: address, length: length, data: bytes, sharedOffset: shared)
      }
      let written = encoder.encode(into: buffer)
      #expect(Array(buffer[..<written]) == Self.protobufC(cases.map { ($0.0, $0.1, $0.2, $0.3, $0.4, $0.5) }))
    }
  }

  /// protobuf-c's bytes for these decisions, from C structs built here.
  static func protobufC(_ cases: [(UInt64, DecisionKind, UInt, Int, UnsafeRawBufferPointer?, UInt64?)]) -> [UInt8] {
    var decisions = cases.map { faultID, kind, address, length, data, shared in
      var d = Uffdbroker__Decision()
      uffdbroker__decision__init(&d)
      d.fault_id = faultID
      d.kind = Uffdbroker__DecisionKind(rawValue: UInt32(kind.rawValue))
      d.address = UInt64(address)
      d.length = UInt64(length)
      d.data = ProtobufCBinaryData(len: data?.count ?? 0, data: UnsafeMutablePointer(mutating: data?.baseAddress?.assumingMemoryBound(to: UInt8.self)))
      d.shared = shared == nil ? 0 : 1
      d.shared_offset = shared ?? 0
      return d
    }
    return decisions.withUnsafeMutableBufferPointer { d in
      var pointers: [UnsafeMutablePointer<Uffdbroker__Decision>?] = (0..<d.count).map { d.baseAddress! + $0 }
      return pointers.withUnsafeMutableBufferPointer { pointers in
        var message = Uffdbroker__PluginToBroker()
        uffdbroker__plugin_to_broker__init(&message)
        message.n_decisions = pointers.count
        message.decisions = pointers.baseAddress
        return DecisionBatchEncoder.packedByProtobufC(message)
      }
    }
  }
}
