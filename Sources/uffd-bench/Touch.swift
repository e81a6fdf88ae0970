import Glibc
import LinuxSupport

/// One faulting thread's work, built once per mode before any round: the
/// pages in the order it touches them, and which touches are faults (those are
/// timed; with a 64 KiB prefetch only the first touch of each block faults).
final class TouchPlan: @unchecked Sendable {
  // @unchecked: filled in init, then only read (by one worker thread at a time).
  let order: UnsafeMutableBufferPointer<UInt32>
  let timed: UnsafeMutableBufferPointer<Bool>
  let timedCount: Int

  private init(order: [UInt32], timed: [Bool]) {
    self.order = .allocate(capacity: order.count)
    _ = self.order.initialize(from: order)
    self.timed = .allocate(capacity: timed.count)
    _ = self.timed.initialize(from: timed)
    timedCount = timed.reduce(0) { $0 + ($1 ? 1 : 0) }
  }

  deinit {
    order.deallocate()
    timed.deallocate()
  }

  /// The plans of every thread of `layout`.
  static func plans(for layout: Layout, workload: Workload) -> [TouchPlan] {
    // The first page of the prefetch block (aligned in its region's offsets) of every page.
    var blockLeader = Array(0..<layout.pages)
    let block = max(workload.pagesPerFault, 1)
    for region in layout.regions {
      for page in region.firstPage..<region.firstPage + region.pageCount {
        blockLeader[page] = region.firstPage + (page - region.firstPage) / block * block
      }
    }
    var faulted = [Bool](repeating: false, count: layout.pages)
    return layout.threads.enumerated().map { index, thread in
      var order = (thread.firstPage..<thread.firstPage + thread.pageCount).map { UInt32($0) }
      if workload.order == .random {
        var random = SplitMix64(seed: 0x5EED_0000 &+ UInt64(index))
        for position in stride(from: order.count - 1, to: 0, by: -1) {
          order.swapAt(position, Int(random.next() % UInt64(position + 1)))
        }
      }
      let timed = order.map { page in
        let leader = blockLeader[Int(page)]
        defer { faulted[leader] = true }
        return !faulted[leader]
      }
      return TouchPlan(order: order, timed: timed)
    }
  }
}

/// A small deterministic generator: the random order is the same in every round and run.
struct SplitMix64 {
  private var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}

/// Fault latencies of one thread, in ns: allocated before the round, so the
/// measured loop allocates nothing.
final class LatencyBuffer: @unchecked Sendable {
  // @unchecked: written only by its worker between the start and end gates, read after the end gate.
  let samples: UnsafeMutablePointer<UInt64>
  let capacity: Int
  var count = 0

  init(capacity: Int) {
    self.capacity = max(capacity, 1)
    samples = .allocate(capacity: self.capacity)
    samples.initialize(repeating: 0, count: self.capacity)  // touch it now, not in the timed loop
  }

  deinit { samples.deallocate() }
}

/// A pthread barrier: the workers and the main thread pass it together, so the
/// clock starts when every thread is ready, and stops when every thread is done.
final class Gate: @unchecked Sendable {
  // @unchecked: a pthread barrier is made to be shared between threads.
  private let barrier: UnsafeMutablePointer<pthread_barrier_t>

  init(parties: Int) {
    barrier = .allocate(capacity: 1)
    pthread_barrier_init(barrier, nil, UInt32(parties))
  }

  deinit {
    pthread_barrier_destroy(barrier)
    barrier.deallocate()
  }

  func pass() { _ = pthread_barrier_wait(barrier) }
}

enum Toucher {
  /// Touches every page of `plan` once by storing the pattern's first word, so
  /// the page reads back as the pattern whoever filled it; times the touches
  /// that fault with CLOCK_MONOTONIC around the store.
  @inline(never)
  static func run(_ plan: TouchPlan, base: UInt, latencies: LatencyBuffer) {
    let samples = latencies.samples
    var recorded = 0
    for index in 0..<plan.order.count {
      let page = UInt(plan.order[index])
      let offset = UInt64(page) << 12
      let word = UnsafeMutablePointer<UInt64>(bitPattern: base &+ (page << 12)).unsafelyUnwrapped
      let value = Pattern.word(at: offset)
      if plan.timed[index] {
        let start = monotonicNanoseconds()
        word.pointee = value
        samples[recorded] = monotonicNanoseconds() &- start
        recorded &+= 1
      } else {
        word.pointee = value
      }
    }
    latencies.count = recorded
  }
}
