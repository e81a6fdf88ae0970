// What the kernel itself delivers on a userfaultfd when registered memory is
// unmapped, dropped, remapped or forked, and which ranges are still registered
// afterwards (VmFlags `um` in /proc/self/smaps). These pin the facts the
// dispatcher and the broker rely on (measured on Linux 6.18), read raw: no
// EventDispatcher in between, so nothing is reordered or merged.
//
// A recorder thread reads the uffd the way a page server would, records every
// message in read order and answers page faults with UFFDIO_ZEROPAGE. It reads
// and records under one lock, and the kernel lets munmap/madvise/mremap/fork
// return only once their messages were read, so when such a call has returned
// the recorder already holds everything it caused: no waiting, no sleeps.

import CLinux
import CUserfaultfd
import Glibc
import LinuxSupport
import Synchronization
import SystemPackage
import Testing
import Userfaultfd

/// The map-change events, without thread ids: faults then carry thread 0 and
/// the expected sequences are literal. EVENT_FORK only where a test forks: with
/// it, any fork in this process waits until the recorder has read its message.
private let mapEvents: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap]
private let forkEvents = mapEvents.union(.eventFork)

/// A read fault on `page` as the recorder reads it.
private func fault(_ page: UInt) -> Recorded { .pagefault(Pagefault(address: page, flags: [], thread: 0)) }

/// Reads a userfaultfd, and the child uffds its fork events hand over, on a
/// thread of its own; records every message and zero-fills every fault.
private final class KernelEventRecorder: @unchecked Sendable {
  private struct Log {
    var events: [Recorded] = []
    var childEvents: [Recorded] = []
    var children: [UserfaultFD] = []
  }

  private let uffd: UserfaultFD
  private let log = Mutex(Log())
  private let stopper: CInt
  private var thread: TestThread?

  init(_ uffd: UserfaultFD) throws {
    self.uffd = uffd
    stopper = clinux_eventfd()
    try #require(stopper >= 0, "eventfd failed")
    thread = startThread { [self] in run() }
  }

  /// Messages read from the uffd, in read order.
  var events: [Recorded] { log.withLock { $0.events } }
  /// Messages read from the uffds of forked children, in read order.
  var childEvents: [Recorded] { log.withLock { $0.childEvents } }
  /// The uffds handed over by fork events.
  var children: [UserfaultFD] { log.withLock { $0.children } }

  /// What `body` returned, and the messages recorded from the uffd while it ran.
  func recording<T>(_ body: () throws -> T) rethrows -> (T, [Recorded]) {
    let before = events.count
    let result = try body()
    return (result, Array(events.dropFirst(before)))
  }

  /// The messages recorded from the uffd while `body` ran.
  func during(_ body: () throws -> Void) rethrows -> [Recorded] { try recording(body).1 }

  /// The messages recorded while a bounded thread read one word of each page, in order.
  func touching(_ f: Fixture, _ pages: UInt...) -> [Recorded] {
    during { _ = f.run { for page in pages { _ = load(page) } } }
  }

  func stop() {
    var one: UInt64 = 1
    _ = write(stopper, &one, 8)
    if let thread, eventually({ thread.isFinished }) { pthread_join(thread.handle, nil) }
    thread = nil
    closeDescriptor(stopper)
  }

  private func run() {
    let buffer = UnsafeMutablePointer<cuffd_event>.allocate(capacity: Int(CUFFD_READ_BATCH))
    defer { buffer.deallocate() }
    while true {
      let sources = [uffd] + children
      var fds = [pollfd(fd: stopper, events: Int16(POLLIN), revents: 0)]
        + sources.map { pollfd(fd: $0.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0) }
      if poll(&fds, nfds_t(fds.count), -1) < 0 && errno != EINTR { return }
      if fds[0].revents != 0 { return }
      for (index, source) in sources.enumerated() where fds[index + 1].revents != 0 {
        if fds[index + 1].revents & Int16(POLLERR | POLLNVAL) != 0 { return }
        for page in read(source, isChild: index > 0, into: buffer) {
          _ = source.zero(address: page, length: pageSize)
        }
      }
    }
  }

