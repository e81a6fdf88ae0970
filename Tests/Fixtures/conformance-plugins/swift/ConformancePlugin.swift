import Glibc
import PluginSDK

/// The conformance plugin on the Swift SDK: what it answers comes from each
/// region's argument (`Behaviour`); the table is in ../README.md.
final class ConformancePlugin: PagePlugin {
  /// What the region's argument asks for.
  enum Behaviour {
    case pattern, zero, retryOnce, poison, invalid, oversized
    case prefetch(pages: Int)
    case die(afterFaults: Int)

    init?(_ argument: String) {
      let parts = argument.split(separator: "=", maxSplits: 1).map(String.init)
      switch (parts.first ?? "", parts.count > 1 ? Int(parts[1]) : nil) {
      case ("", nil), ("pattern", nil): self = .pattern
      case ("zero", nil): self = .zero
      case ("retry-once", nil): self = .retryOnce
      case ("poison", nil): self = .poison
      case ("invalid", nil): self = .invalid
      case ("oversized", nil): self = .oversized
      case ("prefetch", let pages?) where pages >= 1: self = .prefetch(pages: pages)
      case ("die", let faults?) where faults >= 0: self = .die(afterFaults: faults)
      default: return nil
      }
    }
  }

  /// Per region: its behaviour and what the client did to its pages.
  final class RegionState {
    let behaviour: Behaviour
    var removed = RemovedPages()
    /// Page offset → the bytes a swap-out stored.
    var stored: [UInt64: [UInt8]] = [:]
    /// Pages answered once (the behaviours that differ the first time).
    var answered = Set<UInt64>()
    init(_ behaviour: Behaviour) { self.behaviour = behaviour }
  }

  struct UnknownBehaviour: Error, CustomStringConvertible {
    var argument: String
    var description: String { "unknown conformance behaviour \"\(argument)\"" }
  }

  private var faults = 0
  /// Stored pages, kept by the broker across this plugin's restarts.
  private var log: PageLog!
  /// What an earlier incarnation stored, by region.
  private var restored: [PageLog.RegionKey: [UInt64: [UInt8]]] = [:]

  func connected(_ store: DescriptorStore) {
    log = PageLog(store)
    restored = log.pages()
  }

  private func key(_ region: PluginRegion) -> PageLog.RegionKey { PageLog.RegionKey(token: region.clientToken, regionID: region.spec.id) }

  func regionOpened(_ region: PluginRegion) throws {
    guard let behaviour = Behaviour(region.spec.argument) else { throw UnknownBehaviour(argument: region.spec.argument) }
    let state = RegionState(behaviour)
    state.stored = restored[key(region)] ?? [:]
    region.context = state
  }

  /// Whether every page of `offsets` is stored (asked for pages a swap-out released before a restart).
  func holds(_ offsets: Range<UInt64>, in region: PluginRegion) -> Bool {
    let state = region.context as! RegionState
    return stride(from: offsets.lowerBound, to: offsets.upperBound, by: region.pageSize).allSatisfy { state.stored[$0] != nil }
  }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    let state = region.context as! RegionState
    let pageSize = region.pageSize
    faults += 1
    // A page a swap-out stored comes back as it was stored, whatever the behaviour.
    if state.stored[fault.offset] != nil {
      fill(buffer, at: fault.offset, pages: 1, state, region)
      return .copy
    }
    let firstTime: Bool
    switch state.behaviour {
    case .retryOnce, .invalid, .oversized: firstTime = state.answered.insert(fault.offset).inserted
    default: firstTime = false
    }
    switch state.behaviour {
    case .zero: return .zero
    case .poison: return .poison
    case .retryOnce where firstTime: return .retry
    case .invalid where firstTime:
      fill(buffer, at: fault.offset, pages: 1, state, region)
      return .copyRange(offset: fault.offset + 8, length: pageSize)
    case .oversized where firstTime:
      return .zeroRange(offset: 0, length: region.length + pageSize)
    case .die(let afterFaults) where faults > afterFaults:
      kill(getpid(), SIGKILL)  // mid-fault: this one and the rest of its packet stay unanswered
      return .retry
    case .prefetch(let pages):
      let block = UInt64(min(pages * pageSize, buffer.count / pageSize * pageSize))
      let start = fault.offset / block * block
      let length = Int(min(block, UInt64(region.length) - start))
      fill(buffer, at: start, pages: length / pageSize, state, region)
      return .copyRange(offset: start, length: length)
    default:
      fill(buffer, at: fault.offset, pages: 1, state, region)
      return .copy
    }
  }

  /// Writes `pages` pages from region offset `offset` into `buffer`: stored
  /// bytes, else zeros for dropped pages, else the pattern.
  private func fill(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, pages: Int, _ state: RegionState, _ region: PluginRegion) {
    let pageSize = region.pageSize
    for index in 0..<pages {
      let page = offset + UInt64(index * pageSize)
      let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[index * pageSize..<(index + 1) * pageSize])
      if let stored = state.stored[page] {
        bytes.copyBytes(from: stored)
      } else if state.removed.contains(page, pageSize: pageSize) {
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
      } else {
        let words = bytes.bindMemory(to: UInt64.self)
        let backing = region.spec.backingOffset + page
        for word in 0..<words.count { words[word] = (backing &+ UInt64(word) &* 8 &+ 1) &* 0x9E37_79B9_7F4A_7C15 }
      }
    }
  }

  func removed(_ offsets: Range<UInt64>, in region: PluginRegion) {
    let state = region.context as! RegionState
    state.removed.insert(offsets, pageSize: region.pageSize)
    for page in stride(from: offsets.lowerBound, to: offsets.upperBound, by: region.pageSize) { state.stored[page] = nil }
  }

  func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, in region: PluginRegion) throws {
    let state = region.context as! RegionState
    let pageSize = region.pageSize
    for index in 0..<data.count / pageSize {
      let page = UnsafeRawBufferPointer(rebasing: data[index * pageSize..<(index + 1) * pageSize])
      state.stored[offset + UInt64(index * pageSize)] = Array(page)
      log.append(page, at: offset + UInt64(index * pageSize), of: key(region))
    }
  }

  func decisionRefused(faultID: UInt64, cause: String, reason: String) {
    let line = "refused \(cause)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
  }
}
