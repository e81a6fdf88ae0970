import Glibc
import PluginSDK

// The simplest plugin. Every page starts as zeros.
// A read fault gets UFFDIO_ZEROPAGE (the shared zero page: no memory, no copy).
// A write fault gets a copied page of zeros: with ZEROPAGE the write would take
// a second, copy-on-write fault right after (see the README for the measurement).
// With --delegate the broker serves the regions itself, the same way.
final class ZeroFill: PagePlugin {
  let delegate: Bool
  init(delegate: Bool) { self.delegate = delegate }

  func regionOpened(_ region: PluginRegion) throws {
    if delegate { region.delegateZeroPages() }
  }

  /// A forked child's pages are zeros too (its delegations are the parent's, copied by the broker).
  func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws {}

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    guard fault.isWrite else { return .zero }
    buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: region.pageSize)
    return .copy
  }
}