  /// Reads one batch and records it; returns the pages that faulted.
  private func read(_ source: UserfaultFD, isChild: Bool, into buffer: UnsafeMutablePointer<cuffd_event>) -> [UInt] {
    log.withLock { log in
      let count = Int(cuffd_read_events(source.fileDescriptor.rawValue, buffer, CInt(CUFFD_READ_BATCH)))
      var faults: [UInt] = []
      for event in UnsafeBufferPointer(start: buffer, count: max(count, 0)) {
        let recorded: Recorded
        switch event.event {
        case cuffd_event_pagefault:
          recorded = .pagefault(Pagefault(address: UInt(event.a), flags: .init(rawValue: event.flags), thread: Int32(bitPattern: event.thread)))
          faults.append(UInt(event.a) & ~UInt(pageSize - 1))
        case cuffd_event_remove: recorded = .removed(UInt(event.a)..<UInt(event.b))
        case cuffd_event_unmap: recorded = .unmapped(UInt(event.a)..<UInt(event.b))
        case cuffd_event_remap: recorded = .remapped(from: UInt(event.a), to: UInt(event.b), length: Int(event.length))
        case cuffd_event_fork:
          recorded = .forked
          if let child = try? UserfaultFD(adopting: FileDescriptor(rawValue: event.fd), features: uffd.features, ioctls: uffd.ioctls) {
            log.children.append(child)
          } else {
            closeDescriptor(event.fd)
          }
        default: continue
        }
        if isChild { log.childEvents.append(recorded) } else { log.events.append(recorded) }
      }
      return faults
    }
  }
}

/// Runs `body` with a fixture and a recorder on its uffd; stops the recorder before the fixture's teardown.
private func withRecorder(
  pages: Int, features: UserfaultFD.Features = mapEvents, register: Bool = true,
  _ body: (Fixture, KernelEventRecorder) throws -> Void
) throws {
  try withFixture(pages: pages, features: features, register: register) { f in
    let recorder = try KernelEventRecorder(f.uffd)
    defer { recorder.stop() }
    try body(f, recorder)
  }
}

/// One character per page of `range`, from /proc/self/smaps: "R" registered for
/// missing faults (VmFlags `um`), "-" mapped but not registered, "." not mapped.
private func registration(of range: Range<UInt>) -> String {
  var marks = [Character](repeating: ".", count: range.length / pageSize)
  var vma: Range<UInt>?
  for line in readFile("/proc/self/smaps").split(separator: "\n") {
    let fields = line.split(separator: " ")
    guard let first = fields.first else { continue }
    let bounds = first.split(separator: "-")
    if bounds.count == 2, let start = UInt(bounds[0], radix: 16), let end = UInt(bounds[1], radix: 16) {
      vma = start..<end
    } else if first == "VmFlags:", let vma {
      let registered = fields.contains("um")
      for index in marks.indices where vma.contains(range.page(index)) { marks[index] = registered ? "R" : "-" }
    }
  }
  return String(marks)
}

private func readFile(_ path: String) -> String {
  let fd = open(path, O_RDONLY | O_CLOEXEC)
  guard fd >= 0 else { return "" }
  defer { closeDescriptor(fd) }
  var bytes: [UInt8] = []
  var chunk = [UInt8](repeating: 0, count: 65536)
  while true {
    let count = read(fd, &chunk, chunk.count)
    if count <= 0 { break }
    bytes += chunk[..<count]
  }
  return String(decoding: bytes, as: UTF8.self)
}

/// mremap(2) with any flags, on a bounded thread (it returns once its events
/// were read); the new address, or nil on failure.
private func remap(_ f: Fixture, _ range: Range<UInt>, newLength: Int, flags: CInt, to destination: UInt = 0) -> UInt? {
  let result = f.run { () -> UInt in
    let moved = clinux_mremap(range.pointer, range.length, newLength, flags, UnsafeMutableRawPointer(bitPattern: destination))
    return moved.map { UInt(bitPattern: $0) } ?? UInt.max
  }
  return result == UInt.max ? nil : result
}

