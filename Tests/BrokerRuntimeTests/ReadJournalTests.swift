import CUserfaultfd
import Glibc
import Testing
@testable import BrokerRuntime

/// The read journal a client gets: the broker's to write, the client's to read only.
@Suite struct ReadJournalTests {
  @Test("the journal's descriptor cannot be written, mapped writable or resized by whoever holds it (the client)")
  func readOnlyForTheClient() throws {
    let journal = try ReadJournal()
    // What the client gets: the same open file (SCM_RIGHTS), and a fresh open of it.
    let reopened = open("/proc/self/fd/\(journal.descriptor.rawValue)", O_RDWR)
    defer { if reopened >= 0 { close(reopened) } }
    for fd in [journal.descriptor.rawValue, reopened] where fd >= 0 {
      #expect(mmap(nil, 16384, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED)
      var byte: UInt8 = 1
      #expect(pwrite(fd, &byte, 1, 0) == -1)
      #expect(ftruncate(fd, 4096) == -1 && ftruncate(fd, 1 << 20) == -1)
      let view = try #require(mmap(nil, 16384, PROT_READ, MAP_SHARED, fd, 0))
      #expect(view != MAP_FAILED)
      #expect(mprotect(view, 16384, PROT_READ | PROT_WRITE) == -1)
      munmap(view, 16384)
    }
  }
}

/// The journal's bookkeeping, fed kernel-shaped messages through a pipe (read(2) is all it does).
@Suite struct ReadJournalBookkeepingTests {
  /// `count` 32-byte uffd_msg records in a pipe: removes of page i at `removes`, faults elsewhere.
  static func pipe(_ count: Int, removesAt removes: Set<Int>) throws -> (read: CInt, write: CInt) {
    var fds: [CInt] = [0, 0]
    try #require(Glibc.pipe(&fds) == 0)
    for index in 0..<count {
      var message = [UInt8](repeating: 0, count: 32)
      message[0] = removes.contains(index) ? 0x15 : 0x12  // UFFD_EVENT_REMOVE, UFFD_EVENT_PAGEFAULT
      withUnsafeBytes(of: UInt64(index * 4096)) { message.replaceSubrange(8..<16, with: $0) }
      withUnsafeBytes(of: UInt64(index * 4096 + 4096)) { message.replaceSubrange(16..<24, with: $0) }
      try #require(write(fds[1], message, 32) == 32)
    }
    return (fds[0], fds[1])
  }

  /// Reads everything queued into `journal`, then returns what a client would recover.
  static func readAll(_ journal: ReadJournal, from fd: CInt, messages: Int) -> Int32 {
    let events = UnsafeMutablePointer<cuffd_event>.allocate(capacity: 64)
    defer { events.deallocate() }
    journal.begin()
    var read = 0
    while read < messages { read += max(journal.read(fd, into: events, max: 64), 0) }
    let view = mmap(nil, 16384, PROT_READ, MAP_SHARED, journal.descriptor.rawValue, 0)!
    defer { munmap(view, 16384) }
    var starts = [UInt64](repeating: 0, count: 600)
    var ends = [UInt64](repeating: 0, count: 600)
    return cuffd_journal_unsettled_removes(view, 16384, &starts, &ends, 600)
  }

  @Test("an unsettled read's removes are there for the client; settled, nothing is; the next read starts clean")
  func unsettledThenSettled() throws {
    let journal = try ReadJournal()
    let first = try Self.pipe(10, removesAt: [3, 7])
    defer { close(first.read); close(first.write) }
    #expect(Self.readAll(journal, from: first.read, messages: 10) == 2)
    journal.settle()
    let second = try Self.pipe(4, removesAt: [1])
    defer { close(second.read); close(second.write) }
    #expect(Self.readAll(journal, from: second.read, messages: 4) == 1)  // not 3: the first read's slots were cleared
  }

  @Test("past the journal's end faults cost nothing, but a remove marks it overflowed (the client then vouches for nothing)")
  func pastTheEnd() throws {
    let capacity = Int(CUFFD_JOURNAL_CAPACITY)
    let faults = try Self.pipe(capacity + 40, removesAt: [5])
    defer { close(faults.read); close(faults.write) }
    #expect(Self.readAll(try ReadJournal(), from: faults.read, messages: capacity + 40) == 1)
    let removes = try Self.pipe(capacity + 40, removesAt: [5, capacity + 20])
    defer { close(removes.read); close(removes.write) }
    #expect(Self.readAll(try ReadJournal(), from: removes.read, messages: capacity + 40) == -1)
  }
}
