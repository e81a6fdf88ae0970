import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport
import Synchronization

/// Deterministic page content and a checksum to verify every page against.
enum Content {
  /// Snapshot pages: pseudo-random words (incompressible, like real memory images).
  static func snapshotWord(_ index: UInt64) -> UInt64 {
    var z = index &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  /// Working-set pages: text-like and compressible, a little different on each page.
  static func fillWorkingSetPage(_ page: UnsafeMutableRawBufferPointer, number: Int) {
    let line = Array("page \(number): the broker serves this page from the swap plugin, compressed. ".utf8)
    for index in 0..<page.count { page[index] = line[index % line.count] }
  }

  static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    var sum: UInt64 = 0xCBF2_9CE4_8422_2325
    for word in bytes.bindMemory(to: UInt64.self) { sum = (sum ^ word) &* 0x100_0000_01B3 }
    return sum
  }
}

/// Per-page first-touch latencies and a throughput figure for one phase.
struct PhaseResult {
  var name: String
  var plugin: String
  var pages: Int
  var faults: Int
  var seconds: Double
  var latencies: [UInt32]
  var wrongPages: Int
  var note: String

  var pagesPerSecond: Double { Double(pages) / seconds }
  func percentile(_ p: Double) -> Double {
    guard !latencies.isEmpty else { return 0 }
    let sorted = latencies.sorted()
    return Double(sorted[min(Int(Double(sorted.count) * p), sorted.count - 1)]) / 1000
  }
}

/// Touches every page of `memory` from `threads` threads (each a contiguous
/// share, in order), timing each first touch, while a progress line runs.
func touchAll(_ memory: AnonymousMemory, threads: Int, label: String) -> (seconds: Double, latencies: [UInt32]) {
  let pageSize = systemPageSize
  let pages = memory.length / pageSize
  let latencies = UnsafeMutablePointer<UInt32>.allocate(capacity: pages)
  defer { latencies.deallocate() }
  let latencyAddress = UInt(bitPattern: latencies)
  let base = memory.address
  let done = Counter()
  let progress = Progress(label: label, total: pages, done: done)
  let start = monotonicNanoseconds()
  let workers = (0..<threads).map { thread in
    spawnThread {
      let share = (pages + threads - 1) / threads
      let first = thread * share
      let record = UnsafeMutablePointer<UInt32>(bitPattern: latencyAddress)!
      for page in first..<min(first + share, pages) {
        let before = monotonicNanoseconds()
        _ = clinux_touch(UnsafeRawPointer(bitPattern: base + UInt(page * 4096)))
        record[page] = UInt32(clamping: monotonicNanoseconds() - before)
        if page & 255 == 255 { done.value.add(256, ordering: .relaxed) }
      }
    }
  }
  workers.forEach { pthread_join($0, nil) }
  let seconds = Double(monotonicNanoseconds() - start) / 1e9
  progress.finish()
  return (seconds, Array(UnsafeBufferPointer(start: latencies, count: pages)))
}
