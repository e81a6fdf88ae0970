import BrokerProtocol

/// The ranges of a client's regions that plugins handed to the broker to serve
/// by itself (the broker-local fast path). Offsets are region offsets, stable
/// across mremap. A removed or unmapped part leaves the table: its next fault
/// goes to the plugin again, which has seen the event first.
struct DelegatedRanges {
  enum Source {
    case zero
    /// `offset`: where the range's first byte lies in the file (which the runtime holds).
    case file(FileHandle, offset: UInt64)
  }

  struct Range {
    var regionID: UInt64
    var offsets: Swift.Range<UInt64>
    var source: Source
    var prefetchPages: Int

    /// The bytes of the aligned block a fault fills: `prefetchPages` small
    /// pages, or one huge page (the most the broker's buffers hold).
    func faultBlock(pageSize: Int, systemPageSize: Int) -> UInt64 {
      UInt64(pageSize == systemPageSize ? prefetchPages * pageSize : pageSize)
    }

    /// The file offset of region offset `offset`.
    func fileOffset(of offset: UInt64) -> UInt64? {
      guard case .file(_, let start) = source else { return nil }
      return start + (offset - offsets.lowerBound)
    }
  }

  private(set) var ranges: [Range] = []
  /// Background fills in progress, the one at the front going on first.
  var streams: [DelegatedStream] = []

  var isEmpty: Bool { ranges.isEmpty }

  /// The delegated range serving `offset` of region `regionID`, if any (the fault path: a short scan).
  func range(regionID: UInt64, offset: UInt64) -> Range? {
    ranges.first { $0.regionID == regionID && $0.offsets.contains(offset) }
  }

  /// Adds a delegation; it replaces whatever was delegated in its range.
  mutating func add(_ range: Range) {
    cut(regionID: range.regionID, range.offsets)
    ranges.append(range)
  }

  /// Takes `offsets` of region `regionID` out of every delegation (revoke, remove, unmap).
  mutating func cut(regionID: UInt64, _ offsets: Swift.Range<UInt64>) {
    guard ranges.contains(where: { $0.regionID == regionID && $0.offsets.overlaps(offsets) }) else { return }
    var result: [Range] = []
    for range in ranges {
      guard range.regionID == regionID, range.offsets.overlaps(offsets) else {
        result.append(range)
        continue
      }
      if range.offsets.lowerBound < offsets.lowerBound {
        var head = range
        head.offsets = range.offsets.lowerBound..<offsets.lowerBound
        result.append(head)
      }
      if offsets.upperBound < range.offsets.upperBound {
        var tail = range
        tail.offsets = offsets.upperBound..<range.offsets.upperBound
        if case .file(let file, _) = range.source, let fileOffset = range.fileOffset(of: offsets.upperBound) {
          tail.source = .file(file, offset: fileOffset)
        }
        result.append(tail)
      }
    }
    ranges = result
  }

  mutating func removeAll(regionID: UInt64) {
    ranges.removeAll { $0.regionID == regionID }
    streams.removeAll { $0.regionID == regionID }
  }

  /// The files some range still reads from.
  var files: Set<FileHandle> {
    Set(ranges.compactMap { if case .file(let file, _) = $0.source { file } else { nil } })
  }
}
