import Testing
import Userfaultfd
@testable import BrokerProtocol

/// Decision packets read in place must decode exactly as protobuf-c decodes them.
@Suite("Decision batches read in place")
struct DecisionBatchReaderTests {
  /// Decodes `bytes` both ways; the results (or the refusal) must agree. The
  /// count of decisions (nil if refused): their bytes die with the array.
  static func bothWays(_ bytes: [UInt8]) -> (count: Int?, readInPlace: Bool) {
    bytes.withUnsafeBytes { raw in
      let (decisions, readInPlace) = compare(raw)
      return (decisions?.count, readInPlace)
    }
  }

  /// As `bothWays`; the decisions' bytes point into `raw`.
  static func compare(_ raw: UnsafeRawBufferPointer) -> (decisions: [DecodedDecision]?, readInPlace: Bool) {
    let fast = DecisionBatchDecoder()
    let slow = DecisionBatchDecoder(readsInPlace: false)
    let fastDecoded = decodes(fast, raw)
    #expect(fastDecoded == decodes(slow, raw), "one decoder refused what the other took")
    guard fastDecoded else { return (nil, false) }
    let decisions = (0..<fast.decisionCount).compactMap { fast.decision(at: $0) }
    let reference = (0..<slow.decisionCount).compactMap { slow.decision(at: $0) }
    #expect(decisions.count == reference.count)
    for (a, b) in zip(decisions, reference) {
      #expect(a.faultID == b.faultID && a.kind == b.kind && a.address == b.address && a.length == b.length && a.sharedOffset == b.sharedOffset)
      #expect(a.data.elementsEqual(b.data))
    }
    // In place: every decision's bytes lie inside the packet (nothing was copied).
    let inside = decisions.allSatisfy { decision in
      guard let start = decision.data.baseAddress, let packet = raw.baseAddress else { return decision.data.isEmpty }
      return packet <= start && start + decision.data.count <= packet + raw.count
    }
    #expect(inside || !fast.wasReadInPlace)
    return (decisions, fast.wasReadInPlace)
  }

  static func decodes(_ decoder: DecisionBatchDecoder, _ raw: UnsafeRawBufferPointer) -> Bool {
    do {
      try decoder.decode(raw)
      return true
    } catch {
      return false
    }
  }

  @Test("what the plugin SDK sends: every kind, inline bytes and shared offsets, edge values")
  func sdkPackets() {
    let encoder = DecisionBatchEncoder()
    let page = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7) })
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
    defer { buffer.deallocate() }
    page.withUnsafeBytes { data in
      encoder.append(faultID: 0, kind: .copy, address: 0x7F00_0000_0000, length: 4096, data: data)
      encoder.append(faultID: .max, kind: .zero, address: .max, length: 1 << 30)
      encoder.append(faultID: 1 << 35, kind: .retry, address: 0, length: 0)
      encoder.append(faultID: 3, kind: .poison, address: 4096, length: 4096)
      encoder.append(faultID: 4, kind: .copy, address: 8192, length: 65536, sharedOffset: 1 << 20)
      encoder.append(faultID: 5, kind: .copy, address: 8192, length: 4096, data: data)
      let count = encoder.encode(into: buffer)
      let (decisions, inPlace) = Self.compare(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
      #expect(decisions?.count == 6 && inPlace)
      #expect(decisions?.last?.data.elementsEqual(page) == true && decisions?[4].sharedOffset == 1 << 20)
    }
  }

  @Test("the wire's corners read as protobuf-c reads them", arguments: [
    // A field given twice: the last value wins (fault id 2, bytes "b").
    [0x12, 0x0A, 0x08, 0x01, 0x08, 0x02, 0x2A, 0x01, 0x61, 0x2A, 0x01, 0x62],
    // Overlong varints: fault id 1 in ten bytes, the kind's 10-byte varint keeps its low 32 bits.
    [0x12, 0x16, 0x08, 0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
     0x10, 0x83, 0x80, 0x80, 0x80, 0xF0, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
    // A bool whose only set bit lies past the 64th, and a shared offset.
    [0x12, 0x0E, 0x30, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02, 0x38, 0x80, 0x20],
    // An empty decision and an empty packet.
    [0x12, 0x00],
    [],
  ] as [[UInt8]])
  func corners(_ bytes: [UInt8]) {
    let (count, inPlace) = Self.bothWays(bytes)
    #expect(count != nil && inPlace)
  }

  @Test("anything else goes to protobuf-c: unknown fields, other messages, and what it refuses", arguments: [
    [0x12, 0x03, 0x78, 0x01, 0x00],        // decision field 15: unknown, kept by protobuf-c
    [0x0A, 0x02, 0x08, 0x01],              // a Hello
    [0x1A, 0x02, 0x08, 0x05],              // a RegionReply
    [0x12, 0x05, 0x08, 0x01],              // truncated decision
    [0x12, 0x03, 0x2A, 0x05, 0x61],        // bytes longer than their decision
    [0x12, 0x02, 0x0A, 0x00],              // fault id with the wrong wire type
    [0x12, 0x0B, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],  // unterminated varint
  ] as [[UInt8]])
  func declined(_ bytes: [UInt8]) {
    let (_, inPlace) = Self.bothWays(bytes)
    #expect(!inPlace)
  }
}
