import BrokerProtocol
import Userfaultfd

/// The live regions of one client: which addresses are served, by which
/// plugin, at which offset of the region's backing. Munmap and mremap cut and
/// move the live pieces; offsets stay those of the region as registered.
///
/// **The kernel's event model**, which the table follows (each sequence is
/// recorded against the real kernel in `KernelEventSequenceTests`):
/// - `munmap` (and `mmap(MAP_FIXED)` over registered memory): UNMAP(range).
/// - `MADV_DONTNEED`/`MADV_REMOVE`: REMOVE(range); the range stays registered.
/// - `mremap` shrink: UNMAP(the cut-off tail).
/// - `mremap` move (`MAYMOVE`, with or without `FIXED`): [UNMAP(destination), if
///   `FIXED` replaced registered memory] REMAP(old → new, old length), then a
///   trailing UNMAP(old range); with `MREMAP_DONTUNMAP` no trailing UNMAP.
/// - `mremap` grow, in place or moved: no event for the new tail, which the
///   kernel keeps registered. The table learns of it from a fault (`newMemory`).
///
/// What the kernel does **not** guarantee: events are queued after the mmap
/// lock is dropped, so the sequences of two threads interleave in the uffd. A
/// trailing UNMAP can arrive after another thread's REMAP moved something new
/// into the range it names. The REMAP already took everything out of its source,
/// so the trailing UNMAP carries nothing: `unmap(_:)` recognises it and cuts
/// nothing (`movedAway`). Stale pieces the table keeps longer than the kernel
/// are harmless (no fault comes from unmapped memory, and a later move there
/// cuts them); a piece it lacks is what `newMemory(around:in:)` and the
/// session's fail-closed path deal with.
public struct RegionTable {
  public struct Piece {
    public var spec: RegionSpec
    /// The addresses of this piece now.
    public var live: Range<UInt>
    /// The region offset of `live.lowerBound`.
    public var offset: UInt64
    let route: PluginRoute
    /// Memory the kernel registered without an event (a tail grown by mremap, a
    /// `MREMAP_DONTUNMAP` source): new anonymous memory, zero until written. The
    /// broker fills it itself; plugins never hear of it.
    public var isNewMemory = false

    /// The region offset of `address` (which must lie in `live`).
    public func offset(of address: UInt) -> UInt64 { offset + UInt64(address - live.lowerBound) }
    /// The address of region offset `offset`, if that offset is live in this piece.
    public func address(ofOffset value: UInt64) -> UInt? {
      // Compared before adding: a client's offset may be anything up to 2^64 - 1.
      guard value >= offset, value - offset < UInt64(live.count) else { return nil }
      return live.lowerBound + UInt(value - offset)
    }
  }

  /// Sorted by address, never overlapping.
  public private(set) var pieces: [Piece] = []
  /// Whether a region with pages over 4 KiB was ever added: until then a
  /// fault's page needs no lookup (`pageSize(at:system:)`). Only a shortcut:
  /// on a system of larger pages it is set for every region, and costs a lookup.
  public private(set) var mayHaveHugePages = false
  /// Sources of REMAPs whose trailing UNMAP has not been read yet, oldest first.
  public private(set) var movedAway: [Range<UInt>] = []
  /// A `MREMAP_DONTUNMAP` move has no trailing UNMAP: its entry stays until pushed out.
  static let movedAwayLimit = 64

  public init() {}

  public var regionIDs: Set<UInt64> { Set(pieces.map(\.spec.id)) }

  /// Checks new regions: aligned to their own page size, which is one of
  /// `pageSizes` (the system's, or a huge page size the kernel offers),
  /// non-empty, not overlapping each other or the table, ids unused.
  public func validate(_ specs: [RegionSpec], pageSizes: Set<Int>) throws(BrokerError) {
    let used = regionIDs
    var seen = Set<UInt64>()
    var ranges = pieces.map(\.live)
    for spec in specs {
      guard pageSizes.contains(spec.pageSize) else {
        let sizes = pageSizes.sorted().map(String.init).joined(separator: " or ")
        throw BrokerError(.badRegion, "region \(spec.id): page size \(spec.pageSize) is not supported (this system serves \(sizes) bytes)")
      }
      let mask = UInt(spec.pageSize - 1)
      guard spec.length > 0, spec.base & mask == 0, UInt(spec.length) & mask == 0, spec.base <= UInt.max - UInt(spec.length) else {
        throw BrokerError(.badRegion, "region \(spec.id): base 0x\(String(spec.base, radix: 16)) and length \(spec.length) must be non-empty and page aligned")
      }
      guard !used.contains(spec.id), seen.insert(spec.id).inserted else {
        throw BrokerError(.badRegion, "region id \(spec.id) is used twice")
      }
      guard !spec.plugin.isEmpty else { throw BrokerError(.badRegion, "region \(spec.id) names no plugin") }
      guard spec.plugin.utf8.count <= RegionSpec.maxPluginNameBytes, spec.argument.utf8.count <= RegionSpec.maxArgumentBytes else {
        throw BrokerError(.badRegion, "region \(spec.id): a plugin name is at most \(RegionSpec.maxPluginNameBytes) bytes, an argument at most \(RegionSpec.maxArgumentBytes)")
      }
      for (name, extents) in [("swapped-out", spec.swappedOut), ("dropped", spec.dropped), ("unknown", spec.unknown)] {
        guard extents.count <= RegionSpec.maxExtents,
              extents.allSatisfy({ $0.lowerBound & UInt64(mask) == 0 && $0.upperBound & UInt64(mask) == 0 && $0.upperBound <= UInt64(spec.length) })
        else {
          throw BrokerError(.badRegion, "region \(spec.id): \(name) extents must be page aligned, inside the region, at most \(RegionSpec.maxExtents)")
        }
      }
      for piece in spec.pieces {
        guard piece.length > 0, piece.address & mask == 0, UInt(piece.length) & mask == 0, piece.offset & UInt64(mask) == 0,
              piece.offset <= UInt64(spec.length), UInt64(piece.length) <= UInt64(spec.length) - piece.offset
        else {
          throw BrokerError(.badRegion, "region \(spec.id): a piece must be page aligned and inside the region's offsets")
        }
      }
      for range in spec.pieces.isEmpty ? [spec.range] : spec.pieces.map(\.range) {
        if let other = ranges.first(where: { $0.overlaps(range) }) {
          throw BrokerError(.badRegion, "region \(spec.id) overlaps 0x\(String(other.lowerBound, radix: 16))..<0x\(String(other.upperBound, radix: 16))")
        }
        ranges.append(range)
      }
    }
  }

