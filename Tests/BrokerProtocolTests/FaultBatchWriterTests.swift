import CBrokerWire
import Testing
import Userfaultfd
@testable import BrokerProtocol

/// The hand-written fault batch must be exactly what protobuf-c packs for the
/// same message, and decode back to the same faults.
@Suite("Fault batch wire format")
struct FaultBatchWriterTests {
  static let edges: [UInt64] = [0, 1, 127, 128, 16_383, 16_384, 1 << 35, 1 << 56, 1 << 63, .max]

  /// Faults through every varint length, zero fields (left out), and negative thread ids (ten bytes).
  static func faults(count: Int) -> [PagefaultEvent] {
    (0..<count).map { index in
      let edge = { (shift: Int) in edges[(index + shift) % edges.count] }
      return PagefaultEvent(
        faultID: edge(0), clientID: edge(1), regionID: edge(2), address: UInt(edge(3)), offset: edge(4),
        flags: .init(rawValue: UInt64(UInt32(truncatingIfNeeded: edge(5)))), threadID: [0, 1, -1, .max, .min, 4242][index % 6])
    }
  }

  @Test("bytes equal protobuf-c's", arguments: [1, 2, 7, 512])
  func sameBytes(count: Int) throws {
    for packetsApplied in [UInt64(0), 1, .max] {
      let faults = Self.faults(count: count)
      let encoder = EventBatchEncoder()
      faults.forEach(encoder.append)
      encoder.packetsApplied = packetsApplied
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 8)
      defer { buffer.deallocate() }
      let written = encoder.encode(into: buffer)
      #expect(Array(buffer[..<written]) == Self.protobufC(faults, packetsApplied: packetsApplied))

      let decoder = EventBatchDecoder()
      try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<written]))
      #expect(decoder.eventCount == count && decoder.packetsApplied == packetsApplied)
      for (index, fault) in faults.enumerated() {
        #expect(try decoder.event(at: index) == .pagefault(fault))
      }
    }
  }

  @Test("a batch with any other event is packed by protobuf-c and still decodes in order")
  func mixed() throws {
    let faults = Self.faults(count: 3)
    let encoder = EventBatchEncoder()
    encoder.append(faults[0])
    encoder.append(.regionClosed(clientID: 9, regionID: 8))
    encoder.append(faults[1])
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 8)
    defer { buffer.deallocate() }
    let decoder = EventBatchDecoder()
    try decoder.decode(UnsafeRawBufferPointer(rebasing: buffer[..<encoder.encode(into: buffer)]))
    #expect(try decoder.event(at: 0) == .pagefault(faults[0]))
    #expect(try decoder.event(at: 1) == .regionClosed(clientID: 9, regionID: 8))
    #expect(try decoder.event(at: 2) == .pagefault(faults[1]))
    // The next batch, faults only again, takes the fast path: protobuf-c's bytes.
    encoder.append(faults[2])
    let written = encoder.encode(into: buffer)
    #expect(Array(buffer[..<written]) == Self.protobufC([faults[2]], packetsApplied: 0))
  }

  /// Packs the message with protobuf-c from C structs built here.
  static func protobufC(_ faults: [PagefaultEvent], packetsApplied: UInt64) -> [UInt8] {
    var pagefaults = faults.map { fault in
      var p = Uffdbroker__Pagefault()
      uffdbroker__pagefault__init(&p)
      p.fault_id = fault.faultID
      p.client_id = fault.clientID
      p.region_id = fault.regionID
      p.address = UInt64(fault.address)
      p.offset = fault.offset
      p.flags = UInt32(truncatingIfNeeded: fault.flags.rawValue)
      p.thread_id = fault.threadID
      return p
    }
    return pagefaults.withUnsafeMutableBufferPointer { p in
      var events = (0..<faults.count).map { index in
        var e = Uffdbroker__Event()
        uffdbroker__event__init(&e)
        e.kind_case = UFFDBROKER__EVENT__KIND_PAGEFAULT
        e.pagefault = p.baseAddress! + index
        return e
      }
      return events.withUnsafeMutableBufferPointer { e in
        var pointers: [UnsafeMutablePointer<Uffdbroker__Event>?] = (0..<faults.count).map { e.baseAddress! + $0 }
        return pointers.withUnsafeMutableBufferPointer { pointers in
          var message = Uffdbroker__BrokerToPlugin()
          uffdbroker__broker_to_plugin__init(&message)
          message.n_events = faults.count
          message.events = pointers.baseAddress
          message.packets_applied = packetsApplied
          return EventBatchEncoder.packedByProtobufC(message)
        }
      }
    }
  }
}
