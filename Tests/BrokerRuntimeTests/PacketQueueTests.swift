import Testing
@testable import BrokerRuntime

/// The backlog of packets for a plugin that stopped reading: order and byte count through compactions.
@Suite("Packet queue")
struct PacketQueueTests {
  @Test("packets leave in the order they came, across compactions, with the byte count kept")
  func order() {
    var queue = PacketQueue()
    var next = 0, expected = 0
    for round in 0..<3 {
      for _ in 0..<3000 {
        withUnsafeBytes(of: UInt32(next)) { queue.append($0) }
        next += 1
      }
      // Take most of them, leaving some behind (the queue never empties between rounds).
      for _ in 0..<(round == 2 ? 3000 + 2 * 500 : 2500) {
        let packet = queue.first!
        #expect(packet.withUnsafeBytes { $0.load(as: UInt32.self) } == UInt32(expected))
        queue.removeFirst()
        expected += 1
      }
    }
    #expect(queue.isEmpty && queue.first == nil && queue.bytes == 0 && expected == next)
  }
}
