import BrokerProtocol
import Testing
@testable import BrokerCore

/// The region table's bookkeeping, in isolation (the integration tests cover it against the kernel).
@Suite("Region table")
struct RegionTableTests {
  let page = UInt(4096)
  let route = PluginRoute(name: "p", now: 0)

  func table(_ specs: [RegionSpec]) -> RegionTable {
    var table = RegionTable()
    for spec in specs { table.add(spec, route: route) }
    return table
  }

  func spec(_ id: UInt64, at base: UInt, pages: Int) -> RegionSpec {
    RegionSpec(id: id, base: base, length: pages * 4096, pageSize: 4096, plugin: "p")
  }

  @Test("lookup finds the piece and the offset of an address")
  func lookup() {
    let t = table([spec(1, at: 0x10_0000, pages: 4), spec(2, at: 0x20_0000, pages: 2)])
    #expect(t.piece(containing: 0x10_0000 + 3 * page)?.spec.id == 1)
    #expect(t.piece(containing: 0x10_0000 + 3 * page)?.offset(of: 0x10_0000 + 3 * page) == UInt64(3 * page))
    #expect(t.piece(containing: 0x10_0000 + 4 * page) == nil)
    #expect(t.piece(containing: 0x20_0000 + page)?.spec.id == 2)
    #expect(t.piece(containing: 0x0F_F000) == nil)
  }

  @Test("munmap of the middle leaves two pieces that keep their offsets")
  func cutMiddle() {
    var t = table([spec(1, at: 0x10_0000, pages: 8)])
    let cut = t.cut(0x10_0000 + 2 * page..<0x10_0000 + 5 * page)
    #expect(cut.count == 1 && cut[0].range.count == Int(3 * page))
    #expect(t.pieces.count == 2)
    #expect(t.piece(containing: 0x10_0000 + 3 * page) == nil)
    #expect(t.piece(containing: 0x10_0000 + 6 * page)?.offset(of: 0x10_0000 + 6 * page) == UInt64(6 * page))
  }

  @Test("mremap moves pieces with their offsets; swapping back merges them again")
  func moveAndMerge() {
    var t = table([spec(1, at: 0x10_0000, pages: 8)])
    let a = 0x10_0000 + 2 * page, b = 0x10_0000 + 6 * page, scratch = UInt(0x50_0000)
    // Swap two 2-page ranges through a scratch address, twice: back where they started.
    for _ in 0..<2 {
      t.move(from: a, to: scratch, length: Int(2 * page))
      t.move(from: b, to: a, length: Int(2 * page))
      t.move(from: scratch, to: b, length: Int(2 * page))
    }
    #expect(t.pieces.count == 1, "pieces: \(t.pieces.map(\.live))")
    #expect(t.piece(containing: b)?.offset(of: b) == UInt64(6 * page))
    // One swap: offsets follow the pages.
    t.move(from: a, to: scratch, length: Int(2 * page))
    t.move(from: b, to: a, length: Int(2 * page))
    t.move(from: scratch, to: b, length: Int(2 * page))
    #expect(t.piece(containing: a)?.offset(of: a) == UInt64(6 * page))
    #expect(t.piece(containing: b)?.offset(of: b) == UInt64(2 * page))
    #expect(t.piece(containing: scratch) == nil)
  }

  @Test("a trailing UNMAP read after another thread's REMAP into its hole cuts nothing; a plain munmap still cuts")
  func trailingUnmapAfterNewcomer() {
    let x = UInt(0x10_0000), z = x + 4 * page, y = UInt(0x50_0000), length = Int(4 * page)
    var t = table([spec(1, at: x, pages: 8)])
    // A: mremap X → Y; B: mremap Z → X (the hole A left); then A's and B's trailing UNMAPs.
    t.move(from: x, to: y, length: length)
    t.move(from: z, to: x, length: length)
    #expect(t.unmap(x..<x + UInt(length)).isEmpty)
    #expect(t.unmap(z..<z + UInt(length)).isEmpty)
    #expect(t.piece(containing: x)?.offset(of: x) == UInt64(4 * page), "B's pages are where B put them")
    #expect(t.piece(containing: y)?.offset(of: y) == 0)
    #expect(t.piece(containing: z) == nil)
    #expect(t.movedAway.isEmpty)
    // A munmap that no move announced cuts as always.
    #expect(t.unmap(x..<x + page).count == 1)
    #expect(t.piece(containing: x) == nil && t.piece(containing: x + page) != nil)
  }

