// UserfaultFDDispatcher: the in-process loop on its own thread, against real
// faulting threads and real madvise/munmap/mremap calls.

import Glibc
import LinuxSupport
import Testing
import Userfaultfd

extension UserfaultfdKernelTests {
  @Suite("UserfaultFDDispatcher (in-process thread)") struct InProcess {
    @Test("Faults carry the faulting thread's id, the page address and the write flag")
    func faultDetails() throws {
      try withFixture(pages: 4) { f in
        let handler = RecordingHandler()
        let dispatcher = try f.startDispatcher(handler)
        let readPage = f.region.page(1), writePage = f.region.page(2)
        let read = Shared<UInt64>(0)
        let reader = f.spawn { read.value = load(readPage + 123 * 8) }
        let writer = f.spawn { store(7, at: writePage + 8) }
        f.join(reader)
        f.join(writer)
        dispatcher.stop()

        let faults = handler.faults
        #expect(faults.count == 2)
        let readFault = try #require(faults.first { $0.address == readPage })
        let writeFault = try #require(faults.first { $0.address == writePage })
        #expect(readFault.thread == reader.tid)
        #expect(readFault.flags == [])
        #expect(writeFault.thread == writer.tid)
        #expect(writeFault.flags.contains(.write))
        #expect(read.value == pattern(readPage + 123 * 8))
        #expect(load(writePage) == pattern(writePage) && load(writePage + 8) == 7)
      }
    }

    @Test("Without .threadID the fault's thread is 0")
    func noThreadIDs() throws {
      try withFixture(pages: 1, features: [.eventRemove]) { f in
        let handler = RecordingHandler()
        let dispatcher = try f.startDispatcher(handler)
        let page = f.region.page(0)
        #expect(f.run { load(page) } == pattern(page))
        dispatcher.stop()
        #expect(handler.faults.map(\.thread) == [0])
      }
    }

    @Test("closed is delivered exactly once, and last, after stop()")
    func closedOnceLast() throws {
      try withFixture(pages: 2) { f in
        let handler = RecordingHandler()
        let dispatcher = try f.startDispatcher(handler)
        let page = f.region.page(0)
        #expect(f.run { load(page) } == pattern(page))
        dispatcher.stop()
        dispatcher.stop()
        let log = handler.recorded
        #expect(log.last == .closed(nil))
        #expect(log.filter { if case .closed = $0 { true } else { false } }.count == 1)
        #expect(log.count == 2)
      }
    }

    /// The seed's own race (invariant 2): a thread faults on a page while
    /// another drops it with MADV_DONTNEED. The handler serves the pattern
    /// unless it has seen the page removed, then zeros. Whatever the
    /// interleaving, once madvise has returned the page must read as zeros:
    /// the kernel only lets madvise go once its REMOVE was read, a copy racing
    /// it fails with EAGAIN until then, and the dispatcher delivers the remove
    /// before any fault read with or after it. One fresh page per round.
    @Test("MADV_DONTNEED racing a fault never leaves old bytes behind (1,024 rounds)")
    func dontneedRace() throws {
      let rounds = 1024
      try withFixture(pages: rounds) { f in
        let handler = RecordingHandler(answer: RecordingHandler.zeroIfRemoved)
        let dispatcher = try f.startDispatcher(handler)
        var verifier: [UInt: Int32] = [:]  // page -> the thread that read it after madvise returned
        var faulterSawPattern = 0
        for round in 0..<rounds {
          let range = f.region.pages(round..<round + 1)
          let faulterReady = Flag(), removerReady = Flag(), go = Flag()
          let seen = Shared<UInt64>(0), madvised = Shared<CInt>(-1)
          let faulter = f.spawn {
            faulterReady.raise()
            if go.wait() { seen.value = load(range.lowerBound) }
          }
          let remover = f.spawn {
            removerReady.raise()
            if go.wait() { madvised.value = dropPages(range) }
          }
          try #require(faulterReady.wait() && removerReady.wait())
          go.raise()
          try #require(f.join(faulter) && f.join(remover))
          try #require(madvised.value == 0, "madvise failed: \(madvised.value)")
          if seen.value != 0 { faulterSawPattern += 1 }

          let (tid, after) = try #require(f.run { (currentThreadID(), content(ofPage: range.lowerBound)) })
          verifier[range.lowerBound] = tid
          try #require(after == .zeros, "round \(round): after MADV_DONTNEED returned, the page reads \(after)")
        }
        dispatcher.stop()

        // The verifying read came after madvise returned, so after its REMOVE
        // was read: the handler must have seen that remove before the fault.
        let log = handler.recorded
        var removedAt: [UInt: Int] = [:]
        var checked = Set<UInt>()
        for (index, entry) in log.enumerated() {
          switch entry {
          case .removed(let range): removedAt[range.lowerBound] = removedAt[range.lowerBound] ?? index
          case .pagefault(let fault) where verifier[fault.address] == fault.thread:
            checked.insert(fault.address)
            #expect(removedAt[fault.address] != nil, "a fault read after madvise returned was delivered before its Removed (0x\(String(fault.address, radix: 16)))")
          default: break
          }
        }
        #expect(removedAt.count == rounds)
        // Each round the faulter read the pattern, madvise then dropped a present page, so the
        // verifying read faulted and was checked above: the ordering check ran at least that often.
        #expect(checked.count >= faulterSawPattern, "ordering checked in \(checked.count) rounds, pattern seen in \(faulterSawPattern)")
        let eagain = handler.outcomes.filter { $0.outcome == .notNow }.count
        print("dontneedRace: \(rounds) rounds; faulter read the pattern in \(faulterSawPattern), zeros in \(rounds - faulterSawPattern); \(eagain) copies hit EAGAIN; \(dispatcher.redeliveries) redeliveries")
      }
    }

    /// While a remove is queued and unread, every UFFDIO_COPY on the uffd fails
    /// with EAGAIN. The handler holds its first fault until a madvise on another
    /// page is asleep waiting for its event, so its copy must hit EAGAIN; the
    /// fault is parked, the event read, and the fault redelivered and served.
    @Test("A copy that hits EAGAIN while a remove is unread is parked, then served")
    func eagainIsParked() throws {
      try withFixture(pages: 4) { f in
        let removerTid = Shared<Int32>(0)
        let firstFault = Flag()
        let removerWasAsleep = Shared<Bool?>(nil)
        let handler = RecordingHandler { handler, fault, uffd in
          if !firstFault.isRaised {
            firstFault.raise()
            removerWasAsleep.value = eventually {
              let tid = removerTid.value
              return tid != 0 && isBlockedInUserfaultfd(tid)
            }
          }
          return handler.fill(fault.address, on: uffd)
        }
        let dispatcher = try f.startDispatcher(handler)
        let page = f.region.page(0)
        let other = f.region.pages(2..<3)
        let seen = Shared<PageContent?>(nil)
        let reader = f.spawn { seen.value = content(ofPage: page) }
        try #require(firstFault.wait())
        let remover = f.spawn { _ = dropPages(other) }
        removerTid.value = remover.tid
        f.join(reader)
        f.join(remover)
        dispatcher.stop()

        #expect(removerWasAsleep.value == true)
        let outcomes = handler.outcomes.map(\.outcome)
        #expect(outcomes.first == .notNow, "the copy made while the remove was unread must fail with EAGAIN")
        #expect(outcomes.last == .done)
        #expect(dispatcher.redeliveries > 0)
        #expect(seen.value == .pattern)
        let log = handler.recorded
        let removedAt = try #require(log.firstIndex(of: .removed(other)))
        #expect(log[removedAt...].contains { $0.isPagefault }, "the parked fault is delivered again after the remove")
      }
    }

    @Test("A fault answered .notNow once is redelivered by the timer when no other event arrives")
    func timerRedelivery() throws {
      try withFixture(pages: 1) { f in
        let times = Shared<[UInt64]>([])
        let handler = RecordingHandler { handler, fault, uffd in
          let count = times.update { $0.append(monotonicNanoseconds()); return $0.count }
          return count == 1 ? .notNow : handler.fill(fault.address, on: uffd)
        }
        let dispatcher = try f.startDispatcher(handler)
        let seen = Shared<PageContent?>(nil)
        let page = f.region.page(0)
        let reader = f.spawn { seen.value = content(ofPage: page) }
        let served = f.join(reader, timeout: .seconds(2))
        dispatcher.stop()

        #expect(served, "the parked fault was never redelivered")
        #expect(seen.value == .pattern)
        #expect(times.value.count == 2)
        if times.value.count == 2 { #expect(times.value[1] - times.value[0] >= 1_000_000, "redelivered before its 1 ms backoff") }
        #expect(dispatcher.redeliveries == 1)
        #expect(handler.recorded.filter { !$0.isPagefault } == [.closed(nil)])
      }
    }

    @Test("munmap of the region is reported as unmapped, with its range")
    func munmapIsUnmapped() throws {
      try withFixture(pages: 4) { f in
        let handler = RecordingHandler()
        let dispatcher = try f.startDispatcher(handler)
        f.unmap(f.region)  // returns once the dispatcher has read the event
        waitUntil("the handler to record the unmap") { handler.recorded.contains(.unmapped(f.region)) }
        dispatcher.stop()
        #expect(handler.recorded == [.unmapped(f.region), .closed(nil)])
      }
    }

    @Test("munmap of part of the region reports just that part; the rest is still served")
    func partialMunmap() throws {
      try withFixture(pages: 8) { f in
        let handler = RecordingHandler()
        let dispatcher = try f.startDispatcher(handler)
        let hole = f.region.pages(2..<4)
        f.unmap(hole)
        waitUntil("the handler to record the unmap") { handler.recorded.contains(.unmapped(hole)) }
        let (below, above) = (f.region.page(1), f.region.page(5))
        let seen = f.run { [content(ofPage: below), content(ofPage: above)] }
        dispatcher.stop()
        #expect(seen == [.pattern, .pattern])
        #expect(handler.recorded.filter { !$0.isPagefault } == [.unmapped(hole), .closed(nil)])
        #expect(handler.faults.map(\.address) == [f.region.page(1), f.region.page(5)])
      }
    }

    @Test("mremap is reported as remapped (then the old range unmapped); the new address is served")
    func mremapIsRemapped() throws {
      try withFixture(pages: 4) { f in
        let handler = RecordingHandler()
        let dispatcher = try f.startDispatcher(handler)
        let first = f.region.page(0)
        #expect(f.run { load(first) } == pattern(first))  // one page filled before the move

        let target = try mapAnonymous(pages: 4, protection: PROT_NONE)
        f.own(target)
        let moved = f.remap(f.region, to: target.lowerBound)
        try #require(moved == target.lowerBound)
        let event = Recorded.remapped(from: f.region.lowerBound, to: target.lowerBound, length: f.region.length)
        waitUntil("the handler to record the remap") { handler.recorded.contains(event) }

        let movedPage = target.page(2)
        let seen = f.run { content(ofPage: movedPage) }
        dispatcher.stop()
        #expect(seen == .pattern)
        #expect(content(ofPage: target.page(0), patternOf: f.region.page(0)) == .pattern, "the filled page moved with its bytes")
        // The kernel (mm/mremap.c) reads out REMAP, then UNMAP of the old range:
        // the old vma is unmapped after the move and still carries the uffd.
        #expect(handler.recorded.filter { !$0.isPagefault } == [event, .unmapped(f.region), .closed(nil)])
        #expect(handler.faults.map(\.address) == [f.region.page(0), target.page(2)])
      }
    }
  }
}
