import BrokerProtocol
import CMallocCounter
import LinuxSupport
import Userfaultfd

/// The wire codecs' hot path in isolation: one page-fault event through
/// `EventBatchEncoder` → `EventBatchDecoder` (what the broker and a plugin do
/// per fault), and one 4 KiB copy decision back through `DecisionBatchEncoder`
/// → `DecisionBatchDecoder`. Each is timed over a tight loop and its malloc
/// calls counted; medians of a few repetitions are reported.
enum Micro {
  struct Result {
    var nanosecondsPerOperation: Double
    var mallocCallsPerOperation: Double
  }

  static func run(iterations: Int, repetitions: Int = 5) throws(BenchError) -> (event: Result, decision: Result) {
    let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
    defer { packet.deallocate() }
    let events = EventBatchEncoder()
    let eventDecoder = EventBatchDecoder()
    let decisions = DecisionBatchEncoder()
    let decisionDecoder = DecisionBatchDecoder()
    let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    defer { page.deallocate() }
    Pattern.fill(page, bytes: 4096, backingOffset: 0)

    var eventRuns: [Result] = []
    var decisionRuns: [Result] = []
    _ = try eventLoop(100, events, eventDecoder, packet)  // warm up: first-use allocations are not per event
    _ = try decisionLoop(100, decisions, decisionDecoder, packet, page)
    for _ in 0..<repetitions {
      eventRuns.append(try eventLoop(iterations, events, eventDecoder, packet))
      decisionRuns.append(try decisionLoop(iterations, decisions, decisionDecoder, packet, page))
    }
    func median(_ runs: [Result]) -> Result {
      Result(nanosecondsPerOperation: Statistics.median(runs.map(\.nanosecondsPerOperation)),
             mallocCallsPerOperation: Statistics.median(runs.map(\.mallocCallsPerOperation)))
    }
    return (median(eventRuns), median(decisionRuns))
  }

  @inline(never)
  private static func eventLoop(_ iterations: Int, _ encoder: EventBatchEncoder, _ decoder: EventBatchDecoder,
                                _ packet: UnsafeMutableRawBufferPointer) throws(BenchError) -> Result {
    var checksum: UInt64 = 0
    let calls = malloc_counter_calls()
    let start = monotonicNanoseconds()
    do {
      for index in 0..<iterations {
        encoder.append(PagefaultEvent(
          faultID: UInt64(index), clientID: 7, regionID: 3, address: 0x7F00_0000_0000 &+ UInt(index) << 12,
          offset: UInt64(index) << 12, flags: .write, threadID: 4242))
        let count = encoder.encode(into: packet)
        try decoder.decode(UnsafeRawBufferPointer(rebasing: packet[..<count]))
        if case .pagefault(let event) = try decoder.event(at: 0) { checksum &+= event.faultID &+ event.offset }
      }
    } catch {
      throw BenchError("micro: a page-fault event did not decode: \(error)")
    }
    let elapsed = monotonicNanoseconds() - start
    let mallocs = malloc_counter_calls() - calls
    guard checksum != 0 || iterations < 2 else { throw BenchError("micro: decoded events are empty") }
    return Result(nanosecondsPerOperation: Double(elapsed) / Double(iterations), mallocCallsPerOperation: Double(mallocs) / Double(iterations))
  }

  @inline(never)
  private static func decisionLoop(_ iterations: Int, _ encoder: DecisionBatchEncoder, _ decoder: DecisionBatchDecoder,
                                   _ packet: UnsafeMutableRawBufferPointer, _ page: UnsafeMutableRawPointer) throws(BenchError) -> Result {
    var checksum: UInt64 = 0
    let data = UnsafeRawBufferPointer(start: page, count: 4096)
    let calls = malloc_counter_calls()
    let start = monotonicNanoseconds()
    do {
      for index in 0..<iterations {
        encoder.append(faultID: UInt64(index), kind: .copy, address: 0x7F00_0000_0000 &+ UInt(index) << 12, length: 4096, data: data)
        let count = encoder.encode(into: packet)
        try decoder.decode(UnsafeRawBufferPointer(rebasing: packet[..<count]))
        if let decision = decoder.decision(at: 0) {
          checksum &+= decision.faultID &+ UInt64(decision.data.count) &+ UInt64(decision.data.load(fromByteOffset: 4088, as: UInt64.self))
        }
      }
    } catch {
      throw BenchError("micro: a decision did not decode: \(error)")
    }
    let elapsed = monotonicNanoseconds() - start
    let mallocs = malloc_counter_calls() - calls
    guard checksum != 0 else { throw BenchError("micro: decoded decisions are empty") }
    return Result(nanosecondsPerOperation: Double(elapsed) / Double(iterations), mallocCallsPerOperation: Double(mallocs) / Double(iterations))
  }
}