  @Test("a DONTUNMAP source unmapped in two pieces, memory moved back there, then unmapped exactly: that UNMAP is real")
  func dontUnmapSourceReused() {
    let b = UInt(0x10_0000), y = UInt(0x50_0000), half = Int(8 * page)
    var t = table([spec(1, at: b, pages: 16)])
    t.move(from: b + 8 * page, to: y, length: half)  // DONTUNMAP: no trailing UNMAP follows
    #expect(t.unmap(b + 8 * page..<b + 12 * page).isEmpty)
    #expect(t.unmap(b + 12 * page..<b + 16 * page).isEmpty)
    t.move(from: y, to: b + 8 * page, length: half)
    #expect(t.unmap(y..<y + UInt(half)).isEmpty, "the trailing UNMAP of the move back")
    #expect(t.unmap(b + 8 * page..<b + 16 * page).count == 1, "a real munmap of what came back")
    #expect(t.piece(containing: b + 10 * page) == nil)
  }

  @Test("new memory: a tail the kernel grew past a piece, and the source of a move with no trailing UNMAP")
  func newMemory() {
    let a = UInt(0x10_0000), far = UInt(0x90_0000)
    var t = table([spec(1, at: a, pages: 4), spec(2, at: a + 16 * page, pages: 4)])
    // Grown in place: the kernel's mapping now runs 4 pages past region 1.
    let mapping = a..<a + 8 * page
    #expect(t.newMemory(around: a + 5 * page, in: mapping) == a + 4 * page..<a + 8 * page)
    t.addNewMemory(a + 4 * page..<a + 8 * page)
    #expect(t.piece(containing: a + 6 * page)?.isNewMemory == true)
    #expect(t.piece(containing: a + 3 * page)?.isNewMemory == false)
    // It moves with its region (mremap of the whole mapping), and stays new memory.
    t.move(from: a, to: far, length: Int(8 * page))
    #expect(t.piece(containing: far + 6 * page)?.isNewMemory == true)
    #expect(t.piece(containing: far + page)?.offset(of: far + page) == UInt64(page))
    // A mapping that holds no piece and was no move's source: the table lost track of it.
    #expect(t.newMemory(around: 0x70_0000, in: 0x70_0000..<0x70_0000 + 4 * page) == nil)
    // A region's own gap below its first page is not a tail.
    #expect(t.newMemory(around: a + 15 * page, in: a + 12 * page..<a + 20 * page) == nil)
    // A move's source with no trailing UNMAP yet (MREMAP_DONTUNMAP) is new memory.
    #expect(t.newMemory(around: a + page, in: a..<a + 8 * page) == a..<a + 8 * page)
  }

  @Test("a route's failover chain: effective is its end, passes(through:) names the routes on it")
  func failoverChain() {
    let a = PluginRoute(name: "a", now: 0), b = PluginRoute(name: "b", now: 0), c = PluginRoute(name: "c", now: 0)
    #expect(a.effective === a && a.passes(through: a) && !a.passes(through: b))
    a.failover = b
    b.failover = c
    #expect(a.effective === c && b.effective === c)
    #expect(a.passes(through: b) && a.passes(through: c) && !b.passes(through: a) && !c.passes(through: b))
  }

