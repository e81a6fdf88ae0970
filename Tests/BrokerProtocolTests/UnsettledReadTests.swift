import BrokerProtocol
import Testing

/// What a re-attaching client adds to a region's drop record from an unsettled read.
@Suite("Unsettled reads in the drop record")
struct UnsettledReadTests {
  static let page: UInt64 = 4096
  static let region = RegionSpec(id: 1, base: 0x10_0000, length: 64 << 12, plugin: "p")

  @Test("a remove's pages are added as dropped, where the region lies now (a moved piece maps addresses to its offsets)")
  func removesWhereTheRegionLies() {
    let base = Self.region.base
    let read = UnsettledRead.removes([base + 0x2000..<base + 0x4000, 0x90_0000..<0x90_1000])
    let record = read.dropRecord(of: Self.region, ([0..<Self.page], []), pieces: nil)
    #expect(record.dropped == [0..<Self.page, 2 * Self.page..<4 * Self.page])
    #expect(record.unknown.isEmpty)
    // Offsets 32... moved to 0x90_0000: a remove there drops offset 32.
    let moved = [RegionPiece(address: 0x10_0000, offset: 0, length: 32 << 12), RegionPiece(address: 0x90_0000, offset: 32 * Self.page, length: 32 << 12)]
    let after = read.dropRecord(of: Self.region, nil, pieces: moved)
    #expect(after.dropped == [2 * Self.page..<4 * Self.page, 32 * Self.page..<33 * Self.page])
  }

  @Test("over swapped-out pages a remove cannot be told from the swap-out's own: those fail closed (unknown)")
  func swappedOutFailsClosed() {
    var region = Self.region
    region.swappedOut = [8 * Self.page..<16 * Self.page]
    let base = Self.region.base
    let read = UnsettledRead.removes([base + 0x6000..<base + 0xa000])  // offsets 6..<10
    let record = read.dropRecord(of: region, nil, pieces: nil)
    #expect(record.dropped == [6 * Self.page..<8 * Self.page])
    #expect(record.unknown == [8 * Self.page..<10 * Self.page])
  }

  @Test("past the extent limit the rest is unknown, never a coarser dropped record (that would zero live pages)")
  func extentLimit() {
    let scattered = (0..<40).map { (index: Int) -> Range<UInt> in
      let start = UInt(0x10_0000 + index * 0x2000)
      return start..<start + 0x1000
    }
    let region = RegionSpec(id: 1, base: 0x10_0000, length: 128 << 12, plugin: "p")
    let record = UnsettledRead.removes(scattered).dropRecord(of: region, nil, pieces: nil)
    #expect(record.dropped.count == RegionSpec.maxExtents)
    #expect(record.dropped.allSatisfy { $0.count == Int(Self.page) })
    let unknown = OffsetRanges(record.unknown)
    #expect((RegionSpec.maxExtents..<40).allSatisfy { unknown.contains(UInt64($0) * 2 * Self.page) })
  }

  @Test("an overflowed journal vouches for nothing: the whole region is unknown, its old drops kept")
  func overflowed() {
    let record = UnsettledRead.overflowed.dropRecord(of: Self.region, ([0..<Self.page], []), pieces: nil)
    #expect(record.dropped == [0..<Self.page])
    #expect(record.unknown == [0..<64 * Self.page])
  }

  @Test("shared memory is left as it is: a page dropped there reads its file again, so nothing is added, not even on overflow")
  func sharedMemoryUntouched() {
    let region = RegionSpec(id: 1, base: 0x10_0000, length: 64 << 12, plugin: "p", backing: .sharedMemory(fileOffset: 0))
    #expect(UnsettledRead.removes([0x10_0000..<0x10_2000]).dropRecord(of: region, nil, pieces: nil) == ([], []))
    #expect(UnsettledRead.overflowed.dropRecord(of: region, nil, pieces: nil) == ([], []))
  }
}
