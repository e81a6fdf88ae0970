/// A delegation's background fill (`Delegation.stream`, `streamFirst`): where
/// it stands. It names region offsets only; what each block is filled with,
/// and whether it is still delegated at all, is looked up in `DelegatedRanges`
/// when the block's turn comes, so a stream never fills what a fault there
/// would not get at that moment.
struct DelegatedStream {
  var regionID: UInt64
  /// Offsets whose blocks come first, in order (a working set), and how many were taken.
  var first: [UInt64]
  var nextFirst = 0
  /// The part of the sweep not yet taken (empty: no sweep, or done).
  var sweep: Range<UInt64>
  /// A chunk to take again before anything else (after EAGAIN, or the rest of a block cut short).
  var retry: Range<UInt64>?

  /// The next offsets to fill, cut to the delegated range serving them, or nil
  /// when the stream is done: for a working-set offset the block a fault there
  /// would fill, for the sweep an aligned block of `block` bytes (a power of two).
  /// Offsets no longer delegated are skipped (a fault there goes to the plugin).
  mutating func next(block: UInt64, pageSize: Int, systemPageSize: Int, in delegated: DelegatedRanges) -> (Range<UInt64>, DelegatedRanges.Range)? {
    if let chunk = retry {
      retry = nil
      if let range = delegated.range(regionID: regionID, offset: chunk.lowerBound) { return (chunk.clamped(to: range.offsets), range) }
    }
    while nextFirst < first.count {
      let offset = first[nextFirst]
      nextFirst += 1
      guard let range = delegated.range(regionID: regionID, offset: offset) else { continue }
      let faultBlock = range.faultBlock(pageSize: pageSize, systemPageSize: systemPageSize)
      let start = offset / faultBlock * faultBlock
      return ((start..<start + faultBlock).clamped(to: range.offsets), range)
    }
    while !sweep.isEmpty {
      let offset = sweep.lowerBound
      guard let range = delegated.range(regionID: regionID, offset: offset) else {
        // Not delegated here: on to the next delegated start in the sweep, if any.
        var next = sweep.upperBound
        for range in delegated.ranges where range.regionID == regionID && range.offsets.lowerBound > offset { next = min(next, range.offsets.lowerBound) }
        sweep = next..<sweep.upperBound
        continue
      }
      let end = min((offset & ~(block - 1)) + block, range.offsets.upperBound, sweep.upperBound)
      sweep = end..<sweep.upperBound
      return (offset..<end, range)
    }
    return nil
  }
}