  @Test("an offset past the piece, however large, has no address (no overflow)")
  func addressOfFarOffset() {
    let t = table([spec(1, at: 0x10_0000, pages: 4)])
    let piece = t.pieces[0]
    #expect(piece.address(ofOffset: 3 * UInt64(page)) == 0x10_0000 + 3 * page)
    #expect(piece.address(ofOffset: 4 * UInt64(page)) == nil)
    #expect(piece.address(ofOffset: 0xFFFF_F000_0000_0000) == nil)
    #expect(piece.address(ofOffset: UInt64.max) == nil)
  }

  @Test("validation refuses misaligned, empty, overlapping and duplicate regions, and overlong names and arguments")
  func validation() {
    let t = table([spec(1, at: 0x10_0000, pages: 4)])
    #expect(throws: BrokerError.self) { try t.validate([spec(2, at: 0x10_0000 + 2 * page, pages: 4)], pageSizes: [4096]) }
    #expect(throws: BrokerError.self) { try t.validate([spec(1, at: 0x40_0000, pages: 1)], pageSizes: [4096]) }
    #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 3, base: 0x40_0010, length: 4096, pageSize: 4096, plugin: "p")], pageSizes: [4096]) }
    #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 3, base: 0x40_0000, length: 0, pageSize: 4096, plugin: "p")], pageSizes: [4096]) }
    #expect(throws: Never.self) { try t.validate([spec(3, at: 0x40_0000, pages: 2)], pageSizes: [4096]) }
    // Names and arguments are bounded, so every region event fits one packet.
    let long = String(repeating: "x", count: RegionSpec.maxArgumentBytes + 1)
    #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 3, base: 0x40_0000, length: 4096, pageSize: 4096, plugin: "p", argument: long)], pageSizes: [4096]) }
    #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 3, base: 0x40_0000, length: 4096, pageSize: 4096, plugin: long)], pageSizes: [4096]) }
    #expect(throws: Never.self) { try t.validate([RegionSpec(id: 3, base: 0x40_0000, length: 4096, pageSize: 4096, plugin: "p", argument: String(long.dropLast()))], pageSizes: [4096]) }
  }

  @Test("validation of page sizes: a huge page region must be whole huge pages; a page size the system does not serve is refused, naming those it does")
  func pageSizeValidation() {
    let t = RegionTable()
    let sizes: Set<Int> = [4096, 2 << 20]
    #expect(throws: Never.self) { try t.validate([RegionSpec(id: 1, base: 0x4000_0000, length: 4 << 20, pageSize: 2 << 20, plugin: "p")], pageSizes: sizes) }
    // Aligned to small pages only: base, then length.
    #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 1, base: 0x4000_1000, length: 4 << 20, pageSize: 2 << 20, plugin: "p")], pageSizes: sizes) }
    #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 1, base: 0x4000_0000, length: (4 << 20) + 4096, pageSize: 2 << 20, plugin: "p")], pageSizes: sizes) }
    let refusal = #expect(throws: BrokerError.self) { try t.validate([RegionSpec(id: 1, base: 0x4000_0000, length: 1 << 30, pageSize: 1 << 30, plugin: "p")], pageSizes: sizes) }
    #expect(refusal?.message == "region 1: page size 1073741824 is not supported (this system serves 4096 or 2097152 bytes)")
  }

  @Test("delegated ranges: a remove cuts them, the tail keeps its file offset")
  func delegations() {
    var ranges = DelegatedRanges()
    ranges.add(.init(regionID: 1, offsets: 0..<UInt64(8 * page), source: .file(FileHandle(1), offset: 0x1000), prefetchPages: 1))
    ranges.cut(regionID: 1, UInt64(2 * page)..<UInt64(4 * page))
    #expect(ranges.range(regionID: 1, offset: UInt64(3 * page)) == nil)
    #expect(ranges.range(regionID: 1, offset: UInt64(5 * page))?.fileOffset(of: UInt64(5 * page)) == 0x1000 + UInt64(5 * page))
    #expect(ranges.range(regionID: 1, offset: UInt64(page))?.fileOffset(of: UInt64(page)) == 0x1000 + UInt64(page))
  }
}
