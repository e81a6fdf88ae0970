/// A set of region offsets as sorted, disjoint, non-adjacent ranges: the pages
/// a swap-out released, or those a plugin lost. Updates cost O(ranges); a
/// swap-out's pages come in a few large runs, so there are few.
public struct OffsetRanges: Equatable, Sendable {
  /// The ranges, sorted, disjoint and non-adjacent.
  public private(set) var ranges: [Range<UInt64>] = []

  /// The union of `ranges` (in any order, overlapping or not).
  public init(_ ranges: [Range<UInt64>] = []) {
    for range in ranges { insert(range) }
  }

  /// Whether the set is empty.
  public var isEmpty: Bool { ranges.isEmpty }

  /// The bytes covered.
  public var count: UInt64 { ranges.reduce(0) { $0 &+ ($1.upperBound - $1.lowerBound) } }

  /// Adds `range`, merging it with the ranges it overlaps or touches.
  public mutating func insert(_ range: Range<UInt64>) {
    guard !range.isEmpty else { return }
    var lower = range.lowerBound
    var upper = range.upperBound
    // Every range that touches or overlaps merges into one.
    let first = ranges.firstIndex { $0.upperBound >= lower } ?? ranges.count
    var end = first
    while end < ranges.count && ranges[end].lowerBound <= upper {
      lower = min(lower, ranges[end].lowerBound)
      upper = max(upper, ranges[end].upperBound)
      end += 1
    }
    ranges.replaceSubrange(first..<end, with: [lower..<upper])
  }

  /// Removes `range`, splitting a range it falls inside.
  public mutating func subtract(_ range: Range<UInt64>) {
    guard !range.isEmpty else { return }
    var kept: [Range<UInt64>] = []
    kept.reserveCapacity(ranges.count + 1)
    for existing in ranges {
      guard existing.overlaps(range) else {
        kept.append(existing)
        continue
      }
      if existing.lowerBound < range.lowerBound { kept.append(existing.lowerBound..<range.lowerBound) }
      if range.upperBound < existing.upperBound { kept.append(range.upperBound..<existing.upperBound) }
    }
    ranges = kept
  }

  /// Whether `offset` lies in the set (binary search: the fault path asks).
  public func contains(_ offset: UInt64) -> Bool {
    var low = 0
    var high = ranges.count
    while low < high {
      let middle = (low + high) / 2
      if ranges[middle].upperBound <= offset { low = middle + 1 } else { high = middle }
    }
    return low < ranges.count && ranges[low].contains(offset)
  }

  /// The parts of the set inside `range`.
  public func clamped(to range: Range<UInt64>) -> [Range<UInt64>] {
    ranges.filter { $0.overlaps(range) }.map { $0.clamped(to: range) }
  }

  /// At most `limit` ranges: the closest neighbours are merged (the gaps
  /// between them join the set), so a record never outgrows a message.
  public func coarsened(to limit: Int) -> [Range<UInt64>] {
    var result = ranges
    while result.count > max(limit, 1) {
      var merged: [Range<UInt64>] = []
      var index = 0
      while index < result.count {
        if index + 1 < result.count {
          merged.append(result[index].lowerBound..<result[index + 1].upperBound)
          index += 2
        } else {
          merged.append(result[index])
          index += 1
        }
      }
      result = merged
    }
    return result
  }
}
