import BrokerProtocol
import Glibc
import Userfaultfd

/// The ranges of a client's regions that plugins handed to the broker to serve
/// by itself (the broker-local fast path). Offsets are region offsets, stable
/// across mremap. A removed or unmapped part leaves the table: its next fault
/// goes to the plugin again, which has seen the event first.
struct DelegatedRanges {
  /// A descriptor shared by the pieces of one delegation; closed with the last.
  ///
  /// The part of the file inside the delegation is also mapped read-only, so a
  /// fault is filled by one UFFDIO_COPY straight from the page cache: no pread
  /// and no copy through a buffer. What lay past the end of the file when it
  /// was delegated is read with pread (it reads as zeros), and so is anything
  /// the kernel cannot read through the mapping because the file shrank since.
  final class File {
    let fd: CInt
    private var mapping: UnsafeMutableRawPointer?
    /// The file offsets the mapping covers: a page-aligned start, the file's size at delegation time as the end.
    private var mapped: Swift.Range<UInt64> = 0..<0

    init(fd: CInt) { self.fd = fd }

    deinit {
      if let mapping { munmap(mapping, Int(mapped.count)) }
      closeDescriptor(fd)
    }

    /// Maps file offsets `offsets` (page aligned), clipped to the file's `size`; without a mapping, faults use pread.
    func map(_ offsets: Swift.Range<UInt64>, size: UInt64) {
      let end = min(offsets.upperBound, size)
      guard mapping == nil, end > offsets.lowerBound, end - offsets.lowerBound <= UInt64(Int.max),
            let pointer = mmap(nil, Int(end - offsets.lowerBound), PROT_READ, MAP_SHARED, fd, off_t(offsets.lowerBound)),
            pointer != MAP_FAILED
      else { return }
      mapping = pointer
      mapped = offsets.lowerBound..<end
    }

    /// The broker's mapping of file offsets `offsets`, if all of them are mapped.
    func bytes(at offsets: Swift.Range<UInt64>) -> UnsafeRawBufferPointer? {
      guard let mapping, mapped.lowerBound <= offsets.lowerBound, offsets.upperBound <= mapped.upperBound else { return nil }
      return UnsafeRawBufferPointer(start: mapping + Int(offsets.lowerBound - mapped.lowerBound), count: offsets.count)
    }
  }

  enum Source {
    case zero
    /// `offset`: where the range's first byte lies in the file.
    case file(File, offset: UInt64)
  }

  struct Range {
    var regionID: UInt64
    var offsets: Swift.Range<UInt64>
    var source: Source
    var prefetchPages: Int

    /// The file offset of region offset `offset`.
    func fileOffset(of offset: UInt64) -> UInt64? {
      guard case .file(_, let start) = source else { return nil }
      return start + (offset - offsets.lowerBound)
    }
  }

  private(set) var ranges: [Range] = []

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
  }
}
