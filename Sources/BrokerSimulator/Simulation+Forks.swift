import BrokerCore
import BrokerProtocol

/// Forks (UFFD_FEATURE_EVENT_FORK), as the kernel makes them: the child is a
/// copy of the parent's memory at the fork (present pages copied, missing
/// ones missing), with a uffd of its own that the FORK message hands the
/// broker; the forking thread waits until that message is read, and the child
/// runs only from then on. A parent that dies first takes the fork with it.
extension Simulation {
  func fork(_ slot: Int, thread: Int) {
    let ticket = nextTicket
    nextTicket += 1
    let child = processes[slot].forked(pid: nextPid, threads: 2)
    nextPid += 1
    forks[ticket] = (slot, child)
    statistics.forks += 1
    note("client \(processes[slot].id) thread \(thread) forks (child pid \(child.pid), ticket \(ticket))")
    processes[slot].beginMapChange([.fork(ticket: ticket, thread: thread)], thread: thread)
  }

  /// The broker took the child's uffd as client `id`: the child runs from now on.
  func adoptChild(_ ticket: ForkTicket, id: ClientID) {
    guard let (parent, forked) = forks.removeValue(forKey: ticket.rawValue) else {
      failure = "the broker adopted fork ticket \(ticket.rawValue), which no FORK it read carried"
      return
    }
    var child = forked
    child.inheritedUnserved = processes[parent].unservedRegions
    child.inheritedUnknown = processes[parent].unknown
    child.id = id
    child.registered = true
    child.forkedAt = now
    slots[id] = processes.count
    processes.append(child)
    note("client \(id) is the forked child (pid \(child.pid))")
  }

  /// The broker let go of a fork's uffd without serving it: the child's
  /// registered memory is no longer intercepted, and what it never had reads zeros.
  func droppedChild(_ ticket: ForkTicket, poisoning ranges: [Range<UInt>]?) {
    guard var child = forks.removeValue(forKey: ticket.rawValue)?.child else { return }
    for range in ranges ?? [] { _ = child.poisonMissing(range) }
    let exposed = child.pages.filter { $0.value.present == nil && child.expected($0.value.origin) != .zero }.keys.sorted()
    if let page = exposed.first {
      failure = "the broker let go of a forked child's uffd (ticket \(ticket.rawValue)): page 0x\(String(page, radix: 16)) and \(exposed.count - 1) more read zeros where data was"
    } else if ranges != nil {
      failure = "the broker failed a forked child closed (ticket \(ticket.rawValue)), and no schedule here calls for it"
    }
  }

  /// Whether page `page` of process `slot` may fail closed by design (README,
  /// Reliability): a forked child's region its plugin did not take within the
  /// registration timeout (or refused: the parent's region was not open on it);
  /// a grown tail in a forked child (no pid to read its mappings), or moved
  /// since it grew, or with no region memory before it in its mapping any
  /// more (the broker cannot tell it from memory it lost track of); a page in
  /// the cover of a drop record too fragmented to list (`unknown`).
  func mayFailClosed(_ slot: Int, page: UInt) -> Bool {
    let process = processes[slot]
    guard let origin = process.pages[page]?.origin else { return true }  // not its memory (any more)
    if origin.isFresh { return process.forkedAt != nil || process.movedFresh.contains(origin) || !process.followsRegionMemory(page) }
    if process.unknown[origin.region]?.contains(where: { $0.contains(origin.offset) }) == true { return true }
    return process.forkedAt != nil && (process.inheritedUnserved.contains(origin.region) || !process.acceptedRegions.contains(origin.region))
  }

  /// Pages of process `slot` poisoned: a failure unless each may fail closed.
  func poisoned(_ pages: [UInt], of slot: Int, why: String) {
    for page in pages {
      guard mayFailClosed(slot, page: page) else {
        failure = "client \(processes[slot].id) page 0x\(String(page, radix: 16)) poisoned (\(why))"
        return
      }
      statistics.failedClosed += 1
    }
    reapIfKilled(slot)
  }
}
