import BrokerProtocol
import CUserfaultfd
import Glibc
import LinuxSupport
import SystemPackage

/// A client's read journal (CUserfaultfd.h): the broker reads the client's
/// uffd into it and hands it to the client read-only, so that a broker killed
/// between a read and the notices it owes (a MADV_DONTNEED's drop record)
/// leaves the re-attaching client what that read held.
final class ReadJournal {
  let descriptor: OwnedDescriptor
  private let mapping: UnsafeMutableRawPointer
  /// Slots written since the journal was last settled.
  private var used: CInt = 0
  /// A read is not settled yet: its events may not all be acted on and told.
  private(set) var isOpen = false
  /// Sent to the client with its Register's Ack.
  var handedOver = false

  init() throws(BrokerError) {
    var mapping: UnsafeMutableRawPointer?
    let fd = cuffd_journal_create(&mapping)
    guard fd >= 0, let mapping else { throw BrokerError(.io, "cannot create a read journal", errno: Errno(rawValue: -fd)) }
    descriptor = OwnedDescriptor(fd)
    self.mapping = mapping
  }

  deinit { munmap(mapping, Int(CUFFD_JOURNAL_SIZE)) }

  /// Before a read: a settled journal is cleared, an open one kept.
  func begin() {
    cuffd_journal_begin(mapping, &used)
    isOpen = true
  }

  /// One read(2) of `uffd` into the journal, as `cuffd_read_events`.
  func read(_ uffd: CInt, into events: UnsafeMutablePointer<cuffd_event>, max: CInt) -> Int {
    Int(cuffd_journal_read(uffd, mapping, &used, events, max))
  }

  /// Everything read is acted on and every notice sent.
  func settle() {
    cuffd_journal_settle(mapping)
    isOpen = false
  }
}
