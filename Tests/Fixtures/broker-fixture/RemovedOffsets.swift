/// The region offsets a fixture plugin was told were removed (MADV_DONTNEED),
/// page by page: a fault's lookup costs the same however many removals came
/// before it (a soak sends tens of thousands).
struct RemovedOffsets {
  private var pages = Set<UInt64>()

  mutating func insert(_ offsets: Range<UInt64>, pageSize: Int) {
    var offset = offsets.lowerBound / UInt64(pageSize) * UInt64(pageSize)
    while offset < offsets.upperBound {
      pages.insert(offset)
      offset += UInt64(pageSize)
    }
  }

  /// Whether the page holding `offset` was removed.
  func contains(_ offset: UInt64, pageSize: Int) -> Bool {
    pages.contains(offset / UInt64(pageSize) * UInt64(pageSize))
  }
}
