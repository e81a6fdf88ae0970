import Glibc
import PluginSDK

// zero-fill: the simplest plugin. Every page starts as zeros.
// A read fault gets UFFDIO_ZEROPAGE (the shared zero page: no memory, no copy).
// A write fault gets a copied page of zeros: with ZEROPAGE the write would take
// a second, copy-on-write fault right after (see the README for the measurement).
final class ZeroFill: PagePlugin {
  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    guard fault.isWrite else { return .zero }
    buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: region.pageSize)
    return .copy
  }
}

let name = CommandLine.arguments.dropFirst().first ?? "zero-fill"
do {
  try PluginRunner.run(ZeroFill(), name: name)
} catch {
  print("zero-fill: \(error)")
  exit(1)
}
