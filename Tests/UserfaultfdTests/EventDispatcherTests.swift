// EventDispatcher driven by the test thread itself, so each drain sees exactly
// the messages the test arranged: threads are started, the test waits until
// the kernel has them asleep in userfaultfd code (their message is queued by
// then), and only then calls `drain()`. This makes ordering, merging and
// redelivery deterministic.

import Glibc
import LinuxSupport
import Testing
import Userfaultfd

extension UserfaultfdKernelTests {
  @Suite("EventDispatcher (driven by the test)") struct Ordering {
    /// The kernel reads queued page faults before queued events
    /// (fs/userfaultfd.c, userfaultfd_ctx_read), so here the read order is
    /// [fault, remove]; the dispatcher must deliver [removed, fault] (invariant 1).
    @Test("A remove read in the same batch as a fault is delivered before it")
    func removeBeforeFault() throws {
      try withFixture(pages: 4) { f in
        let handler = RecordingHandler(answer: RecordingHandler.zeroIfRemoved)
        let core = EventDispatcher(uffd: f.uffd, handler: handler)
        let range = f.region.pages(1..<2)
        let seen = Shared<PageContent?>(nil)
        let reader = f.spawn { seen.value = content(ofPage: range.lowerBound) }
        try #require(waitUntil("the reader to block in its fault") { isBlockedInUserfaultfd(reader.tid) })
        let madvised = Shared<CInt>(-1)
        let remover = f.spawn { madvised.value = dropPages(range) }
        try #require(waitUntil("madvise to wait for its event to be read") { isBlockedInUserfaultfd(remover.tid) })

        core.drain()
        #expect(handler.recorded == [.removed(range), .pagefault(Pagefault(address: range.lowerBound, flags: [], thread: reader.tid))])
        #expect(core.faultsRead == 1)

        pump(core) { reader.isFinished && remover.isFinished }
        #expect(madvised.value == 0)
        #expect(seen.value == .zeros, "a page removed before its fault was served must read as zeros")
      }
    }

    /// Parked faults are delivered again after every drain that read a
    /// non-pagefault event, not only when their backoff timer expires. The
    /// fault is first pushed to the 64 ms backoff cap, so the drain below runs
    /// well before its deadline (checked), and only the event can explain the redelivery.
    @Test("A parked fault is redelivered by the drain that reads an event, before its backoff deadline")
    func redeliveredAfterEvent() throws {
      try withFixture(pages: 4) { f in
        let ready = Shared(false)
        let handler = RecordingHandler { handler, fault, uffd in ready.value ? handler.fill(fault.address, on: uffd) : .notNow }
        let core = EventDispatcher(uffd: f.uffd, handler: handler)
        let page = f.region.page(0)
        let seen = Shared<PageContent?>(nil)
        let reader = f.spawn { seen.value = content(ofPage: page) }
        try #require(waitUntil("the reader to block in its fault") { isBlockedInUserfaultfd(reader.tid) })

        core.drain()
        #expect(core.parkedCount == 1 && handler.faults.count == 1)
        for _ in 0..<7 { core.redeliverDue(now: .max) }  // "not now" again: backoff doubles to its cap
        #expect(core.parkedCount == 1 && core.redeliveries == 7)

        let other = f.region.pages(2..<3)
        let remover = f.spawn { _ = dropPages(other) }
        try #require(waitUntil("madvise to wait for its event to be read") { isBlockedInUserfaultfd(remover.tid) })
        core.redeliverDue(now: .max)  // parked once more: due 64 ms from now
        ready.value = true
        let deadline = try #require(core.nextDeadline)
        let drainedAt = monotonicNanoseconds()
        core.drain()
        #expect(drainedAt < deadline)
        #expect(core.redeliveries == 9, "the drain that read the remove must redeliver the parked fault")
        let fault = Pagefault(address: page, flags: [], thread: reader.tid)
        #expect(Array(handler.recorded.suffix(2)) == [.removed(other), .pagefault(fault)])

        pump(core) { reader.isFinished && remover.isFinished }
        #expect(seen.value == .pattern)
      }
    }

    @Test("Faults from several threads on a parked page are merged: one fill wakes them all")
    func duplicatesMergedWhileParked() throws {
      try withFixture(pages: 2) { f in
        let ready = Shared(false)
        let handler = RecordingHandler { handler, fault, uffd in ready.value ? handler.fill(fault.address, on: uffd) : .notNow }
        let core = EventDispatcher(uffd: f.uffd, handler: handler)
        let page = f.region.page(1)
        let seen = Shared<[PageContent]>([])
        let readers = (0..<4).map { index in
          f.spawn {
            _ = load(page + UInt(index * 512))
            let result = content(ofPage: page)
            seen.update { $0.append(result) }
          }
        }
        for reader in readers {
          try #require(waitUntil("reader \(reader.tid) to block in its fault") { isBlockedInUserfaultfd(reader.tid) })
        }

        core.drain()
        #expect(core.faultsRead == 4)
        #expect(core.faultsMerged == 3)
        #expect(handler.faults.count == 1)

        ready.value = true
        core.redeliverDue(now: .max)
        for reader in readers { f.join(reader) }
        #expect(handler.faults.count == 2)  // the first delivery and its one redelivery
        #expect(handler.outcomes.map(\.outcome) == [.done])
        #expect(seen.value == Array(repeating: .pattern, count: 4))
      }
    }

    /// When duplicates are read in one batch and the first is resolved at once,
    /// the page is no longer outstanding, so the later ones are delivered too:
    /// their copy gets EEXIST (the kernel's answer for a page that is there),
    /// which settles as resolved after a wake. One fill, everybody woken.
    @Test("Faults on one page read in one batch: one fill succeeds, the others are EEXIST, all wake")
    func duplicatesInOneBatch() throws {
      try withFixture(pages: 2) { f in
        let handler = RecordingHandler()
        let core = EventDispatcher(uffd: f.uffd, handler: handler)
        let page = f.region.page(0)
        let seen = Shared<[PageContent]>([])
        let readers = (0..<4).map { _ in f.spawn { let result = content(ofPage: page); seen.update { $0.append(result) } } }
        for reader in readers {
          try #require(waitUntil("reader \(reader.tid) to block in its fault") { isBlockedInUserfaultfd(reader.tid) })
        }

        core.drain()
        for reader in readers { f.join(reader) }
        let outcomes = handler.outcomes.map(\.outcome)
        #expect(core.faultsRead == 4)
        #expect(outcomes.filter { $0 == .done }.count == 1)
        #expect(outcomes.first == .done && outcomes.dropFirst().allSatisfy { $0 == .alreadyPresent })
        #expect(handler.faults.count == outcomes.count)
        #expect(seen.value == Array(repeating: .pattern, count: 4))
      }
    }

    @Test("A remove read while a fault is in flight makes its decision stale; .notNow redelivers it")
    func staleInFlightDecision() throws {
      try withFixture(pages: 4) { f in
        let deliveries = Shared(0)
        let handler = RecordingHandler { handler, fault, uffd in
          deliveries.update { $0 += 1; return $0 } == 1 ? .inFlight : RecordingHandler.zeroIfRemoved(handler, fault, uffd)
        }
        let core = EventDispatcher(uffd: f.uffd, handler: handler)
        let range = f.region.pages(0..<1)
        let seen = Shared<PageContent?>(nil)
        let reader = f.spawn { seen.value = content(ofPage: range.lowerBound) }
        try #require(waitUntil("the reader to block in its fault") { isBlockedInUserfaultfd(reader.tid) })

        core.drain()
        #expect(core.inFlightFaults == 1)
        let handedOutAt = core.sequence
        #expect(!core.isStale(range, since: handedOutAt))

        let remover = f.spawn { _ = dropPages(range) }
        try #require(waitUntil("madvise to wait for its event to be read") { isBlockedInUserfaultfd(remover.tid) })
        core.drain()
        #expect(core.sequence == handedOutAt + 1)
        #expect(core.isStale(range, since: handedOutAt))
        #expect(!core.isStale(f.region.pages(1..<4), since: handedOutAt), "an event elsewhere does not make it stale")
        #expect(!core.isStale(range, since: core.sequence))

        // The late decision is dropped: give the fault back for redelivery.
        core.complete(range.lowerBound, .notNow)
        #expect(core.inFlightFaults == 0 && core.parkedCount == 1)
        core.complete(range.lowerBound, .resolved)  // not in flight any more: ignored
        #expect(core.parkedCount == 1)

        pump(core) { reader.isFinished && remover.isFinished }
        #expect(seen.value == .zeros)
        #expect(Array(handler.recorded.prefix(3).map(\.isPagefault)) == [true, false, true])
      }
    }
  }
}