  /// Adds a region where it lies: at its base, or (re-attached after an mremap) in its pieces.
  mutating func add(_ spec: RegionSpec, route: PluginRoute) {
    if spec.pageSize > 4096 { mayHaveHugePages = true }
    if spec.pieces.isEmpty {
      insert(Piece(spec: spec, live: spec.range, offset: 0, route: route))
    } else {
      for piece in spec.pieces { insert(Piece(spec: spec, live: piece.range, offset: piece.offset, route: route)) }
    }
  }

  /// Where region `id` (nil: every region) lies now, new memory aside, for the client.
  public func layout(of id: UInt64? = nil) -> [RegionPiece] {
    pieces.filter { piece in !piece.isNewMemory && (id == nil || piece.spec.id == id) }.map { RegionPiece(address: $0.live.lowerBound, offset: $0.offset, length: $0.live.count) }
  }

  /// An UNMAP event: cuts `range`, unless it is the trailing UNMAP of a move
  /// read earlier (see the type's doc), which cuts nothing. Returns what was cut.
  public mutating func unmap(_ range: Range<UInt>) -> [(piece: Piece, range: Range<UInt>)] {
    if let index = movedAway.firstIndex(of: range) {
      movedAway.remove(at: index)
      return []
    }
    forgetMovedAway(overlapping: range)
    return cut(range)
  }

  /// A move's source that is unmapped in part, or moved again, is no longer
  /// waiting for its trailing UNMAP (a `DONTUNMAP` source, which has none, the
  /// program has since changed): a later UNMAP of exactly that range is real.
  private mutating func forgetMovedAway(overlapping range: Range<UInt>) {
    movedAway.removeAll { $0.overlaps(range) }
  }

  /// Where a fault with no piece lies in memory the kernel registered without
  /// telling (`mapping`: the kernel's mapping around `address`): the tail of a
  /// piece that grew in place or while moving (the mapping continues past the
  /// piece's end), or the source of a move whose trailing UNMAP never came
  /// (`MREMAP_DONTUNMAP`). Returns the unknown stretch around `address`, or nil
  /// when the fault is in neither (then the table has lost track of it).
  public func newMemory(around address: UInt, in mapping: Range<UInt>) -> Range<UInt>? {
    guard mapping.contains(address), piece(containing: address) == nil else { return nil }
    let next = firstIndex(endingAfter: address)
    let previous = next - 1
    var lower = max(mapping.lowerBound, previous >= 0 ? pieces[previous].live.upperBound : 0)
    let upper = min(mapping.upperBound, next < pieces.count ? pieces[next].live.lowerBound : .max)
    let grown = previous >= 0 && pieces[previous].live.upperBound > mapping.lowerBound
    if grown { return lower..<upper }
    guard let source = movedAway.first(where: { $0.contains(address) }) else { return nil }
    lower = max(lower, source.lowerBound)
    return lower..<min(upper, source.upperBound)
  }

  /// Records `range` as new memory of the region whose piece precedes it (or,
  /// for a move's source, of no region in particular: `spec` names the nearest).
  mutating func addNewMemory(_ range: Range<UInt>) {
    let index = firstIndex(endingAfter: range.lowerBound)
    guard let neighbour = index > 0 ? pieces[index - 1] : pieces.first else { return }
    insert(Piece(spec: neighbour.spec, live: range, offset: UInt64(neighbour.spec.length), route: neighbour.route, isNewMemory: true))
  }

