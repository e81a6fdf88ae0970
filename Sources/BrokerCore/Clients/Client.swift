import BrokerProtocol
import Userfaultfd

/// What the engine knows of one client, from its connection to its cleanup:
/// the phase of its protocol, its live regions and what each plugin was told
/// of them, the swap-outs in progress, and the order of its map events. Its
/// socket, uffd and pidfd are the runtime's.
final class Client {
  enum Phase {
    case awaitingHello
    case awaitingRegister
    /// Register received; waiting for the plugins to accept its regions.
    case opening
    case active
    case closed

    /// Connected, and not registered yet.
    var isBeforeRegister: Bool { self == .awaitingHello || self == .awaitingRegister }
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

  let id: ClientID
  /// Its process's credentials (a forked child's are its parent's).
  let peer: PeerCredentials
  /// A forked child never connected: it has no socket, no pid, no pidfd.
  let hasSocket: Bool
  /// A VMM that connected to a Firecracker socket: its guest memory stays where
  /// it was mapped for the VM's life (its userfaultfd need not report unmaps
  /// and moves), and it reads nothing the broker sends.
  let isVMM: Bool
  var phase = Phase.awaitingHello
  var pid: Int32 = 0
  var regions = RegionTable()
  var pendingOpen: PendingOpen?
  /// The client's map events in read order: which decisions they made stale.
  var invalidations = Invalidations()
  /// Faults of this client sent to plugins and not answered.
  var faultsOut = 0
  /// Address ranges being swapped out: writes to them are held, fills are write-protected.
  var swapping: [Range<UInt>] = []
  /// Regions announced to plugins (RegionOpened) and not closed yet, by id, with
  /// their plugin's name: each gets RegionClosed when the client goes.
  var announcedRegions: [UInt64: String] = [:]
  /// Every plugin a region was ever announced to: each is told Closed, last.
  var servedBy: Set<String> = []
  /// Per region: offsets a swap-out released, whose only copy the plugin holds.
  /// A plugin that comes back without them (`RegionReply.lost`) moves them to `lostPages`.
  var swappedOutPages: [UInt64: OffsetRanges] = [:]
  /// Per region: swapped-out offsets their plugin lost. Their faults fail closed
  /// (never zeros) until the client drops or unmaps them itself.
  var lostPages: [UInt64: OffsetRanges] = [:]
  /// Per region: offsets the client dropped (MADV_DONTNEED, MADV_REMOVE) and
  /// still has mapped. A plugin that (re)opens the region is told them again
  /// (as `removed` events after RegionOpened): one that restarted, or crashed
  /// before it read the event, would otherwise serve their old content.
  var droppedPages: [UInt64: OffsetRanges] = [:]
  /// Ranges plugins handed to the broker to serve by itself.
  var delegated = DelegatedRanges()
  /// The file its shared-memory regions map (a forked child's is its parent's).
  var sharedMemory: FileHandle?
  /// No stream block before this time (a fill found a map event unread).
  var streamNotBefore: UInt64 = 0
  /// The client's identity across re-attaches (its Register's, or one of the broker's).
  var token: UInt128 = 0
  /// The client this one was forked from (0: it connected itself).
  var parentID: ClientID = 0
  var isForkedChild: Bool { parentID != 0 }
  /// What the client keeps to re-attach with, per region, and must be told of again.
  enum Notice: Hashable, Comparable {
    /// Where the region lies now.
    case layout(UInt64)
    /// What it dropped, and what no one can vouch for.
    case dropped(UInt64)
  }
  /// Notices not sent yet (its socket was full, or they wait for the end of a read).
  var unsent: Set<Notice> = []
  /// Regions of a forked child its plugin would not serve: their faults fail closed.
  var refusedRegions: Set<UInt64> = []
  /// Pages woken with nothing filled (EEXIST, ENOENT, unmapped), and how often
  /// since the last event over them: the livelock guard.
  private(set) var wokenPages: [UInt: Int] = [:]
  /// A page woken this often without an event in between fails closed.
  static let wakeLimit = 3

  /// When it connected (a client must Register within `helloTimeout`).
  let connectedAt: UInt64

  init(id: ClientID, peer: PeerCredentials, hasSocket: Bool, isVMM: Bool = false, connectedAt: UInt64) {
    self.id = id
    self.peer = peer
    self.hasSocket = hasSocket
    self.isVMM = isVMM
    self.connectedAt = connectedAt
  }

