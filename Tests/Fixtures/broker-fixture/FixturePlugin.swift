import BrokerProtocol
import Glibc
import PluginSDK
import Userfaultfd

/// A plugin with selectable behaviour, for the integration tests.
/// Modes: pattern (copy the pattern), zero, retry-once (retry each page once,
/// then pattern), outside / misaligned / short / below / overlong (first answer
/// per page is invalid, later ones correct), small-page (the same: a 4 KiB copy
/// into a huge-page region), prefetch (64 KiB aligned blocks),
/// prefetch-refill (the same, and removed pages get the pattern again),
/// no-fork (pattern, refusing forked children),
/// hang (never answer), exit-after:N (exit after N faults), refuse (refuse every region).
///
/// Event log lines (one per event, for the tests): `opened CLIENT REGION`,
/// `removed|unmapped CLIENT START END` (region offsets), `remapped CLIENT REGION BASE`,
/// `regionClosed CLIENT REGION`, `closed CLIENT`, `forked CHILD PARENT REGION`; in retry-once and the invalid
/// modes and hang also `retry|invalid|served CLIENT OFFSET FAULT_ID` per decision.
final class FixturePlugin: PagePlugin {
  let mode: String
  let eventLog: UnsafeMutablePointer<FILE>?
  var retried = Set<UInt64>()
  var removed: [ObjectIdentifier: RemovedPages] = [:]
  var faults = 0
  let exitAfter: Int?

  init(mode: String, eventLogPath: String?) {
    self.mode = mode
    eventLog = eventLogPath.flatMap { fopen($0, "a") }
    exitAfter = mode.hasPrefix("exit-after:") ? Int(mode.dropFirst("exit-after:".count)) : nil
  }

  func log(_ line: String) {
    guard let eventLog else { return }
    fputs(line + "\n", eventLog)
    fflush(eventLog)
  }

  func regionOpened(_ region: PluginRegion) throws {
    log("opened \(region.clientID) \(region.spec.id)")
    if mode == "refuse" { throw BrokerError(.pluginRefused, "this fixture refuses every region") }
  }

  func removed(_ offsets: Range<UInt64>, in region: PluginRegion) {
    log("removed \(region.clientID) \(offsets.lowerBound) \(offsets.upperBound)")
    removed[ObjectIdentifier(region), default: RemovedPages()].insert(offsets, pageSize: region.pageSize)
  }

  func unmapped(_ offsets: Range<UInt64>, in region: PluginRegion) { log("unmapped \(region.clientID) \(offsets.lowerBound) \(offsets.upperBound)") }
  func remapped(_ region: PluginRegion) { log("remapped \(region.clientID) \(region.spec.id) \(region.base)") }
  func regionClosed(_ region: PluginRegion) {
    log("regionClosed \(region.clientID) \(region.spec.id)")
    removed[ObjectIdentifier(region)] = nil
  }

  /// The child's pages read what the parent's would: the same pattern, the same
  /// dropped pages. In mode no-fork it refuses (the child's faults fail closed).
  func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws {
    log("forked \(child.clientID) \(parent.clientID) \(child.spec.id)")
    if mode == "no-fork" { throw BrokerError(.pluginRefused, "this fixture serves no forked child") }
    removed[ObjectIdentifier(child)] = removed[ObjectIdentifier(parent)]
  }
  func clientClosed(_ clientID: UInt64, reason: String) { log("closed \(clientID)") }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    faults += 1
    if let exitAfter, faults > exitAfter { exit(3) }
    // Pages dropped with MADV_DONTNEED read as zeros from then on.
    if mode != "prefetch-refill", removed[ObjectIdentifier(region)]?.contains(fault.offset, pageSize: region.pageSize) == true { return .zero }
    let firstTime = retried.insert(fault.offset).inserted
    let decision = decide(fault, in: region, buffer: buffer, firstTime: firstTime)
    if logsDecisions {
      let what = decision == .retry ? "retry" : firstTime && mode != "retry-once" && mode != "hang" ? "invalid" : "served"
      log("\(what) \(region.clientID) \(fault.offset) \(fault.faultID)")
    }
    return decision
  }

  private var logsDecisions: Bool {
    ["retry-once", "hang", "outside", "misaligned", "short", "below", "overlong", "small-page"].contains(mode)
  }

  private func decide(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer, firstTime: Bool) -> PluginDecision {
    let pageSize = region.pageSize
    switch mode {
    case "zero":
      return .zero
    case "retry-once" where firstTime:
      return .retry
    case "outside" where firstTime:
      Pattern.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[..<pageSize]), backingOffset: 0)
      return .copyRange(offset: UInt64(region.length), length: pageSize)  // just past the region's end
    case "misaligned" where firstTime:
      return .copyRange(offset: fault.offset + 8, length: pageSize)
    case "short" where firstTime:
      return .copyRange(offset: fault.offset, length: pageSize / 2)
    case "small-page" where firstTime:
      // One small page of a huge page: not a whole page of the region.
      Pattern.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[..<4096]), backingOffset: region.spec.backingOffset + fault.offset)
      return .copyRange(offset: fault.offset, length: 4096)
    case "below" where firstTime:
      // The page just before the region's start (offset -pageSize, wrapping).
      Pattern.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[..<pageSize]), backingOffset: 0)
      return .copyRange(offset: 0 &- UInt64(pageSize), length: pageSize)
    case "overlong" where firstTime:
      // From the faulting page through one page past the region's end.
      let length = min(Int(UInt64(region.length) - fault.offset) + pageSize, buffer.count / pageSize * pageSize)
      for page in stride(from: 0, to: length, by: pageSize) {
        Pattern.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[page..<page + pageSize]), backingOffset: region.spec.backingOffset + fault.offset + UInt64(page))
      }
      return .copyRange(offset: fault.offset, length: length)
    case "hang":
      return .retry  // a plugin that never resolves (the broker keeps redelivering)
    case "prefetch", "prefetch-refill":
      let block = UInt64(64 << 10)
      let start = fault.offset / block * block
      let length = Int(min(block, UInt64(region.length) - start))
      // In mode prefetch a removed page in the block gets zeros, as it would alone.
      let removed = mode == "prefetch" ? self.removed[ObjectIdentifier(region)] : nil
      for page in stride(from: 0, to: length, by: pageSize) {
        let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[page..<page + pageSize])
        if removed?.contains(start + UInt64(page), pageSize: pageSize) == true {
          bytes.initializeMemory(as: UInt8.self, repeating: 0)
        } else {
          Pattern.fill(bytes, backingOffset: region.spec.backingOffset + start + UInt64(page))
        }
      }
      return .copyRange(offset: start, length: length)
    default:
      Pattern.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[..<pageSize]), backingOffset: region.spec.backingOffset + fault.offset)
      return .copy
    }
  }
}
