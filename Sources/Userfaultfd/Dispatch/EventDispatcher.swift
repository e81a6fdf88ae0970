import CUserfaultfd
import Glibc
import LinuxSupport
import SystemPackage

/// The ordering and redelivery engine of one userfaultfd, driven by its owner's
/// event loop, the in-process `UserfaultFDDispatcher` thread (the broker has
/// its own, `BrokerEngine`). It performs no waiting of its own.
///
/// Call `drain()` when the uffd is readable and `redeliverDue(now:)` when
/// `nextDeadline` passes. It guarantees (DESIGN §3):
/// 1. **Ordering**: the uffd is read until EAGAIN, then the non-pagefault events
///    are delivered in read order, then the page faults in read order.
/// 2. **Staleness**: every remove/unmap/remap read is numbered (`sequence`);
///    `isStale(_:since:)` tells whether one overlapping a range was read after a
///    fault was handed out, so a late answer is dropped and the fault redelivered.
/// 3. **Redelivery**: a fault answered `.notNow` is parked; parked faults are
///    delivered again after every drain that read a non-pagefault event, and
///    on their own backoff deadline (1 ms doubling to 64 ms), never only "on
///    the next message". A parked page never delays other pages.
/// 4. **De-duplication**: a fault on a page that is already outstanding (parked
///    or in flight) is merged: one delivery, and the fill wakes every waiter.
///
/// Not thread-safe: confine it to the thread of its event loop.
public final class EventDispatcher {
  /// The userfaultfd it reads (and that it hands to the handler with each fault).
  public let uffd: UserfaultFD
  /// Receives every event, on the thread that drives the dispatcher.
  public let handler: any UserfaultFDHandler
  /// Page size of the registered ranges: faults are de-duplicated per page.
  public let pageSize: UInt

  /// Number of non-pagefault events read so far: a fault handed out at `sequence`
  /// is stale if an overlapping event was read after it.
  public var sequence: UInt64 { invalidations.sequence }
  /// Whether `close(_:)` ran (a read error, or the owner's stop): nothing is delivered any more.
  public private(set) var isClosed = false
  /// Page faults read from the uffd (counters, for tests and metrics).
  public private(set) var faultsRead = 0
  /// Faults merged into one already outstanding on the same page (not delivered).
  public private(set) var faultsMerged = 0
  /// Parked faults delivered again.
  public private(set) var redeliveries = 0

  private struct Outstanding {
    var fault: Pagefault
    var inFlight: Bool
    /// Parked: how often it was answered "not now", and when it is due again.
    var attempts: Int
    var notBefore: UInt64
  }

  private let readBuffer: UnsafeMutablePointer<cuffd_event>
  private var newFaults: [Pagefault] = []
  private var outstanding: [UInt: Outstanding] = [:]
  private var parked: [UInt] = []
  private var parkedSpare: [UInt] = []
  private var invalidations = Invalidations()
  private var inFlightCount = 0
  private static let backoffBase: UInt64 = 1_000_000
  private static let backoffCap: UInt64 = 64_000_000

  /// A dispatcher for `uffd` (which should be non-blocking: `drain()` reads
  /// until EAGAIN) calling `handler`. `pageSize` must be a power of two: the
  /// page of the registered ranges (a huge page size for hugetlbfs). It keeps
  /// `uffd` alive but does not own the thread that drives it.
  public init(uffd: UserfaultFD, handler: any UserfaultFDHandler, pageSize: Int = systemPageSize) {
    self.uffd = uffd
    self.handler = handler
    self.pageSize = UInt(pageSize)
    readBuffer = .allocate(capacity: Int(CUFFD_READ_BATCH))
    newFaults.reserveCapacity(256)
    outstanding.reserveCapacity(256)
    parked.reserveCapacity(64)
    parkedSpare.reserveCapacity(64)
  }

  deinit { readBuffer.deallocate() }

  /// Number of faults parked for redelivery.
  public var parkedCount: Int { parked.count }
  /// Number of faults handed out with `.inFlight` and not yet completed.
  public var inFlightFaults: Int { inFlightCount }

  /// When the earliest parked fault is due (CLOCK_MONOTONIC ns), or nil when none is parked.
  public var nextDeadline: UInt64? {
    var earliest: UInt64?
    for page in parked {
      if let due = outstanding[page]?.notBefore, due < (earliest ?? .max) { earliest = due }
    }
    return earliest
  }

