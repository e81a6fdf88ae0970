import BrokerProtocol
import CLinux
import ClientSDK
import Glibc

extension FixtureClient {
  /// Regions added and removed after registration (BrokerClient.addRegions /
  /// removeRegions): an added region is served with its own backing offset; an
  /// overlapping one is refused; a removed one is plain memory again.
  func addAndRemoveRegions() throws -> Int32 {
    let length = mib << 20
    let first = try AnonymousMemory(length: length)
    let second = try AnonymousMemory(length: length)
    let one = RegionSpec(id: 1, base: first.address, length: length, plugin: plugin)
    let two = RegionSpec(id: 2, base: second.address, length: length, plugin: plugin, backingOffset: UInt64(length))
    let client = try BrokerClient(regions: [one], name: "fixture-regions")
    try client.addRegions([two])
    var refusal = "none"
    do {
      try client.addRegions([RegionSpec(id: 3, base: second.address, length: pageSize, plugin: plugin)])
    } catch {
      refusal = error.broker?.code == .badRegion ? "bad region" : "\(error)"
    }
    // Refused (no such plugin): its range is unregistered again, so a touch reads plain zeros
    // instead of a fault no one serves.
    let third = try AnonymousMemory(length: pageSize)
    let unknown = (try? client.addRegions([RegionSpec(id: 4, base: third.address, length: pageSize, plugin: "no-such-plugin")])) == nil
    let plain = unknown && third.base.load(as: UInt64.self) == 0
    var wrong = 0
    for (memory, backing) in [(first, 0), (second, length)] {
      for page in stride(from: 0, to: length, by: pageSize) {
        _ = clinux_touch(UnsafeRawPointer(bitPattern: memory.address + UInt(page)))
        let bytes = UnsafeRawBufferPointer(start: memory.base + page, count: pageSize)
        if Pattern.mismatch(bytes, backingOffset: UInt64(backing + page)) != nil { wrong += 1 }
      }
    }
    // Removed: dropped pages of region 1 read as plain zero memory, not through the plugin.
    try client.removeRegions([one])
    madvise(first.base, length, MADV_DONTNEED)
    let zeros = (0..<length / pageSize).allSatisfy { page in
      UnsafeRawBufferPointer(start: first.base + page * pageSize, count: pageSize).allSatisfy { $0 == 0 }
    }
    // Region 2 is still served: its plugin hears of this remove, after region 1's close.
    madvise(second.base, pageSize, MADV_DONTNEED)
    withExtendedLifetime(client) {}
    print("regions: added 1, overlap refused: \(refusal), refused range plain: \(plain), verified \(2 * length / pageSize) pages, \(wrong) wrong, removed region reads zeros: \(zeros)")
    return wrong == 0 && zeros && plain ? 0 : 1
  }
}
