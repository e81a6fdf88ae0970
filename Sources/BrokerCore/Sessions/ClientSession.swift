import BrokerProtocol
import Glibc
import Logging
import Userfaultfd

/// One client process from accept to cleanup: its socket, its userfaultfd and
/// the dispatcher that orders its events, its live regions, its pidfd.
///
/// As the dispatcher's handler it routes each fault to the region's plugin
/// (`.inFlight`: the decision arrives later), and forwards removes, unmaps and
/// remaps to the plugins after updating the region table.
final class ClientSession: UserfaultFDHandler {
  enum Phase {
    case awaitingHello
    case awaitingRegister
    /// Register received; waiting for the plugins to accept its regions.
    case opening
    case active
    case closed
  }

  /// Regions announced to plugins and waiting for their replies.
  struct PendingOpen {
    var requestID: UInt64
    var regions: [RegionSpec]
    var awaiting: Set<UInt64>
    var deadline: UInt64
    /// When the regions were announced: a connected plugin that has not answered
    /// within its deadline is hung, as one that does not answer a fault.
    var sentAt: UInt64
  }

  let id: UInt64
  /// Nil for a forked child, which never connected.
  let socket: PacketSocket?
  let peer: PeerCredentials
  unowned let broker: Broker
  @exclusivity(unchecked) var phase = Phase.awaitingHello
  /// Listed in the broker's sessions with parked faults.
  @exclusivity(unchecked) var hasParkedFaults = false
  @exclusivity(unchecked) var pid: Int32 = 0
  @exclusivity(unchecked) var uffd: UserfaultFD?
  @exclusivity(unchecked) var dispatcher: EventDispatcher?
  @exclusivity(unchecked) var regions = RegionTable()
  @exclusivity(unchecked) var pidfd: CInt = -1
  @exclusivity(unchecked) var pendingOpen: PendingOpen?
  /// Address ranges being swapped out: writes to them are held, fills are write-protected.
  @exclusivity(unchecked) var swapping: [Range<UInt>] = []
  /// Pages whose write-protect faults are held until their swap-out ends.
  @exclusivity(unchecked) var heldWrites: Set<UInt> = []
  /// Regions announced to plugins (RegionOpened) and not closed yet, by id, with
  /// their plugin's name: each gets RegionClosed when the client goes.
  @exclusivity(unchecked) var announcedRegions: [UInt64: String] = [:]
  /// Every plugin a region was ever announced to: each is told Closed, last.
  @exclusivity(unchecked) var servedBy: Set<String> = []
  /// Per region: offsets a swap-out released, whose only copy the plugin holds.
  /// A plugin that comes back without them (`RegionReply.lost`) moves them to `lostPages`.
  @exclusivity(unchecked) var swappedOutPages: [UInt64: OffsetRanges] = [:]
  /// Per region: swapped-out offsets their plugin lost. Their faults fail closed
  /// (never zeros) until the client drops or unmaps them itself.
  @exclusivity(unchecked) var lostPages: [UInt64: OffsetRanges] = [:]
  /// Ranges plugins handed to the broker to serve by itself.
  @exclusivity(unchecked) var delegated = DelegatedRanges()

  /// Whether a swap-out covers any of `range`: every page filled there must be
  /// write-protected (a prefetch around a page outside it may reach into it).
  func isSwapping(_ range: Range<UInt>) -> Bool { swapping.contains { $0.overlaps(range) } }

  /// The client's identity across re-attaches (its Register's, or one of the broker's).
  @exclusivity(unchecked) var token: UInt128 = 0
  /// The client this one was forked from (0: it connected itself).
  @exclusivity(unchecked) var parentID: UInt64 = 0
  var isForkedChild: Bool { parentID != 0 }
  /// Pages woken with nothing filled (EEXIST, ENOENT, unmapped), and how often
  /// since the last event over them: the livelock guard.
  @exclusivity(unchecked) private var wokenPages: [UInt: Int] = [:]
  /// A page woken this often without an event in between fails closed.
  static let wakeLimit = 3

  func noteWoken(_ page: UInt) {
    if wokenPages.count >= 4096 { wokenPages.removeAll(keepingCapacity: true) }  // bounded; a livelock counts up again
    wokenPages[page, default: 0] += 1
  }

