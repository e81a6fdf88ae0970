/// The map events (remove, unmap, remap) of one userfaultfd, numbered in read
/// order: whether one overlapping a range was read after a fault was handed
/// out (then a decision made for that fault is stale). Ranges are kept only
/// while faults are out, and at most `limit` of them: a fault handed out before
/// the oldest one kept is conservatively stale.
public struct Invalidations: Sendable {
  /// How many map events were read: a fault handed out at `sequence` is stale
  /// if an overlapping event is numbered after it.
  public private(set) var sequence: UInt64 = 0
  private var recent: [(sequence: UInt64, range: Range<UInt>)] = []
  private var floor: UInt64 = 0
  static let limit = 4096

  /// No event read yet.
  public init() {}

  /// Numbers a map event over `ranges`; they are kept if `faultsOut` (else
  /// nothing handed out can be made stale by them).
  public mutating func record(_ ranges: Range<UInt>..., faultsOut: Bool) {
    sequence += 1
    guard faultsOut else { return }
    for range in ranges {
      if recent.count == Self.limit { floor = recent.removeFirst().sequence }
      recent.append((sequence, range))
    }
  }

  /// No fault is out any more: forget the ranges.
  public mutating func clear() {
    guard !recent.isEmpty else { return }
    recent.removeAll(keepingCapacity: true)
    floor = sequence
  }

  /// True if an event overlapping `range` was read after `since` (a value of `sequence`).
  public func isStale(_ range: Range<UInt>, since: UInt64) -> Bool {
    if since >= sequence { return false }
    if since < floor { return true }
    for entry in recent.reversed() {
      if entry.sequence <= since { break }
      if entry.range.overlaps(range) { return true }
    }
    return false
  }
}