  /// Reads the uffd until EAGAIN and delivers what was read (see the type's doc).
  /// A read error other than EAGAIN closes the dispatcher (`closed(error)`).
  public func drain() {
    guard !isClosed else { return }
    var readNonFaultEvent = false
    while true {
      let count = Int(cuffd_read_events(uffd.fd, readBuffer, CInt(CUFFD_READ_BATCH)))
      if count == -Int(EAGAIN) || count == 0 { break }
      if count < 0 {
        close(UserfaultFDError(.systemCall, "reading the userfaultfd failed", syscall: "read", errno: Errno(rawValue: CInt(-count))))
        return
      }
      for index in 0..<count {
        let event = readBuffer[index]
        if event.event == cuffd_event_pagefault {
          newFaults.append(Pagefault(address: UInt(event.a), flags: .init(rawValue: event.flags), thread: Int32(bitPattern: event.thread)))
        } else {
          readNonFaultEvent = true
          deliverNonFault(event)
        }
      }
      if count < Int(CUFFD_READ_BATCH) { break }
    }
    faultsRead += newFaults.count
    // Parked faults first (they are older), all of them if an event may have unblocked them.
    redeliver(now: nil, all: readNonFaultEvent)
    for fault in newFaults {
      let page = fault.address & ~(pageSize - 1)
      if outstanding[page] != nil {
        faultsMerged += 1
        continue
      }
      deliver(Outstanding(fault: fault, inFlight: false, attempts: 0, notBefore: 0), page: page)
    }
    newFaults.removeAll(keepingCapacity: true)
  }

  /// Delivers again the parked faults whose backoff deadline is at or before `now`.
  public func redeliverDue(now: UInt64 = monotonicNanoseconds()) {
    guard !isClosed else { return }
    redeliver(now: now, all: false)
  }

  /// Completes a fault its handler answered `.inFlight`: `.resolved` forgets it,
  /// `.notNow` parks it for redelivery. Completing a page that is not in flight is ignored.
  public func complete(_ page: UInt, _ result: PagefaultResult) {
    guard var entry = outstanding[page], entry.inFlight else { return }
    entry.inFlight = false
    inFlightCount -= 1
    if inFlightCount == 0 { invalidations.clear() }
    switch result {
    case .resolved: outstanding[page] = nil
    case .notNow, .inFlight: park(&entry, page: page, now: monotonicNanoseconds())
    }
  }

  /// True if a remove/unmap/remap overlapping `range` was read after `since`
  /// (a value of `sequence` taken when the fault was handed out).
  public func isStale(_ range: Range<UInt>, since: UInt64) -> Bool {
    invalidations.isStale(range, since: since)
  }

  /// Stops the dispatcher: delivers `closed(error)` once; later calls do nothing.
  /// Faults still outstanding are dropped: their threads stay blocked until the
  /// uffd's last reference closes (then the kernel releases them).
  public func close(_ error: UserfaultFDError? = nil) {
    guard !isClosed else { return }
    isClosed = true
    outstanding.removeAll()
    parked.removeAll()
    handler.closed(error)
  }

  // MARK: - Internals

  private func deliverNonFault(_ event: cuffd_event) {
    let faultsOut = inFlightCount > 0
    switch event.event {
    case cuffd_event_remove:
      let range = UInt(event.a)..<UInt(event.b)
      invalidations.record(range, faultsOut: faultsOut)
      handler.removed(range)
    case cuffd_event_unmap:
      let range = UInt(event.a)..<UInt(event.b)
      invalidations.record(range, faultsOut: faultsOut)
      handler.unmapped(range)
    case cuffd_event_remap:
      let length = UInt(event.length)
      invalidations.record(UInt(event.a)..<UInt(event.a) + length, UInt(event.b)..<UInt(event.b) + length, faultsOut: faultsOut)
      handler.remapped(from: UInt(event.a), to: UInt(event.b), length: Int(length))
    case cuffd_event_fork:
      invalidations.record(faultsOut: false)
      do {
        let child = try UserfaultFD(adopting: FileDescriptor(rawValue: event.fd), features: uffd.features, ioctls: uffd.ioctls)
        handler.forked(child)
      } catch {
        closeDescriptor(event.fd)
      }
    default:
      break  // an event this build does not know: nothing to deliver
    }
  }

  private func deliver(_ entry: Outstanding, page: UInt) {
    var entry = entry
    switch handler.pagefault(entry.fault, on: uffd) {
    case .resolved:
      outstanding[page] = nil
    case .notNow:
      park(&entry, page: page, now: monotonicNanoseconds())
    case .inFlight:
      entry.inFlight = true
      inFlightCount += 1
      outstanding[page] = entry
    }
  }

  private func park(_ entry: inout Outstanding, page: UInt, now: UInt64) {
    let shift = min(entry.attempts, 6)
    entry.attempts += 1
    entry.notBefore = now + min(Self.backoffBase << UInt64(shift), Self.backoffCap)
    outstanding[page] = entry
    parked.append(page)
  }

  /// `now` nil: read the clock only if something is parked (not on every drain).
  private func redeliver(now: UInt64?, all: Bool) {
    guard !parked.isEmpty else { return }
    let now = now ?? monotonicNanoseconds()
    swap(&parked, &parkedSpare)  // `parked` refills with faults answered "not now" again
    for page in parkedSpare {
      guard let entry = outstanding[page], !entry.inFlight else { continue }
      if !all && entry.notBefore > now {
        parked.append(page)
        continue
      }
      redeliveries += 1
      deliver(entry, page: page)
      if isClosed { return }
    }
    parkedSpare.removeAll(keepingCapacity: true)
  }
}