  /// Whether a swap-out covers any of `range`: every page filled there must be
  /// write-protected (a prefetch around a page outside it may reach into it).
  func isSwapping(_ range: Range<UInt>) -> Bool { swapping.contains { $0.overlaps(range) } }

  /// Whether one swap-out covers all of `range`.
  func isSwappingAll(of range: Range<UInt>) -> Bool {
    swapping.contains { $0.lowerBound <= range.lowerBound && range.upperBound <= $0.upperBound }
  }

  func noteWoken(_ page: UInt) {
    if wokenPages.count >= 4096 { wokenPages.removeAll(keepingCapacity: true) }  // bounded; a livelock counts up again
    wokenPages[page, default: 0] += 1
  }

  /// How often `page` was woken with nothing filled since the last event over it;
  /// asking resets the count when it reached the limit.
  func takeWakes(of page: UInt) -> Int {
    guard !wokenPages.isEmpty, let wakes = wokenPages[page] else { return 0 }
    if wakes >= Self.wakeLimit { wokenPages[page] = nil }
    return wakes
  }

  /// An event over `range` may explain a new fault there: the count starts again.
  func forgetWakes(in range: Range<UInt>) {
    if !wokenPages.isEmpty { wokenPages = wokenPages.filter { !range.contains($0.key) } }
  }

  /// `spec` as announced to its plugin now: with the swapped-out pages it must
  /// hold (what was dropped follows as `removed` events; the rest is the broker's).
  func announced(_ spec: RegionSpec) -> RegionSpec {
    var spec = spec
    spec.swappedOut = swappedOutPages[spec.id]?.coarsened(to: RegionSpec.maxExtents) ?? []
    spec.dropped = []
    spec.unknown = []
    return spec
  }

  /// The drop record of region `id` for the client, within the extent limit: a
  /// `dropped` record too fragmented to list is covered in `unknown` instead
  /// (after a broker restart those pages fail closed rather than read wrong).
  func dropRecord(of id: UInt64) -> (dropped: [Range<UInt64>], unknown: [Range<UInt64>]) {
    let dropped = droppedPages[id] ?? OffsetRanges()
    var unknown = lostPages[id] ?? OffsetRanges()
    guard dropped.ranges.count > RegionSpec.maxExtents else { return (dropped.ranges, unknown.coarsened(to: RegionSpec.maxExtents)) }
    for range in dropped.ranges { unknown.insert(range) }
    return ([], unknown.coarsened(to: RegionSpec.maxExtents))
  }

  /// The live range of region `regionID` at `offset` (page aligned, inside one live piece).
  func liveRange(regionID: UInt64, offset: UInt64, length: Int, pageSize: Int) throws(BrokerError) -> (range: Range<UInt>, piece: RegionTable.Piece) {
    let mask = UInt64(pageSize - 1)
    guard length > 0, offset & mask == 0, UInt64(length) & mask == 0,
          let piece = regions.pieces.first(where: { $0.spec.id == regionID && !$0.isNewMemory && $0.address(ofOffset: offset) != nil }),
          let start = piece.address(ofOffset: offset), UInt(length) <= piece.live.upperBound - start
    else {
      throw BrokerError(.badRegion, "offset \(offset) + \(length) is not a page-aligned live range of region \(regionID)")
    }
    // Write-protecting hugetlbfs needs a feature the swap-out does not ask for; its records count small pages.
    guard piece.spec.pageSize == pageSize else {
      throw BrokerError(.badRegion, "region \(regionID) has \(piece.spec.pageSize)-byte pages: swap-out serves only regions of the system's pages")
    }
    return (start..<start + UInt(length), piece)
  }

  /// Takes `offsets` of region `regionID` back from the swap records: the client
  /// dropped or unmapped them itself, so they read as zeros (or are gone) now.
  func forgetSwapped(regionID: UInt64, _ offsets: Range<UInt64>) {
    swappedOutPages[regionID]?.subtract(offsets)
    if swappedOutPages[regionID]?.isEmpty == true { swappedOutPages[regionID] = nil }
    lostPages[regionID]?.subtract(offsets)
    if lostPages[regionID]?.isEmpty == true { lostPages[regionID] = nil }
  }
}
