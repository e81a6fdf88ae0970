import Userfaultfd

/// Every fault the broker has read and not settled: the one ledger.
///
/// A fault is entered when first read and leaves when settled; in between it
/// is in exactly one state. Its id is the id a plugin answers: each send gives
/// it a fresh generation (`InFlightTable`), so an answer to an earlier send,
/// or for a slot reused since, finds nothing. Two indexes hang off the ledger,
/// kept by it alone: the fault of each (client, page), which merges a second
/// fault of a page into the first, and each plugin's count of faults in flight.
struct FaultLedger {
  typealias ID = UInt64

  enum State {
    /// Being handled by the input that read it (routing, an inspection, a fill).
    case handling
    /// Answered "not now": delivered again after the client's next map event,
    /// or at `notBefore` (backoff doubling from 1 ms to 64 ms).
    case parked(notBefore: UInt64)
    /// Sent to `plugin` when the client's event count was `sequence`: an
    /// overlapping event read later makes its decision stale.
    case inFlight(plugin: Plugin, sequence: UInt64, sentAt: UInt64)
    /// A write to a page being swapped out, held until the swap-out ends.
    case held
  }

  struct Fault {
    let client: Client
    /// The faulting page: the fault's address rounded down to its region's page.
    let page: UInt
    /// Its region's page size (the system's, or a huge page's): every fill of the fault covers whole pages of it.
    let pageSize: Int
    var fault: Pagefault
    var state: State
    /// Times it was parked.
    var attempts: Int
    /// When the broker read it (its latency runs from here to its fill).
    let readAt: UInt64
  }

  private struct PageKey: Hashable {
    var client: ClientID
    var page: UInt
  }

  private var table = InFlightTable<Fault>(reservingCapacity: 4096)
  private var byPage: [PageKey: ID] = [:]
  /// Ids of parked faults (some may have left the state since: checked when taken).
  private(set) var parked: [ID] = []

  init() { byPage.reserveCapacity(4096) }

  var count: Int { table.count }

  /// The fault already outstanding on `page` of `client`, if any.
  func id(client: ClientID, page: UInt) -> ID? { byPage[PageKey(client: client, page: page)] }

  /// Enters a fault in state `.handling`.
  mutating func enter(_ fault: Pagefault, page: UInt, pageSize: Int, client: Client, now: UInt64) -> ID {
    let id = table.insert(Fault(client: client, page: page, pageSize: pageSize, fault: fault, state: .handling, attempts: 0, readAt: now))
    byPage[PageKey(client: client.id, page: page)] = id
    return id
  }

  subscript(id: ID) -> Fault? { table.entry(id) }

  /// A minor fault whose page left the file's cache: a missing fault from now on.
  mutating func clearMinor(_ id: ID) {
    guard var fault = table.entry(id) else { return }
    fault.fault.flags.remove(.minor)
    table.update(id, fault)
  }

  /// Settles a fault: it leaves the ledger.
  mutating func settle(_ id: ID) {
    guard let fault = table.remove(id) else { return }
    leave(fault)
    byPage[PageKey(client: fault.client.id, page: fault.page)] = nil
  }

  /// Moves a fault to `state`; a fault sent to a plugin gets a fresh id, which
  /// is returned (the old one no longer finds it).
  @discardableResult
  mutating func move(_ id: ID, to state: State) -> ID {
    guard var fault = table.entry(id) else { return id }
    leave(fault)
    var id = id
    if case .inFlight(let plugin, _, _) = state {
      plugin.inFlight += 1
      fault.client.faultsOut += 1
      table.remove(id)
      fault.state = state
      id = table.insert(fault)
      byPage[PageKey(client: fault.client.id, page: fault.page)] = id
      return id
    }
    if case .parked = state {
      fault.attempts += 1
      parked.append(id)
    }
    fault.state = state
    table.update(id, fault)
    return id
  }

  private func leave(_ fault: Fault) {
    guard case .inFlight(let plugin, _, _) = fault.state else { return }
    plugin.inFlight -= 1
    fault.client.faultsOut -= 1
    // Nothing of the client is out: no decision can be stale, its events need no keeping.
    if fault.client.faultsOut == 0 { fault.client.invalidations.clear() }
  }

  /// Takes the parked faults for which `isDue` holds out of the parked list
  /// (they stay in the ledger, parked, until moved).
  mutating func takeParked(where isDue: (Fault) -> Bool) -> [ID] {
    guard !parked.isEmpty else { return [] }
    var due: [ID] = []
    var kept: [ID] = []
    for id in parked {
      guard let fault = table.entry(id), case .parked = fault.state else { continue }
      if isDue(fault) { due.append(id) } else { kept.append(id) }
    }
    parked = kept
    return due
  }

  /// The earliest time a parked fault is due.
  var nextParkedDeadline: UInt64? {
    var earliest: UInt64?
    for id in parked {
      if case .parked(let due)? = table.entry(id)?.state, due < earliest ?? .max { earliest = due }
    }
    return earliest
  }

  /// Every fault for which `isIncluded` holds (off the fault path).
  func ids(where isIncluded: (Fault) -> Bool) -> [ID] { table.ids(where: isIncluded) }

  /// Forgets every fault of `client` (it is gone: its threads are released when its uffd closes).
  mutating func forget(client: Client) {
    for id in ids(where: { $0.client === client }) { settle(id) }
  }
}
