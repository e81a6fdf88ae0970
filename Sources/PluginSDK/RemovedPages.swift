/// The region offsets a client dropped (MADV_DONTNEED, MADV_REMOVE, a balloon):
/// fresh anonymous memory reads them as zeros from then on, so a plugin that
/// restores or generates content answers them with zeros, not its backing.
/// Page by page: a fault's lookup costs the same however many removals came
/// before it (a soak sends tens of thousands). Copy it for a forked child.
public struct RemovedPages: Sendable {
  private var pages = Set<UInt64>()

  /// No page removed.
  public init() {}

  /// Records the pages of `offsets` (widened to whole pages).
  public mutating func insert(_ offsets: Range<UInt64>, pageSize: Int) {
    var offset = offsets.lowerBound / UInt64(pageSize) * UInt64(pageSize)
    while offset < offsets.upperBound {
      pages.insert(offset)
      offset += UInt64(pageSize)
    }
  }

  /// Whether the page holding `offset` was removed.
  public func contains(_ offset: UInt64, pageSize: Int) -> Bool {
    !pages.isEmpty && pages.contains(offset / UInt64(pageSize) * UInt64(pageSize))
  }

  /// Whether no page was removed.
  public var isEmpty: Bool { pages.isEmpty }
}
