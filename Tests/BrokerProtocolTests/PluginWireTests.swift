import Testing
import Userfaultfd
@testable import BrokerProtocol

/// The broker ↔ plugin codecs (protobuf-c under the hood): what one side
/// encodes, the other decodes to the same values, in order, within the
/// packet bounds the encoders promise without measuring.
@Suite("Plugin wire codecs")
struct PluginWireTests {
  static let edges: [UInt64] = [0, 1, 127, 128, 16_383, 16_384, 1 << 35, 1 << 56, 1 << 63, .max]

  /// Faults through every varint length, zero fields, and negative thread ids (ten bytes each).
  static func faults(count: Int) -> [PagefaultEvent] {
    (0..<count).map { index in
      let edge = { (shift: Int) in edges[(index + shift) % edges.count] }
      return PagefaultEvent(
        faultID: edge(0), clientID: edge(1), regionID: edge(2), address: UInt(edge(3)), offset: edge(4),
        flags: .init(rawValue: UInt64(UInt32(truncatingIfNeeded: edge(5)))), threadID: [0, 1, -1, .max, .min, 4242][index % 6])
    }
  }

  static func withPacket<T>(_ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 8)
    defer { buffer.deallocate() }
    return try body(buffer)
  }

  @Test("fault batches round trip, up to a full batch of the widest faults", arguments: [1, 7, 512])
  func faultBatches(count: Int) throws {
    try Self.withPacket { buffer in
      for packetsApplied in [UInt64(0), 1, .max] {
        let faults = Self.faults(count: count)
        let encoder = EventBatchEncoder()
        faults.forEach(encoder.append)
        encoder.packetsApplied = packetsApplied
        let written = encoder.encode(into: buffer)
        #expect(written <= PacketSocket.maxPacketSize)
        let decoder = EventBatchDecoder()
        try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<written]))
        #expect(decoder.eventCount == count && decoder.packetsApplied == packetsApplied)
        for (index, fault) in faults.enumerated() { #expect(try decoder.event(at: index) == .pagefault(fault)) }
        #expect(encoder.isEmpty)
      }
    }
  }

  @Test("a packet carries its events, then its faults; an event after a fault waits for the next packet")
  func eventsBeforeFaults() throws {
    try Self.withPacket { buffer in
      let faults = Self.faults(count: 2)
      let encoder = EventBatchEncoder()
      let events: [BrokerEvent] = [
        .regionClosed(clientID: 9, regionID: 8), .removed(RangeEvent(clientID: 1, regionID: 2, range: 4096..<8192, startOffset: 0, swappedOut: true)),
        .closed(clientID: 9, reason: "gone"), .pagefault(faults[0]), .pagefault(faults[1]),
      ]
      for event in events {
        #expect(encoder.hasRoom(for: event))
        encoder.append(event)
      }
      // After a fault, only faults: a plugin applies a packet's events before its faults.
      #expect(!encoder.hasRoom(for: .regionClosed(clientID: 9, regionID: 9)) && encoder.hasRoom(for: .pagefault(faults[0])))
      let decoder = EventBatchDecoder()
      try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<encoder.encode(into: buffer)]))
      #expect(try (0..<decoder.eventCount).map { index throws(BrokerError) in try decoder.event(at: index) } == events)
      #expect(encoder.hasRoom(for: .regionClosed(clientID: 9, regionID: 9)))
    }
  }

  @Test("fault arrays of unequal lengths are refused")
  func unequalFaultArrays() {
    // BrokerToPlugin.faults (field 6) with two fault ids (field 1, packed fixed64) and no other array.
    var bytes: [UInt8] = [0x32, 18, 0x0A, 16]
    bytes += [UInt8](repeating: 1, count: 16)
    #expect(throws: BrokerError.self) { try bytes.withUnsafeBytes { try EventBatchDecoder().decode($0) } }
  }

  @Test("decision arrays of unequal lengths are refused; a decision of no kind (0, UNSPECIFIED) decodes as one the broker refuses")
  func decisionArrays() throws {
    // PluginToBroker.batch (field 7): one fault id (field 1, packed fixed64), no other array.
    let unequal: [UInt8] = [0x3A, 10, 0x0A, 8, 1, 0, 0, 0, 0, 0, 0, 0]
    #expect(throws: BrokerError.self) { try unequal.withUnsafeBytes { try DecisionBatchDecoder().decode($0) } }
    // A Decision (field 2) with fault id 5 and no kind.
    let noKind: [UInt8] = [0x12, 2, 0x08, 5]
    let decoder = DecisionBatchDecoder()
    try noKind.withUnsafeBytes { try decoder.decode($0) }
    #expect(decoder.decisionCount == 1 && decoder.decision(at: 0)?.faultID == 5 && decoder.decision(at: 0)?.kind == nil)
  }

  @Test("decisions round trip: every kind, inline bytes, shared offsets, edge values")
  func decisions() throws {
    let page = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13) })
    try Self.withPacket { buffer in
      try page.withUnsafeBytes { data in
        let sent: [DecodedDecision] = [
          DecodedDecision(faultID: 0, kind: .copy, address: 0x7F00_0000_0000, length: 4096, data: data),
          DecodedDecision(faultID: .max, kind: .zero, address: .max, length: 1 << 30, data: UnsafeRawBufferPointer(start: nil, count: 0)),
          DecodedDecision(faultID: 1 << 35, kind: .retry, address: 0, length: 0, data: UnsafeRawBufferPointer(start: nil, count: 0)),
          DecodedDecision(faultID: 3, kind: .poison, address: 4096, length: 4096, data: UnsafeRawBufferPointer(start: nil, count: 0)),
          DecodedDecision(faultID: 4, kind: .copy, address: 8192, length: 65536, data: UnsafeRawBufferPointer(start: nil, count: 0), sharedOffset: 1 << 20),
          DecodedDecision(faultID: 5, kind: .copy, address: 8192, length: 4096, data: UnsafeRawBufferPointer(start: nil, count: 0), sharedOffset: 0),
        ]
        let encoder = DecisionBatchEncoder()
        for d in sent {
          encoder.append(faultID: d.faultID, kind: d.kind!, address: d.address, length: d.length, data: d.data.isEmpty ? nil : d.data, sharedOffset: d.sharedOffset)
        }
        let written = encoder.encode(into: buffer)
        let decoder = DecisionBatchDecoder()
        try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<written]))
        #expect(decoder.decisionCount == sent.count)
        for (index, decision) in sent.enumerated() { #expect(decoder.decision(at: index) == decision) }
        #expect(decoder.decision(at: sent.count) == nil)
      }
    }
  }

  @Test("as many inline pages as canAppend allows fit one packet")
  func fullOfPages() throws {
    let page = [UInt8](repeating: 0xA5, count: 4096)
    try Self.withPacket { buffer in
      try page.withUnsafeBytes { data in
        let encoder = DecisionBatchEncoder()
        var faultID: UInt64 = .max
        while encoder.canAppend(dataLength: data.count) {
          encoder.append(faultID: faultID, kind: .copy, address: .max, length: .max, data: data)
          faultID -= 1
        }
        let count = encoder.count
        let written = encoder.encode(into: buffer)
        #expect(count > 50 && written <= PacketSocket.maxPacketSize)
        let decoder = DecisionBatchDecoder()
        try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<written]))
        #expect(decoder.decisionCount == count && decoder.decision(at: count - 1)?.data.elementsEqual(page) == true)
      }
    }
  }

  @Test("packets protobuf-c refuses are refused", arguments: [
    [0x1A, 0x05, 0x0A, 0x03, 0x08],              // truncated
    [0x1A, 0x80, 0x80, 0x80, 0x80, 0x10],        // a length prefix past INT_MAX
  ] as [[UInt8]])
  func refused(_ bytes: [UInt8]) {
    #expect(throws: BrokerError.self) { try bytes.withUnsafeBytes { try EventBatchDecoder().decode($0) } }
    #expect(throws: BrokerError.self) { try bytes.withUnsafeBytes { try DecisionBatchDecoder().decode($0) } }
  }
}
