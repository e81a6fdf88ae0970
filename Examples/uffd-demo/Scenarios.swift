import BrokerProtocol
import ClientSDK
import Glibc
import LinuxSupport

/// Lazy snapshot restore: generate a snapshot file, register memory backed by
/// it through the snapshot plugin, touch every page from several threads, and
/// check every page against the checksum taken when the file was written.
/// `hugePageSize`: the memory is of huge pages (`MAP_HUGETLB`), served a whole huge page per fault.
func restoreSnapshot(services: DemoServices, mib: Int, threads: Int, prefetchPages: Int, delegated: Bool, hugePageSize: Int?) throws -> PhaseResult {
  let pageSize = systemPageSize
  // Not a whole number of pages: the last page's tail must read as zeros.
  let fileSize = mib << 20 - 1000
  // Beneath the snapshot plugin's --root, and the plugin's user's to read.
  let path = services.pluginDirectory + "/snapshot.img"
  let pages = (fileSize + pageSize - 1) / pageSize
  var checksums = [UInt64](repeating: 0, count: pages)
  let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
  guard fd >= 0 else { throw DemoError("cannot create \(path)") }
  if let owner = services.pluginOwner { fchown(fd, owner.uid, owner.gid) }
  let chunkPages = 256
  let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkPages * pageSize, alignment: pageSize)
  defer { chunk.deallocate() }
  let written = Counter()
  let progress = Progress(label: "writing the snapshot", total: pages, done: written)
  for first in stride(from: 0, to: pages, by: chunkPages) {
    let count = min(chunkPages, pages - first)
    let words = chunk.bindMemory(to: UInt64.self)
    for index in 0..<count * pageSize / 8 { words[index] = Content.snapshotWord(UInt64(first * pageSize / 8 + index)) }
    let bytes = min(count * pageSize, fileSize - first * pageSize)
    if bytes < count * pageSize { (chunk.baseAddress! + bytes).initializeMemory(as: UInt8.self, repeating: 0, count: count * pageSize - bytes) }
    for page in 0..<count {
      checksums[first + page] = Content.checksum(UnsafeRawBufferPointer(rebasing: chunk[page * pageSize..<(page + 1) * pageSize]))
    }
    guard write(fd, chunk.baseAddress, bytes) == bytes else {
      progress.finish()
      throw DemoError("cannot write \(path)")
    }
    written.value.add(count, ordering: .relaxed)
  }
  progress.finish()
  close(fd)

  let memory = try AnonymousMemory(length: pages * pageSize, hugePageSize: hugePageSize)
  let faultsBefore = DemoServices.statistics(services.snapshotStats)["faults"] ?? 0
  let client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, pageSize: memory.pageSize, plugin: "snapshot", argument: path)],
                                name: "demo-restore")
  let (seconds, latencies) = touchAll(memory, threads: threads, label: "restore")
  var wrong = 0
  for page in 0..<pages where Content.checksum(UnsafeRawBufferPointer(start: memory.base + page * pageSize, count: pageSize)) != checksums[page] {
    wrong += 1
  }
  withExtendedLifetime(client) {}
  usleep(300_000)  // let the plugin's stats file catch up
  let faults = (DemoServices.statistics(services.snapshotStats)["faults"] ?? 0) - faultsBefore
  return PhaseResult(
    name: "restore", plugin: "snapshot", pages: pages, faults: faults, seconds: seconds, latencies: latencies, wrongPages: wrong,
    note: "\(Wording.size(mib << 20)) snapshot, \(Wording.count(threads, "thread")), "
      + (hugePageSize != nil ? "2 MiB huge pages, " : "")
      + (delegated ? "served by the broker (delegated)" : prefetchPages == 1 || hugePageSize != nil ? "no prefetch" : "prefetch \(Wording.count(prefetchPages, "page"))"))
}

/// Compressed swap: fill a working set, swap half of it out through the swap
/// plugin, touch it all again and check every page.
func swapWorkingSet(services: DemoServices, mib: Int, threads: Int) throws -> [PhaseResult] {
  let pageSize = systemPageSize
  let memory = try AnonymousMemory(length: mib << 20)
  let pages = memory.length / pageSize
  let spec = RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: "swap")
  let client = try BrokerClient(regions: [spec], name: "demo-swap")
  var checksums = [UInt64](repeating: 0, count: pages)
  let filled = Counter()
  let fillProgress = Progress(label: "fill", total: pages, done: filled)
  let fillStart = monotonicNanoseconds()
  for page in 0..<pages {
    let bytes = UnsafeMutableRawBufferPointer(start: memory.base + page * pageSize, count: pageSize)
    Content.fillWorkingSetPage(bytes, number: page)
    checksums[page] = Content.checksum(UnsafeRawBufferPointer(bytes))
    if page & 255 == 255 { filled.value.add(256, ordering: .relaxed) }
  }
  let fillSeconds = Double(monotonicNanoseconds() - fillStart) / 1e9
  fillProgress.finish()

  // Swapped out 1 MiB at a time, for the progress line (the SDK sends the
  // plugin 128 KiB per message either way).
  let half = memory.length / 2
  let step = 1 << 20
  var dropped = 0
  var kept = 0
  let swapped = Counter()
  let swapProgress = Progress(label: "swap-out", total: half / pageSize, done: swapped)
  let swapStart = monotonicNanoseconds()
  do {
    for offset in stride(from: 0, to: half, by: step) {
      let length = min(step, half - offset)
      let report = try client.swapOut(spec, offset: offset, length: length)
      dropped += report.pagesDropped
      kept += report.pagesKept
      swapped.value.add(length / pageSize, ordering: .relaxed)
    }
  } catch {
    swapProgress.finish()
    throw error
  }
  let swapSeconds = Double(monotonicNanoseconds() - swapStart) / 1e9
  swapProgress.finish()
  usleep(300_000)
  let stored = DemoServices.statistics(services.swapStats)
  let faultsBefore = stored["faults"] ?? 0

  let (seconds, latencies) = touchAll(memory, threads: threads, label: "swap-in")
  var wrong = 0
  for page in 0..<pages where Content.checksum(UnsafeRawBufferPointer(start: memory.base + page * pageSize, count: pageSize)) != checksums[page] {
    wrong += 1
  }
  withExtendedLifetime(client) {}
  usleep(300_000)
  let faults = (DemoServices.statistics(services.swapStats)["faults"] ?? 0) - faultsBefore
  let raw = stored["raw_bytes"] ?? 0
  let held = stored["held_bytes"] ?? 0
  let ratio = held > 0 ? Double(raw) / Double(held) : 0
  return [
    PhaseResult(name: "fill", plugin: "swap", pages: pages, faults: pages, seconds: fillSeconds, latencies: [], wrongPages: 0,
                note: "\(Wording.size(mib << 20)) working set written (first touch: zero pages)"),
    PhaseResult(name: "swap-out", plugin: "swap", pages: half / pageSize, faults: 0, seconds: swapSeconds, latencies: [], wrongPages: 0,
                note: "\(Wording.count(dropped, "page")) dropped, \(kept) kept; \(Wording.size(raw)) held in \(Wording.size(held)) (\(String(format1: ratio))x)"),
    PhaseResult(name: "swap-in", plugin: "swap", pages: pages, faults: faults, seconds: seconds, latencies: latencies, wrongPages: wrong,
                note: "every page touched again, \(Wording.count(threads, "thread"))"),
  ]
}

extension String {
  /// One decimal place, without Foundation.
  init(format1 value: Double) {
    let tenths = Int((value * 10).rounded())
    self = "\(tenths / 10).\(abs(tenths % 10))"
  }
}
