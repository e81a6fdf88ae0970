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
