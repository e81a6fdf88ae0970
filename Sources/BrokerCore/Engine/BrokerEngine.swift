import BrokerProtocol
import Logging
import Userfaultfd

/// The broker's logic, without I/O: a state machine that takes inputs (a
/// request decoded from a client, events read from its uffd, a plugin's
/// decisions, the outcome of a fill, the time) and returns `Action`s for the
/// runtime to perform. It makes no system call and reads no clock, so a
/// simulator can drive it through any interleaving, deterministically.
///
/// Every input method appends actions; the runtime takes them with
/// `takeActions(into:)` and performs them in order, feeding the outcomes the
/// engine asked for back as inputs (which may append more).
///
/// It guarantees, for each client:
/// 1. **Ordering**: the map events (remove, unmap, remap, fork) of one read are
///    applied to the region table and sent to the plugins before the faults of
///    that read are routed.
/// 2. **No stale decision**: a decision for a fault sent before an overlapping
///    map event was read is dropped, and the fault asked again.
/// 3. **Redelivery**: a fault that cannot be served now is parked and delivered
///    again after the client's next map event and on a backoff deadline.
/// 4. **Never stuck**: a fault is filled, woken where nothing needs filling, or
///    failed closed (poisoned, or its client killed); a page woken
///    `Client.wakeLimit` times with no event in between fails closed.
/// 5. **Closed last**: every plugin a client's region was announced to is told
///    `RegionClosed` for each region still open, then `Closed`, once, last.
///
/// Not thread-safe: confine it to one thread.
public final class BrokerEngine {
  public internal(set) var configuration: BrokerConfiguration
  /// The system's page size: the page of every region but hugetlb ones.
  public let pageSize: Int
  /// The page sizes a region may have: the system's, and the huge page sizes
  /// the kernel offers (hugetlbfs, `MAP_HUGETLB`) up to `maxHugePageSize`.
  public let pageSizes: Set<Int>

  var clients: [ClientID: Client] = [:]
  var plugins: [PluginID: Plugin] = [:]
  var routes: [String: PluginRoute] = [:]
  var ledger = FaultLedger()
  var pendingStores: [UInt64: PendingStore] = [:]
  var actions: [Action] = []
  /// The time of the input being handled: timestamps without a clock read per fault.
  var now: UInt64 = 0
  private var nextID: UInt64 = 1
  /// A client's identity across re-attaches: random (the runtime's CSPRNG; the simulator's seed).
  let makeToken: () -> UInt128
  var nextSweep: UInt64 = 0
  /// Clients with delegation streams, served in turn (some may have none left: dropped when met).
  var streaming: [ClientID] = []
  /// Bytes filled by delegation streams (for tests and the benchmark).
  public internal(set) var streamedBytes: UInt64 = 0

  /// A swap-out chunk handed to a plugin to store; the client waits for its reply.
  struct PendingStore {
    var client: Client
    var requestID: UInt64
    var range: Range<UInt>
    var piece: RegionTable.Piece
    /// The plugin asked to store it: only its reply counts.
    var plugin: Plugin
  }

  /// Counters for logs, metrics and the benchmark.
  public internal(set) var statistics = FaultStatistics()
  /// Refusals, connections, disconnects and failures, by kind and cause.
  public internal(set) var tally = Tally()
  /// The least level of the log lines the engine asks for (the runtime sets its logger's).
  public var logLevel: Logger.Level = .trace
  var faultLatency = FaultLatency()
  /// The log's budgets per kind of incident and per peer (see `report`):
  /// only windows of the current second are kept.
  var logWindows: [LogKey: LogWindow] = [:]
  /// When the earliest window ends (nil: none open).
  var nextLogSummary: UInt64?
  /// Lines a second of one kind, from all peers together.
  static let logLinesPerSecond = 20
  /// Lines a second of one kind from one uid: one peer cannot use up a kind's
  /// budget and hide the others'.
  static let logLinesPerSecondPerPeer = 5

  /// Events kept for a plugin that is away; past this a client is failed closed
  /// (a variable only so that a test need not make a million events).
  var maxMissedEvents = 1 << 20
  /// The most pages the broker fills at once around a fault of its own (delegated ranges, new memory).
  public static let maxLocalFillPages = 32
  /// The lowest address a process may map (the default `vm.mmap_min_addr`): the
  /// address a forked child's exit is probed at.
  public static let probeAddress: UInt = 65536
  /// The end of the addresses every 64-bit Linux process maps without asking
  /// (47 bits, less a page): a wake over everything a client may wait at.
  public static let userAddressEnd: UInt = 0x7FFF_FFFF_F000

  /// The largest huge page the broker serves: its zero and file buffers, and a
  /// plugin's shared area, hold one (1 GiB pages would make them 1 GiB).
  public static let maxHugePageSize = 2 << 20
  /// The most bytes the broker fills at once around a fault of its own in a
  /// region of `pageSize`-byte pages: `maxLocalFillPages` small pages, or one huge page.
  public static func localFillBytes(pageSize: Int, systemPageSize: Int) -> Int { max(maxLocalFillPages * systemPageSize, pageSize) }

  /// An engine for regions of `pageSize` (the system's) bytes, or of the huge
  /// page sizes in `hugePageSizes` (the kernel's; those above `maxHugePageSize` are left out).
  public init(configuration: BrokerConfiguration, pageSize: Int, hugePageSizes: [Int] = [], now: UInt64, makeToken: @escaping () -> UInt128) throws(BrokerError) {
    try configuration.validate()
    self.configuration = configuration
    self.makeToken = makeToken
    self.pageSize = pageSize
    self.pageSizes = Set([pageSize] + hugePageSizes.filter { $0 > pageSize && $0 <= Self.maxHugePageSize && $0 & ($0 - 1) == 0 })
    self.now = now
    actions.reserveCapacity(256)
    for plugin in configuration.plugins { _ = route(named: plugin.name) }
  }

  /// Moves the actions of the inputs handled so far into `buffer` (emptied first).
  public func takeActions(into buffer: inout [Action]) {
    buffer.removeAll(keepingCapacity: true)
    swap(&actions, &buffer)
  }

  public var hasActions: Bool { !actions.isEmpty }

  /// Faults read and not settled (the simulator bounds them by the blocked threads).
  public var outstandingFaults: Int { ledger.count }

  /// The pid a client registered with (0 for a forked child or before Register).
  public func pid(of client: ClientID) -> Int32 { clients[client]?.pid ?? 0 }

  func takeID() -> UInt64 {
    defer { nextID += 1 }
    return nextID
  }

  func route(named name: String) -> PluginRoute {
    if let route = routes[name] { return route }
    let route = PluginRoute(name: name, now: now)
    routes[name] = route
    return route
  }

  /// A log line, built only at `logLevel` or above (its text and metadata cost allocations).
  func log(_ level: Logger.Level, _ message: @autoclosure () -> Logger.Message, _ metadata: @autoclosure () -> Logger.Metadata = [:]) {
    guard level >= logLevel else { return }
    actions.append(.log(level, message(), metadata()))
  }

  func reply(_ client: Client, _ reply: BrokerReply) {
    guard client.hasSocket else { return }
    actions.append(.reply(client.id, reply))
  }
}
