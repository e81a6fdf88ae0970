import BrokerProtocol
import CUserfaultfd
import Glibc

/// The client's read-only view of its read journal (CUserfaultfd.h), which the
/// broker hands over with the Register's Ack: after the broker goes, what a
/// read it had not settled held, so a re-attach registers those drops too.
final class JournalView {
  private let mapping: UnsafeRawPointer
  private static let size = Int(CUFFD_JOURNAL_SIZE)

  /// Maps `descriptor` (then closed); nil if it is not a journal's size.
  init?(adopting descriptor: CInt) {
    defer { close(descriptor) }
    var status = stat()
    guard fstat(descriptor, &status) == 0, status.st_size == Self.size,
          let mapping = mmap(nil, Self.size, PROT_READ, MAP_SHARED, descriptor, 0), mapping != MAP_FAILED
    else { return nil }
    self.mapping = UnsafeRawPointer(mapping)
  }

  deinit { munmap(UnsafeMutableRawPointer(mutating: mapping), Self.size) }

  /// What an unsettled read held; nil if the journal is settled.
  var unsettledRead: UnsettledRead? {
    let capacity = Int(CUFFD_JOURNAL_CAPACITY)
    return withUnsafeTemporaryAllocation(of: UInt64.self, capacity: 2 * capacity) { buffer in
      let starts = buffer.baseAddress!
      let count = cuffd_journal_unsettled_removes(mapping, UInt64(Self.size), starts, starts + capacity, CInt(capacity))
      switch count {
      case 0: return nil
      case ..<0: return .overflowed
      default: return .removes((0..<Int(count)).map { UInt(starts[$0])..<UInt(starts[capacity + $0]) })
      }
    }
  }
}