/// Fills `page` with its pattern directly (no fault, no message).
private func fillWithPattern(_ f: Fixture, _ page: UInt) throws {
  let buffer = PageBuffer()
  buffer.preparePattern(for: page)
  try #require(f.uffd.copy(to: page, from: buffer.pointer, length: pageSize) == .done)
}

/// glibc's `_Fork` (2.34+), found with dlsym: it needs _GNU_SOURCE, so Swift does not import it.
///
/// Not `fork()`: in a multi-threaded process glibc's fork holds every malloc
/// arena lock across the clone system call, and with EVENT_FORK that call
/// returns only once the FORK message was read. A reader in the same process
/// that allocates before reading it (any Swift code does) deadlocks the fork
/// for good (TASK_KILLABLE). `_Fork` takes no user-space lock; the child then
/// must not allocate either.
private let rawFork: (@convention(c) () -> pid_t)? = {
  guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0) /* RTLD_DEFAULT */, "_Fork") else { return nil }
  return unsafeBitCast(symbol, to: (@convention(c) () -> pid_t).self)
}()

/// How a forked child ended.
private enum ChildEnd: Equatable {
  case exited(CInt)
  case signaled(CInt)
}

/// Forks (`_Fork`) on a bounded thread (with EVENT_FORK, it returns once its
/// FORK message was read); the child, with core dumps and the Swift backtracer
/// off, exits with `body()`'s value, which must not allocate. Then waits
/// (bounded) for the child; kills it on timeout.
private func forkAndReap(_ f: Fixture, _ body: @escaping @Sendable () -> CInt) throws -> ChildEnd {
  let fork = try #require(rawFork, "glibc has no _Fork")
  let forked = f.run { () -> pid_t in
    let pid = fork()
    if pid == 0 {
      var noCore = rlimit(rlim_cur: 0, rlim_max: 0)
      _ = setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &noCore)
      _ = signal(SIGSEGV, SIG_DFL)  // die quietly: no Swift backtrace from the child
      _exit(body())
    }
    return pid
  }
  let pid = try #require(forked, "fork did not return")
  try #require(pid > 0, "fork failed")
  var status: CInt = 0
  if !waitUntil("child \(pid) to exit", { waitpid(pid, &status, WNOHANG) == pid }) {
    kill(pid, SIGKILL)
    waitpid(pid, &status, 0)
  }
  return status & 0x7F == 0 ? .exited((status >> 8) & 0xFF) : .signaled(status & 0x7F)
}

/// What a forked child reports: bit 0: page 1 reads zeros; bit 1: page 0 holds
/// its pattern (inherited); bit 2: page 0 reads zeros. Page 1 is read first. Allocates nothing.
private func childReadsPages(of region: Range<UInt>) -> CInt {
  let second = content(ofPage: region.page(1))
  let first = content(ofPage: region.page(0))
  return (second == .zeros ? 1 : 0) | (first == .pattern ? 2 : 0) | (first == .zeros ? 4 : 0)
}

