/// What a client learns from its read journal when the broker died with a read
/// of its uffd unsettled (CUserfaultfd.h): the REMOVE ranges that read held,
/// which the broker may have acted on without sending the drop record.
public enum UnsettledRead: Sendable, Equatable {
  /// Address ranges the program dropped (MADV_DONTNEED).
  case removes([Range<UInt>])
  /// A remove was read past the journal's end: nothing not present can be vouched for.
  case overflowed

  /// A region's drop record: pages dropped (read zeros), and pages no one can vouch for (fail closed).
  public typealias DropRecord = (dropped: [Range<UInt64>], unknown: [Range<UInt64>])

  /// The drop record of `region` once this read is added to `record` (the last
  /// one the broker sent; nil: the one the region registered with), where the
  /// region lies (`pieces`; nil: at its base). A remove's pages are dropped
  /// (they read zeros), except over swapped-out pages (the swap-out's own drop
  /// or a later one: no one can tell which) and past the extent limit: there
  /// they are covered as unknown and fail closed. Shared memory is left as it is.
  public func dropRecord(of region: RegionSpec, _ record: DropRecord?, pieces: [RegionPiece]?) -> DropRecord {
    // Shared memory has no drops: a dropped page reads its file again.
    if region.isSharedMemory { return record ?? (region.dropped, region.unknown) }
    var dropped = OffsetRanges(record?.dropped ?? region.dropped)
    var unknown = OffsetRanges(record?.unknown ?? region.unknown)
    let removes: [Range<UInt>]
    switch self {
    case .overflowed:
      unknown.insert(0..<UInt64(region.length))
      return (dropped.ranges, unknown.coarsened(to: RegionSpec.maxExtents))
    case .removes(let ranges): removes = ranges
    }
    let swapped = OffsetRanges(region.swappedOut)
    let places = pieces ?? [RegionPiece(address: region.base, offset: 0, length: region.length)]
    for remove in removes {
      for piece in places where piece.range.overlaps(remove) {
        let part = piece.range.clamped(to: remove)
        let offsets = piece.offset + UInt64(part.lowerBound - piece.address)..<piece.offset + UInt64(part.upperBound - piece.address)
        var zeros = OffsetRanges([offsets])
        for range in swapped.clamped(to: offsets) {
          zeros.subtract(range)
          unknown.insert(range)
        }
        for range in zeros.ranges {
          var grown = dropped
          grown.insert(range)
          if grown.ranges.count <= RegionSpec.maxExtents { dropped = grown } else { unknown.insert(range) }
        }
      }
    }
    return (dropped.ranges, unknown.coarsened(to: RegionSpec.maxExtents))
  }
}
