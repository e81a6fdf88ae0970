import BrokerProtocol
import CZlib
import Glibc
import PluginSDK

/// Compressed userspace swap (the seed's purpose, as Chromium's userspace
/// swap): the client swaps a range out, this plugin keeps each page
/// compressed, and the next touch of a page faults it back in, decompressed.
/// Pages never stored (or dropped by the client) read as zeros. The pages live
/// in memfds the broker keeps for the plugin (`SwapStore`): a crash or
/// `kill -9` of the plugin loses none of them.
final class SwapPlugin: PagePlugin {
  private typealias Key = SwapStore.Key

  /// Set once connected: the pages live in memfds the broker keeps for us.
  private var store: SwapStore!
  private let scratch: UnsafeMutableRawBufferPointer
  /// Fault injection for the tests: corrupt the block stored at this offset.
  private let corruptOffset: UInt64?
  /// Where the store's files live (they then outlive the broker too); nil: memfds in the broker.
  private let stateDirectory: String?
  private(set) var rawBytes = 0
  private(set) var heldBytes = 0
  private(set) var pagesStored = 0
  private(set) var pagesRestored = 0

  init(corruptOffset: UInt64?, stateDirectory: String?) {
    self.corruptOffset = corruptOffset
    self.stateDirectory = stateDirectory
    scratch = .allocate(byteCount: Int(compressBound(uLong(65536))), alignment: 4096)
  }

  deinit { scratch.deallocate() }

  /// Opens the store, or finds it again after a crash: what the broker kept
  /// for us holds every page stored before.
  func connected(_ descriptors: DescriptorStore) {
    do {
      store = try SwapStore(store: descriptors, directory: stateDirectory)
    } catch {
      fatalError("swap-plugin: cannot open its store: \(error)")
    }
    for entry in store.entries.values { account(adding: entry) }
    if store.recovered {
      let message = "swap-plugin: recovered \(store.entries.count) stored pages\n"
      message.withCString { _ = write(2, $0, strlen($0)) }
    }
  }

  func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, in region: PluginRegion) throws {
    let pageSize = region.pageSize
    for start in stride(from: 0, to: data.count, by: pageSize) {
      let page = UnsafeRawBufferPointer(rebasing: data[start..<min(start + pageSize, data.count)])
      var length = uLongf(scratch.count)
      let rc = compress2(scratch.baseAddress!.assumingMemoryBound(to: Bytef.self), &length, page.baseAddress!.assumingMemoryBound(to: Bytef.self), uLong(page.count), 1)
      let crc = UInt32(crc32(0, page.baseAddress!.assumingMemoryBound(to: Bytef.self), uInt(page.count)))
      let compressed = rc == Z_OK && Int(length) < page.count
      let image = compressed ? UnsafeRawBufferPointer(rebasing: scratch[..<Int(length)]) : page
      let key = Key(client: region.clientToken, region: region.spec.id, offset: offset + UInt64(start))
      if let old = store.entries[key] { account(removing: old) }
      let entry = try store.put(key, image: image, compressed: compressed, crc: crc)
      if key.offset == corruptOffset { store.image(of: entry)[Int(entry.length) / 2] ^= 0xFF }
      account(adding: entry)
      pagesStored += 1
    }
  }

  var statistics: [(name: String, value: Int)] {
    [("pages_held", store?.entries.count ?? 0), ("raw_bytes", rawBytes), ("held_bytes", heldBytes), ("pages_stored", pagesStored), ("pages_restored", pagesRestored)]
  }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    let pageSize = region.pageSize
    guard let entry = store.entries[Key(client: region.clientToken, region: region.spec.id, offset: fault.offset)] else {
      // Never swapped out: a fresh page of zeros (copied for a write, which would
      // otherwise take a second, copy-on-write fault).
      guard fault.isWrite else { return .zero }
      buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
      return .copy
    }
    pagesRestored += 1
    let image = store.image(of: entry)
    var length = uLongf(pageSize)
    var rc = Z_OK
    if entry.compressed {
      rc = uncompress(buffer.baseAddress!.assumingMemoryBound(to: Bytef.self), &length, image.baseAddress!.assumingMemoryBound(to: Bytef.self), uLong(image.count))
    } else if image.count == pageSize {
      buffer.baseAddress!.copyMemory(from: image.baseAddress!, byteCount: pageSize)
    } else {
      rc = Z_DATA_ERROR
    }
    let crc = UInt32(crc32(0, buffer.baseAddress!.assumingMemoryBound(to: Bytef.self), uInt(pageSize)))
    guard rc == Z_OK, Int(length) == pageSize, crc == entry.crc else {
      // The stored copy is damaged: the page's content is lost. Fail closed:
      // the client's access gets SIGBUS instead of wrong memory.
      let message = "swap-plugin: corrupt block for client \(region.clientID) region \(region.spec.id) offset \(fault.offset) (zlib \(rc)): poisoning the page\n"
      message.withCString { _ = write(2, $0, strlen($0)) }
      return .poison
    }
    return .copy
  }

  /// After a restart: whether every page of `offsets` is still stored.
  func holds(_ offsets: Range<UInt64>, in region: PluginRegion) -> Bool {
    stride(from: offsets.lowerBound, to: offsets.upperBound, by: region.pageSize).allSatisfy {
      store.entries[Key(client: region.clientToken, region: region.spec.id, offset: $0)] != nil
    }
  }

  /// A forked child's pages read what the parent's held at the fork: it gets
  /// the parent's stored pages (the same images in the log, copy-on-write).
  func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws {
    for (key, entry) in store.entries where key.client == parent.clientToken && key.region == parent.spec.id {
      try store.share(entry, as: Key(client: child.clientToken, region: key.region, offset: key.offset))
      account(adding: entry)
    }
  }

  /// Pages the client dropped itself read as zeros from now on: forget their copies.
  func removed(_ offsets: Range<UInt64>, in region: PluginRegion) { forget(region, offsets) }
  func unmapped(_ offsets: Range<UInt64>, in region: PluginRegion) { forget(region, offsets) }
  func regionClosed(_ region: PluginRegion) { forget(region, 0..<UInt64(region.length)) }

  private func forget(_ region: PluginRegion, _ offsets: Range<UInt64>) {
    let pageSize = UInt64(region.pageSize)
    let keys: [Key]
    if UInt64(offsets.count) / pageSize > UInt64(store.entries.count) {
      keys = store.entries.keys.filter { $0.client == region.clientToken && $0.region == region.spec.id && offsets.contains($0.offset) }
    } else {
      keys = stride(from: offsets.lowerBound, to: offsets.upperBound, by: Int(pageSize)).map { Key(client: region.clientToken, region: region.spec.id, offset: $0) }
    }
    for key in keys {
      guard let entry = store.entries[key] else { continue }
      account(removing: entry)
      store.forget(key)
    }
  }

  private func account(adding entry: SwapStore.Entry) {
    rawBytes += systemPageSizeForStats
    heldBytes += Int(entry.length)
  }

  private func account(removing entry: SwapStore.Entry) {
    rawBytes -= systemPageSizeForStats
    heldBytes -= Int(entry.length)
  }

  private let systemPageSizeForStats = Int(sysconf(Int32(_SC_PAGESIZE)))
}