extension UserfaultfdKernelTests {
  @Suite("Kernel event sequences (raw, Linux 6.18)") struct KernelEventSequences {
    // MARK: munmap

    @Test("munmap: one UNMAP of exactly the munmap range; the rest stays registered and faults")
    func munmapPart() throws {
      try withRecorder(pages: 4) { f, recorder in
        #expect(recorder.during { f.unmap(f.region.pages(1..<3)) } == [.unmapped(f.region.pages(1..<3))])
        #expect(registration(of: f.region) == "R..R")
        #expect(recorder.touching(f, f.region.page(0), f.region.page(3)) == [fault(f.region.page(0)), fault(f.region.page(3))])
        // The range is the call's, not what was still mapped in it.
        #expect(recorder.during { f.unmap(f.region) } == [.unmapped(f.region)])
        #expect(registration(of: f.region) == "....")
      }
    }

    @Test("munmap across registered vmas, a hole and an unregistered vma: one UNMAP of the whole call's range")
    func munmapSpanning() throws {
      try withRecorder(pages: 8, register: false) { f, recorder in
        try f.uffd.register(address: f.region.page(0), length: 3 * pageSize)
        try f.uffd.register(address: f.region.page(5), length: 3 * pageSize)
        #expect(recorder.during { f.unmap(f.region.pages(3..<4)) } == [], "nothing registered there: no event")
        #expect(registration(of: f.region) == "RRR.-RRR")
        #expect(recorder.during { f.unmap(f.region.pages(1..<7)) } == [.unmapped(f.region.pages(1..<7))])
        #expect(registration(of: f.region) == "R......R")
      }
    }

    @Test("mmap(MAP_FIXED) over registered pages is an UNMAP; the new mapping is not registered; mprotect sends nothing")
    func mapFixedOver() throws {
      try withRecorder(pages: 4) { f, recorder in
        let middle = f.region.pages(1..<3)
        let (mapped, events) = recorder.recording {
          f.run { UInt(bitPattern: mmap(middle.pointer, middle.length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)) }
        }
        #expect(mapped == middle.lowerBound)
        #expect(events == [.unmapped(middle)])
        #expect(registration(of: f.region) == "R--R")
        #expect(recorder.touching(f, middle.lowerBound) == [], "the new mapping reads zeros without a fault")
        let (protected, none) = recorder.recording { mprotect(f.region.pages(3..<4).pointer, pageSize, PROT_READ) }
        #expect(protected == 0 && none == [])
        #expect(registration(of: f.region) == "R--R")
      }
    }

    // MARK: madvise

    @Test("MADV_DONTNEED and MADV_FREE: one REMOVE per registered vma, clipped to it; still registered; removed pages fault again")
    func dontneedAndFree() throws {
      try withRecorder(pages: 5, register: false) { f, recorder in
        try f.uffd.register(address: f.region.page(0), length: 2 * pageSize)
        try f.uffd.register(address: f.region.page(3), length: 2 * pageSize)
        for index in [0, 1, 3, 4] { #expect(f.uffd.zero(address: f.region.page(index), length: pageSize) == .done) }

        let dropped = f.region.pages(1..<5)
        let (dontneed, removes) = recorder.recording { f.run { dropPages(dropped) } }
        #expect(dontneed == 0)
        #expect(removes == [.removed(f.region.pages(1..<2)), .removed(f.region.pages(3..<5))])
        #expect(registration(of: f.region) == "RR-RR")
        #expect(recorder.touching(f, f.region.page(1)) == [fault(f.region.page(1))])
        #expect(recorder.touching(f, f.region.page(0)) == [])

        let freed = f.region.pages(3..<5)
        let (free, freeEvents) = recorder.recording { f.run { madvise(freed.pointer, freed.length, MADV_FREE) } }
        #expect(free == 0)
        #expect(freeEvents == [.removed(freed)])
      }
    }

    @Test("shmem: MADV_REMOVE is a REMOVE and the pages fault again; MADV_DONTNEED is a REMOVE but the page cache maps back without a fault")
    func shmemRemove() throws {
      try withRecorder(pages: 1, features: mapEvents.union(.missingShmem), register: false) { f, recorder in
        let memfd = clinux_memfd("kernel-event-sequence")
        try #require(memfd >= 0)
        defer { closeDescriptor(memfd) }
        try #require(ftruncate(memfd, off_t(4 * pageSize)) == 0)
        let raw = try #require(mmap(nil, 4 * pageSize, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0))
        let shared = UInt(bitPattern: raw)..<UInt(bitPattern: raw) + UInt(4 * pageSize)
        f.own(shared)
        try f.uffd.register(address: shared.lowerBound, length: shared.length)
        #expect(f.uffd.zero(address: shared.lowerBound, length: shared.length) == .done)

        let removed = shared.pages(1..<3)
        let (remove, removeEvents) = recorder.recording { f.run { madvise(removed.pointer, removed.length, MADV_REMOVE) } }
        #expect(remove == 0)
        #expect(removeEvents == [.removed(removed)])
        #expect(registration(of: shared) == "RRRR")
        #expect(recorder.touching(f, shared.page(1)) == [fault(shared.page(1))])

        let last = shared.pages(3..<4)
        let (dontneed, dontneedEvents) = recorder.recording { f.run { dropPages(last) } }
        #expect(dontneed == 0)
        #expect(dontneedEvents == [.removed(last)])
        #expect(recorder.touching(f, last.lowerBound) == [], "the page is still in the page cache")
      }
    }

    // MARK: mremap in place

    @Test("mremap shrinking in place: an UNMAP of the cut tail")
    func shrinkInPlace() throws {
      try withRecorder(pages: 4) { f, recorder in
        let (shrunk, events) = recorder.recording { remap(f, f.region, newLength: 2 * pageSize, flags: 0) }
        #expect(shrunk == f.region.lowerBound)
        #expect(events == [.unmapped(f.region.pages(2..<4))])
        #expect(registration(of: f.region) == "RR..")
        f.unmap(f.region.pages(2..<4))  // bookkeeping only: the tail is gone, no event
      }
    }

    @Test("mremap growing in place: no event; the new tail is registered and its faults reach the uffd")
    func growInPlace() throws {
      try withRecorder(pages: 8, register: false) { f, recorder in
        try f.uffd.register(address: f.region.lowerBound, length: 4 * pageSize)
        #expect(recorder.during { f.unmap(f.region.pages(4..<8)) } == [], "room after the region; nothing registered there")
        try fillWithPattern(f, f.region.page(0))

        let (grown, events) = recorder.recording { remap(f, f.region.pages(0..<4), newLength: 8 * pageSize, flags: 0) }
        f.own(f.region)
        #expect(grown == f.region.lowerBound)
        #expect(events == [])
        #expect(registration(of: f.region) == "RRRRRRRR")
        #expect(recorder.touching(f, f.region.page(5)) == [fault(f.region.page(5))])
        #expect(recorder.touching(f, f.region.page(0)) == [])
      }
    }

    // MARK: mremap moving

    @Test("mremap growing with MAYMOVE that must move: REMAP with the old length, then UNMAP of the old range; the whole new range is registered")
    func growByMoving() throws {
      try withRecorder(pages: 5, register: false) { f, recorder in
        let old = f.region.pages(0..<4)
        #expect(mprotect(f.region.pages(4..<5).pointer, pageSize, PROT_NONE) == 0)  // occupied: cannot grow in place
        try f.uffd.register(address: old.lowerBound, length: old.length)
        try fillWithPattern(f, old.page(1))

        let (moved, events) = recorder.recording { remap(f, old, newLength: 6 * pageSize, flags: clinux_mremap_maymove) }
        let to = try #require(moved)
        let new = to..<to + UInt(6 * pageSize)
        f.own(new)
        f.unmap(old)  // bookkeeping only: already gone, no event
        #expect(events == [.remapped(from: old.lowerBound, to: to, length: 4 * pageSize), .unmapped(old)])
        #expect(registration(of: new) == "RRRRRR")
        #expect(registration(of: f.region) == "....-")
        #expect(recorder.touching(f, new.page(5)) == [fault(new.page(5))], "the grown tail is registered")
        #expect(recorder.touching(f, new.page(2)) == [fault(new.page(2))])
        let (movedPage, origin) = (new.page(1), old.page(1))
        let (moved1, none) = recorder.recording { f.run { content(ofPage: movedPage, patternOf: origin) } }
        #expect(moved1 == .pattern && none == [], "the filled page moved, without a fault")
      }
    }

    @Test("mremap MAYMOVE|FIXED of part of a region to a free address: REMAP, then UNMAP of the moved part")
    func moveFixedPart() throws {
      try withRecorder(pages: 4) { f, recorder in
        let target = try mapAnonymous(pages: 4, protection: PROT_NONE)
        let part = f.region.pages(1..<3)
        let (moved, events) = recorder.recording { f.remap(part, to: target.lowerBound) }
        #expect(moved == target.lowerBound)
        f.own(f.region)
        f.own(target)  // f.remap forgot the region's and the target's other pages
        #expect(events == [.remapped(from: part.lowerBound, to: target.lowerBound, length: 2 * pageSize), .unmapped(part)])
        #expect(registration(of: f.region) == "R..R")
        #expect(registration(of: target) == "RR--")
        #expect(recorder.touching(f, target.page(1)) == [fault(target.page(1))])
      }
    }

    @Test("mremap MAYMOVE|FIXED onto a registered mapping: UNMAP(destination), REMAP, UNMAP(old)")
    func moveOntoRegistered() throws {
      try withRecorder(pages: 4) { f, recorder in
        let destination = try mapAnonymous(pages: 4)
        f.own(destination)
        try f.uffd.register(address: destination.lowerBound, length: destination.length)
        let (moved, events) = recorder.recording { f.remap(f.region, to: destination.lowerBound) }
        #expect(moved == destination.lowerBound)
        #expect(events == [
          .unmapped(destination), .remapped(from: f.region.lowerBound, to: destination.lowerBound, length: 4 * pageSize), .unmapped(f.region),
        ])
        #expect(registration(of: destination) == "RRRR")
        #expect(registration(of: f.region) == "....")
      }
    }