  /// Turns what the table serves in `range` into new memory (a forked child's
  /// copy of a `MADV_WIPEONFORK` mapping): zeros, filled by the broker.
  mutating func makeNewMemory(_ range: Range<UInt>) {
    for part in cut(range) {
      insert(Piece(spec: part.piece.spec, live: part.range, offset: UInt64(part.piece.spec.length), route: part.piece.route, isNewMemory: true))
    }
  }

  /// Removes every piece of region `id`; returns whether there was one.
  @discardableResult
  public mutating func remove(regionID id: UInt64) -> Bool {
    let before = pieces.count
    pieces.removeAll { $0.spec.id == id }
    return pieces.count != before
  }

  /// The page size at `address`: its region's, or `system` where no region is
  /// (or none has huge pages, which costs no lookup).
  public func pageSize(at address: UInt, system: Int) -> Int {
    guard mayHaveHugePages, let piece = piece(containing: address) else { return system }
    return piece.spec.pageSize
  }

  /// The piece serving `address` (binary search: the fault path).
  public func piece(containing address: UInt) -> Piece? {
    let index = firstIndex(endingAfter: address)
    return index < pieces.count && pieces[index].live.contains(address) ? pieces[index] : nil
  }

  /// The index of the first piece whose end is after `address` (binary search).
  private func firstIndex(endingAfter address: UInt) -> Int {
    var low = 0
    var high = pieces.count
    while low < high {
      let middle = (low + high) / 2
      if pieces[middle].live.upperBound <= address { low = middle + 1 } else { high = middle }
    }
    return low
  }

  /// The indices of the pieces that `range` overlaps.
  private func indices(overlapping range: Range<UInt>) -> Range<Int> {
    let first = firstIndex(endingAfter: range.lowerBound)
    var end = first
    while end < pieces.count && pieces[end].live.lowerBound < range.upperBound { end += 1 }
    return first..<end
  }

  /// The parts of pieces that `range` covers, each with its region offset.
  public func overlapping(_ range: Range<UInt>) -> [(piece: Piece, range: Range<UInt>)] {
    indices(overlapping: range).map { (pieces[$0], pieces[$0].live.clamped(to: range)) }
  }

  /// Cuts `range` out of the table (munmap); returns what was cut.
  @discardableResult
  public mutating func cut(_ range: Range<UInt>) -> [(piece: Piece, range: Range<UInt>)] {
    let hit = indices(overlapping: range)
    guard !hit.isEmpty else { return [] }
    let cut = hit.map { (pieces[$0], pieces[$0].live.clamped(to: range)) }
    var kept: [Piece] = []
    let first = pieces[hit.lowerBound]
    let last = pieces[hit.upperBound - 1]
    if first.live.lowerBound < range.lowerBound {
      kept.append(Piece(spec: first.spec, live: first.live.lowerBound..<range.lowerBound, offset: first.offset, route: first.route, isNewMemory: first.isNewMemory))
    }
    if range.upperBound < last.live.upperBound {
      kept.append(Piece(spec: last.spec, live: range.upperBound..<last.live.upperBound, offset: last.offset(of: range.upperBound), route: last.route, isNewMemory: last.isNewMemory))
    }
    pieces.replaceSubrange(hit, with: kept)
    return cut
  }

  /// Moves the pieces in `from..<from+length` to start at `to` (mremap);
  /// whatever was live at the destination is replaced. Returns the moved parts (at their new place).
  @discardableResult
  public mutating func move(from: UInt, to: UInt, length: Int) -> [Piece] {
    let moved = cut(from..<from + UInt(length)).map { part in
      Piece(spec: part.piece.spec, live: part.range.lowerBound - from + to..<part.range.upperBound - from + to,
            offset: part.piece.offset(of: part.range.lowerBound), route: part.piece.route, isNewMemory: part.piece.isNewMemory)
    }
    cut(to..<to + UInt(length))
    for piece in moved { insert(piece) }
    forgetMovedAway(overlapping: from..<from + UInt(length))
    movedAway.append(from..<from + UInt(length))
    if movedAway.count > Self.movedAwayLimit { movedAway.removeFirst() }
    return moved
  }

  /// Inserts a piece at its place, merged with neighbours that continue it
  /// (same region, contiguous addresses and offsets): mremap swaps back and
  /// forth would otherwise fragment the table for good.
  private mutating func insert(_ piece: Piece) {
    var index = firstIndex(endingAfter: piece.live.lowerBound)
    pieces.insert(piece, at: index)
    if index > 0 && Self.continues(pieces[index - 1], with: pieces[index]) {
      pieces[index - 1].live = pieces[index - 1].live.lowerBound..<pieces[index].live.upperBound
      pieces.remove(at: index)
      index -= 1
    }
    if index + 1 < pieces.count && Self.continues(pieces[index], with: pieces[index + 1]) {
      pieces[index].live = pieces[index].live.lowerBound..<pieces[index + 1].live.upperBound
      pieces.remove(at: index + 1)
    }
  }

  private static func continues(_ a: Piece, with b: Piece) -> Bool {
    a.spec.id == b.spec.id && a.route === b.route && a.isNewMemory == b.isNewMemory && a.live.upperBound == b.live.lowerBound
      && (a.isNewMemory || a.offset + UInt64(a.live.count) == b.offset)
  }
}