  /// An event over `range` may explain a new fault there: the count starts again.
  private func forgetWakes(in range: Range<UInt>) {
    if !wokenPages.isEmpty { wokenPages = wokenPages.filter { !range.contains($0.key) } }
  }

  /// Regions whose new layout the client has not been sent yet (its socket was full).
  @exclusivity(unchecked) var layoutUnsent: Set<UInt64> = []
  /// Regions of a forked child its plugin would not serve: their faults fail closed.
  @exclusivity(unchecked) var refusedRegions: Set<UInt64> = []

  init(id: UInt64, socket: PacketSocket?, peer: PeerCredentials, broker: Broker) {
    self.id = id
    self.socket = socket
    self.peer = peer
    self.broker = broker
  }

  deinit { closeDescriptor(pidfd) }

  // MARK: UserfaultFDHandler

  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    if fault.flags.contains(.writeProtect) {
      // Only swap-outs write-protect: hold the writer until its page is either
      // dropped (it then faults the stored copy back in) or kept and unprotected.
      let page = fault.address & ~UInt(systemPageSize - 1)
      if isSwapping(page..<page + UInt(systemPageSize)) {
        heldWrites.insert(page)
        return .inFlight
      }
      _ = uffd.writeProtect(address: page, length: systemPageSize, protect: false)
      return .resolved
    }
    // A forked child's faults wait until its plugins have taken its regions.
    if phase == .opening { return .notNow }
    // The rare cases first, each behind one emptiness test: the fault path pays no lookup for them.
    if !wokenPages.isEmpty, let wakes = wokenPages[fault.address & ~UInt(systemPageSize - 1)], wakes >= Self.wakeLimit {
      wokenPages[fault.address & ~UInt(systemPageSize - 1)] = nil
      return failClosed(fault, "it was woken \(wakes) times and faulted again each time")
    }
    guard let piece = regions.piece(containing: fault.address) else { return placeUnknown(fault, on: uffd) }
    if piece.isNewMemory { return broker.fillNewMemory(fault, piece: piece, session: self) }
    if !lostPages.isEmpty, lostPages[piece.spec.id]?.contains(piece.offset(of: fault.address)) == true {
      return failClosed(fault, "its swapped-out content was lost with its plugin")
    }
    if !refusedRegions.isEmpty && refusedRegions.contains(piece.spec.id) {
      return failClosed(fault, "its plugin does not serve this forked child")
    }
    if !delegated.isEmpty, let range = delegated.range(regionID: piece.spec.id, offset: piece.offset(of: fault.address)),
       let result = broker.resolveLocally(fault, piece: piece, delegated: range, session: self) {
      return result
    }
    return broker.sendFault(fault, piece: piece, session: self)
  }

  /// A fault where the table has no piece. Waking it blindly would livelock a
  /// thread whose memory the kernel still has registered (it faults again at
  /// once), so the kernel's mappings decide:
  /// - unmapped, or replaced by memory this uffd does not serve: wake it; the
  ///   access re-faults against what is there now (SIGSEGV, or plain memory);
  /// - a region still being opened: park it until its plugin accepts;
  /// - memory registered without an event (a grown tail, a `DONTUNMAP` source):
  ///   new memory, filled with zeros from now on;
  /// - anything else: the table lost track of it. Fail closed (poison).
  /// Each fill checks with the kernel that no map change is pending (EAGAIN
  /// while one is queued), so an event not yet read only delays the decision.
  private func placeUnknown(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    let page = fault.address & ~UInt(systemPageSize - 1)
    if pendingOpen?.regions.contains(where: { $0.range.contains(page) }) == true { return .notNow }
    // A forked child has no pid to read the mappings of: poison tells (ENOENT where unregistered).
    if isForkedChild { return failClosed(fault, "a forked child's fault outside its table") }
    guard let mapping = ProcessMappings.mapping(containing: page, pid: pid) else {
      _ = uffd.wake(address: page, length: systemPageSize)
      noteWoken(page)
      return .resolved
    }
    if let range = regions.newMemory(around: page, in: mapping) {
      regions.addNewMemory(range)
      if let piece = regions.piece(containing: page) { return broker.fillNewMemory(fault, piece: piece, session: self) }
    }
    return failClosed(fault, "the fault is in registered memory the broker's region table does not cover")
  }

  private func failClosed(_ fault: Pagefault, _ cause: String) -> PagefaultResult {
    broker.failClosed(fault.address & ~UInt(systemPageSize - 1), session: self, cause: cause)
  }

  func removed(_ range: Range<UInt>) {
    forgetWakes(in: range)
    // A swap-out drops pages whose content the plugin has just stored.
    report(regions.overlapping(range), swappedOut: isSwappingAll(of: range), as: BrokerEvent.removed)
  }

  /// `spec` as announced to its plugin now: with the swapped-out pages it must hold.
  func announced(_ spec: RegionSpec) -> RegionSpec {
    var spec = spec
    spec.swappedOut = swappedOutPages[spec.id]?.coarsened(to: RegionSpec.maxSwappedExtents) ?? []
    return spec
  }

  /// Whether one swap-out covers all of `range`.
  func isSwappingAll(of range: Range<UInt>) -> Bool {
    swapping.contains { $0.lowerBound <= range.lowerBound && range.upperBound <= $0.upperBound }
  }

  /// Takes removed or unmapped parts back from delegations (their next faults go
  /// to the plugin) and tells each part's plugin, in order.
  private func report(_ parts: [(piece: RegionTable.Piece, range: Range<UInt>)], swappedOut: Bool = false, as event: (RangeEvent) -> BrokerEvent) {
    for part in parts where !part.piece.isNewMemory {
      let start = part.piece.offset(of: part.range.lowerBound)
      let offsets = start..<start + UInt64(part.range.count)
      let regionID = part.piece.spec.id
      if swappedOut {
        swappedOutPages[regionID, default: OffsetRanges()].insert(offsets)
      } else {
        // Dropped or unmapped by the client itself: they read as zeros (or are gone) now.
        swappedOutPages[regionID]?.subtract(offsets)
        lostPages[regionID]?.subtract(offsets)
        if lostPages[regionID]?.isEmpty == true { lostPages[regionID] = nil }
      }
      delegated.cut(regionID: part.piece.spec.id, start..<start + UInt64(part.range.count))
      broker.sendEvent(event(RangeEvent(clientID: id, regionID: part.piece.spec.id, range: part.range, startOffset: start, swappedOut: swappedOut)),
                       to: part.piece.route)
    }
  }

  /// The live range of region `regionID` at `offset` (page aligned, inside one live piece).
  func liveRange(regionID: UInt64, offset: UInt64, length: Int) throws(BrokerError) -> (range: Range<UInt>, piece: RegionTable.Piece) {
    let mask = UInt64(systemPageSize - 1)
    guard length > 0, offset & mask == 0, UInt64(length) & mask == 0,
          let piece = regions.pieces.first(where: { $0.spec.id == regionID && !$0.isNewMemory && $0.address(ofOffset: offset) != nil }),
          let start = piece.address(ofOffset: offset), UInt(length) <= piece.live.upperBound - start
    else {
      throw BrokerError(.badRegion, "offset \(offset) + \(length) is not a page-aligned live range of region \(regionID)")
    }
    return (start..<start + UInt(length), piece)
  }

  func unmapped(_ range: Range<UInt>) {
    forgetWakes(in: range)
    let parts = regions.unmap(range)
    report(parts, as: BrokerEvent.unmapped)
    broker.layoutChanged(of: self, regions: parts.filter { !$0.piece.isNewMemory }.map(\.piece.spec.id))
  }

  func remapped(from: UInt, to: UInt, length: Int) {
    forgetWakes(in: from..<from + UInt(length))
    forgetWakes(in: to..<to + UInt(length))
    let moved = regions.move(from: from, to: to, length: length).filter { !$0.isNewMemory }
    broker.layoutChanged(of: self, regions: moved.map(\.spec.id))
    for piece in moved {
      let newBase = piece.live.lowerBound &- UInt(piece.offset)
      broker.sendEvent(.remapped(RemapEvent(clientID: id, regionID: piece.spec.id, from: from + (piece.live.lowerBound - to), to: piece.live.lowerBound, length: piece.live.count, newBase: newBase)), to: piece.route)
    }
  }

  func forked(_ child: UserfaultFD) {
    broker.adoptFork(child, of: self)
  }

  func closed(_ error: UserfaultFDError?) {
    if let error, phase != .closed {
      broker.logger.warning("client userfaultfd failed", metadata: ["client.id": "\(id)", "error": "\(error)"])
    }
  }
}