    @Test("mremap shrinking while moving: REMAP with the new length, then UNMAP of the cut tail, then UNMAP of the old range")
    func shrinkByMoving() throws {
      try withRecorder(pages: 4) { f, recorder in
        let target = try mapAnonymous(pages: 2, protection: PROT_NONE)
        f.own(target)
        let (moved, events) = recorder.recording {
          remap(f, f.region, newLength: 2 * pageSize, flags: clinux_mremap_maymove | clinux_mremap_fixed, to: target.lowerBound)
        }
        #expect(moved == target.lowerBound)
        f.unmap(f.region)  // bookkeeping only: already gone, no event
        #expect(events == [
          .remapped(from: f.region.lowerBound, to: target.lowerBound, length: 2 * pageSize),
          .unmapped(f.region.pages(2..<4)), .unmapped(f.region.pages(0..<2)),
        ])
        #expect(registration(of: target) == "RR")
      }
    }

    @Test("mremap with DONTUNMAP: REMAP only; the old range stays registered, its pages are gone and fault to the uffd")
    func moveDontUnmap() throws {
      try withRecorder(pages: 4) { f, recorder in
        try fillWithPattern(f, f.region.page(1))
        let target = try mapAnonymous(pages: 4, protection: PROT_NONE)
        f.own(target)
        let flags = clinux_mremap_maymove | clinux_mremap_fixed | clinux_mremap_dontunmap
        let (moved, events) = recorder.recording { remap(f, f.region, newLength: 4 * pageSize, flags: flags, to: target.lowerBound) }
        #expect(moved == target.lowerBound)
        #expect(events == [.remapped(from: f.region.lowerBound, to: target.lowerBound, length: 4 * pageSize)])
        #expect(registration(of: f.region) == "RRRR")
        #expect(registration(of: target) == "RRRR")
        #expect(recorder.touching(f, f.region.page(1)) == [fault(f.region.page(1))], "the filled page left the old range")
        let (movedPage, origin) = (target.page(1), f.region.page(1))
        let (moved1, none) = recorder.recording { f.run { content(ofPage: movedPage, patternOf: origin) } }
        #expect(moved1 == .pattern && none == [], "the filled page moved, without a fault")
        #expect(recorder.touching(f, target.page(3)) == [fault(target.page(3))])
        #expect(recorder.during { f.unmap(f.region) } == [.unmapped(f.region)])
      }
    }

    /// A page is filled first in both cases: see `moveMergingWithoutRemapEvent` for a never-faulted source.
    @Test("Without EVENT_REMAP the moved range is not registered: a move sends UNMAP(old) only, DONTUNMAP nothing")
    func moveWithoutRemapEvent() throws {
      try withRecorder(pages: 5, features: [.eventRemove, .eventUnmap], register: false) { f, recorder in
        let old = f.region.pages(0..<4)
        #expect(mprotect(f.region.pages(4..<5).pointer, pageSize, PROT_NONE) == 0)
        try f.uffd.register(address: old.lowerBound, length: old.length)
        try fillWithPattern(f, old.page(1))
        let (moved, events) = recorder.recording { remap(f, old, newLength: 6 * pageSize, flags: clinux_mremap_maymove) }
        let to = try #require(moved)
        let new = to..<to + UInt(6 * pageSize)
        f.own(new)
        f.unmap(old)
        #expect(events == [.unmapped(old)])
        #expect(registration(of: new) == "------")
        let page = new.page(2)
        let (seen, none) = recorder.recording { f.run { content(ofPage: page) } }
        #expect(seen == .zeros && none == [], "reads zeros, silently")
      }
      try withRecorder(pages: 4, features: [.eventRemove, .eventUnmap]) { f, recorder in
        try fillWithPattern(f, f.region.page(1))
        let target = try mapAnonymous(pages: 4, protection: PROT_NONE)
        f.own(target)
        let flags = clinux_mremap_maymove | clinux_mremap_fixed | clinux_mremap_dontunmap
        let (moved, events) = recorder.recording { remap(f, f.region, newLength: 4 * pageSize, flags: flags, to: target.lowerBound) }
        #expect(moved == target.lowerBound)
        #expect(events == [])
        #expect(registration(of: f.region) == "RRRR")
        #expect(registration(of: target) == "----")
        #expect(recorder.touching(f, f.region.page(2)) == [fault(f.region.page(2))])
      }
    }

    /// A never-faulted anonymous vma (no anon_vma) is moved with a pgoff matching
    /// its new address, so placed directly below itself it merges with itself
    /// (mm/vma.c copy_vma); without EVENT_REMAP the kernel then clears the uffd
    /// of the merged vma, old range included, before unmapping the old range.
    @Test("Without EVENT_REMAP a never-faulted range moved directly below itself loses its registration first: no UNMAP; with DONTUNMAP the old range ends unregistered")
    func moveMergingWithoutRemapEvent() throws {
      for dontUnmap in [false, true] {
        try withRecorder(pages: 1, features: [.eventRemove, .eventUnmap], register: false) { f, recorder in
          // A reservation, the source mapped fresh inside it: its PROT_NONE neighbours merge with nothing.
          let reservation = try mapAnonymous(pages: 11, protection: PROT_NONE)
          f.own(reservation)
          let source = reservation.pages(6..<10), destination = reservation.pages(2..<6)
          let mapped = mmap(source.pointer, source.length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
          try #require(mapped == source.pointer)
          try f.uffd.register(address: source.lowerBound, length: source.length)

          let flags = clinux_mremap_maymove | clinux_mremap_fixed | (dontUnmap ? clinux_mremap_dontunmap : 0)
          let (moved, events) = recorder.recording { remap(f, source, newLength: source.length, flags: flags, to: destination.lowerBound) }
          #expect(moved == destination.lowerBound)
          #expect(events == [], "dontUnmap: \(dontUnmap)")
          #expect(registration(of: reservation) == (dontUnmap ? "-----------" : "------....-"), "dontUnmap: \(dontUnmap)")
          if dontUnmap {
            #expect(recorder.touching(f, source.page(2)) == [], "the old range is no longer registered")
          } else {
            f.unmap(source)  // bookkeeping only: already gone, no event
          }
        }
      }
    }

    // MARK: fork and exit

    @Test("fork with EVENT_FORK: a FORK message; the child's unfilled pages fault to the child's uffd, filled ones are inherited")
    func forkEvent() throws {
      try withRecorder(pages: 4, features: forkEvents) { f, recorder in
        try fillWithPattern(f, f.region.page(0))
        let region = f.region
        let end = try forkAndReap(f) { childReadsPages(of: region) }
        #expect(recorder.events == [.forked])
        #expect(recorder.childEvents == [fault(region.page(1))])
        #expect(end == .exited(1 | 2))
      }
    }

    @Test("fork with MADV_DONTFORK on the region: no FORK message; the child gets SIGSEGV")
    func forkDontFork() throws {
      try withRecorder(pages: 4, features: forkEvents) { f, recorder in
        try fillWithPattern(f, f.region.page(0))
        #expect(madvise(f.region.pointer, f.region.length, MADV_DONTFORK) == 0)
        let region = f.region
        let end = try forkAndReap(f) { childReadsPages(of: region) }
        #expect(recorder.events == [])
        #expect(recorder.childEvents == [])
        #expect(end == .signaled(SIGSEGV))
      }
    }

    @Test("fork with MADV_WIPEONFORK on the region: a FORK message; every page of the child faults to the child's uffd")
    func forkWipeOnFork() throws {
      try withRecorder(pages: 4, features: forkEvents) { f, recorder in
        try fillWithPattern(f, f.region.page(0))
        #expect(madvise(f.region.pointer, f.region.length, MADV_WIPEONFORK) == 0)
        let region = f.region
        let end = try forkAndReap(f) { childReadsPages(of: region) }
        #expect(recorder.events == [.forked])
        #expect(recorder.childEvents == [fault(region.page(1)), fault(region.page(0))])
        #expect(end == .exited(1 | 4))
      }
    }

    @Test("fork without EVENT_FORK: no message; the child reads its unfilled pages as zeros, silently")
    func forkWithoutEvent() throws {
      try withRecorder(pages: 4, features: mapEvents) { f, recorder in
        try fillWithPattern(f, f.region.page(0))
        let region = f.region
        let end = try forkAndReap(f) { childReadsPages(of: region) }
        #expect(recorder.events == [])
        #expect(end == .exited(1 | 2))
      }
    }

    @Test("When the process behind a uffd exits: no message, no POLLHUP, and fills are .targetExited (ESRCH)")
    func childExits() throws {
      try withRecorder(pages: 4, features: forkEvents) { f, recorder in
        let end = try forkAndReap(f) { 0 }
        #expect(end == .exited(0))
        #expect(recorder.events == [.forked])
        let child = try #require(recorder.children.first)
        var ready = pollfd(fd: child.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
        #expect(poll(&ready, 1, 0) == 0 && ready.revents == 0)
        #expect(child.zero(address: f.region.page(0), length: pageSize) == .targetExited)
        let buffer = PageBuffer()
        #expect(child.copy(to: f.region.page(1), from: buffer.pointer, length: pageSize) == .targetExited)
        #expect(recorder.childEvents == [])
      }
    }

    // MARK: UFFDIO_COPY over present pages

    @Test("A multi-page UFFDIO_COPY whose first page is present is .alreadyPresent (EEXIST) and fills nothing")
    func copyFirstPagePresent() throws {
      try withFixture(pages: 4, features: []) { f in
        #expect(f.uffd.zero(address: f.region.page(0), length: pageSize) == .done)
        let buffer = PageBuffer(pages: 4)
        buffer.preparePattern(for: f.region.page(0), pages: 4)
        #expect(f.uffd.copy(to: f.region.page(0), from: buffer.pointer, length: 4 * pageSize) == .alreadyPresent)
        #expect(f.uffd.zero(address: f.region.page(1), length: 3 * pageSize) == .done, "pages 1..<4 were still missing")
      }
    }
  }
}
