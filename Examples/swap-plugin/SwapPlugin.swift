import BrokerProtocol
import CZlib
import Glibc
import PluginSDK

/// Compressed userspace swap (the seed's purpose, as Chromium's userspace
/// swap): the client swaps a range out, this plugin keeps each page
/// compressed, and the next touch of a page faults it back in, decompressed.
/// Pages never stored (or dropped by the client) read as zeros.
final class SwapPlugin: PagePlugin {
  private struct Key: Hashable {
    var client: UInt64
    var region: UInt64
    var offset: UInt64
  }

  /// One stored page: zlib-compressed, or raw when compression did not pay,
  /// with the page's CRC-32 to catch a damaged copy before it reaches the client.
  private struct Stored {
    var bytes: [UInt8]
    var compressed: Bool
    var crc: UInt
  }

  private var pages: [Key: Stored] = [:]
  private let scratch: UnsafeMutableRawBufferPointer
  /// Fault injection for the tests: corrupt the block stored at this offset.
  private let corruptOffset: UInt64?
  private(set) var rawBytes = 0
  private(set) var heldBytes = 0
  private(set) var pagesStored = 0
  private(set) var pagesRestored = 0

  init(corruptOffset: UInt64?) {
    self.corruptOffset = corruptOffset
    scratch = .allocate(byteCount: Int(compressBound(uLong(65536))), alignment: 4096)
  }

  deinit { scratch.deallocate() }

  func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, in region: PluginRegion) throws {
    let pageSize = region.pageSize
    for start in stride(from: 0, to: data.count, by: pageSize) {
      let page = UnsafeRawBufferPointer(rebasing: data[start..<min(start + pageSize, data.count)])
      var length = uLongf(scratch.count)
      let rc = compress2(scratch.baseAddress!.assumingMemoryBound(to: Bytef.self), &length, page.baseAddress!.assumingMemoryBound(to: Bytef.self), uLong(page.count), 1)
      let crc = crc32(0, page.baseAddress!.assumingMemoryBound(to: Bytef.self), uInt(page.count))
      var stored = rc == Z_OK && Int(length) < page.count
        ? Stored(bytes: Array(UnsafeRawBufferPointer(rebasing: scratch[..<Int(length)])), compressed: true, crc: crc)
        : Stored(bytes: Array(page), compressed: false, crc: crc)
      let key = Key(client: region.clientID, region: region.spec.id, offset: offset + UInt64(start))
      if key.offset == corruptOffset { stored.bytes[stored.bytes.count / 2] ^= 0xFF }
      if let old = pages.updateValue(stored, forKey: key) { account(removing: old, pageSize: pageSize) }
      rawBytes += page.count
      heldBytes += stored.bytes.count
      pagesStored += 1
    }
  }

  var statistics: [(name: String, value: Int)] {
    [("pages_held", pages.count), ("raw_bytes", rawBytes), ("held_bytes", heldBytes), ("pages_stored", pagesStored), ("pages_restored", pagesRestored)]
  }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    let pageSize = region.pageSize
    guard let stored = pages[Key(client: region.clientID, region: region.spec.id, offset: fault.offset)] else {
      // Never swapped out: a fresh page of zeros (copied for a write, which would
      // otherwise take a second, copy-on-write fault).
      guard fault.isWrite else { return .zero }
      buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
      return .copy
    }
    pagesRestored += 1
    var length = uLongf(pageSize)
    var rc = Z_OK
    if stored.compressed {
      rc = stored.bytes.withUnsafeBytes { source in
        uncompress(buffer.baseAddress!.assumingMemoryBound(to: Bytef.self), &length, source.baseAddress!.assumingMemoryBound(to: Bytef.self), uLong(source.count))
      }
    } else {
      stored.bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: pageSize) }
    }
    let crc = crc32(0, buffer.baseAddress!.assumingMemoryBound(to: Bytef.self), uInt(pageSize))
    guard rc == Z_OK, Int(length) == pageSize, crc == stored.crc else {
      // The stored copy is damaged: the page's content is lost. Fail closed:
      // the client's access gets SIGBUS instead of wrong memory.
      let message = "swap-plugin: corrupt block for client \(region.clientID) region \(region.spec.id) offset \(fault.offset) (zlib \(rc)): poisoning the page\n"
      message.withCString { _ = write(2, $0, strlen($0)) }
      return .poison
    }
    return .copy
  }

  /// A forked child's pages read what the parent's held at the fork: it gets
  /// the parent's stored pages (their bytes shared, copy-on-write).
  func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws {
    for (key, stored) in pages where key.client == parent.clientID && key.region == parent.spec.id {
      pages[Key(client: child.clientID, region: key.region, offset: key.offset)] = stored
      rawBytes += parent.pageSize
      heldBytes += stored.bytes.count
    }
  }

  /// Pages the client dropped itself read as zeros from now on: forget their copies.
  func removed(_ offsets: Range<UInt64>, in region: PluginRegion) { forget(region, offsets) }
  func unmapped(_ offsets: Range<UInt64>, in region: PluginRegion) { forget(region, offsets) }
  func regionClosed(_ region: PluginRegion) { forget(region, 0..<UInt64(region.length)) }

  private func forget(_ region: PluginRegion, _ offsets: Range<UInt64>) {
    let pageSize = UInt64(region.pageSize)
    if UInt64(offsets.count) / pageSize > UInt64(pages.count) {
      for (key, stored) in pages where key.client == region.clientID && key.region == region.spec.id && offsets.contains(key.offset) {
        pages[key] = nil
        account(removing: stored, pageSize: region.pageSize)
      }
    } else {
      for offset in stride(from: offsets.lowerBound, to: offsets.upperBound, by: Int(pageSize)) {
        if let stored = pages.removeValue(forKey: Key(client: region.clientID, region: region.spec.id, offset: offset)) {
          account(removing: stored, pageSize: region.pageSize)
        }
      }
    }
  }

  private func account(removing stored: Stored, pageSize: Int) {
    rawBytes -= pageSize
    heldBytes -= stored.bytes.count
  }

}
