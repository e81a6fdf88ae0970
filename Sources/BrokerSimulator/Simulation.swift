import BrokerCore
import BrokerProtocol
import Userfaultfd

/// The broker's engine driven through a seeded schedule, FoundationDB-style:
/// client processes whose threads fault, drop (balloons too), unmap, move and
/// grow memory, and fork, while others fault on it; plugins that answer late,
/// out of order, twice, wrongly or never, crash, hang and come back; a broker
/// killed and restarted, its clients re-attaching as the ClientSDK does; time
/// that passes in jumps; fills that the kernel model refuses as the kernel
/// would (EAGAIN, EEXIST, ENOENT, partial). The simulation is the engine's
/// runtime: it performs every action.
///
/// Checked at every step:
/// - every page filled reads what it must: the plugin's data for its region
///   offset, or zeros once the process dropped it; a forked child's, what the
///   parent's read at the fork (no stale decision applied, no event reordered
///   after a fault, no offset mixed up, no parent's later drop leaking in);
/// - nothing fails closed (poison, or a client killed) unless the model says
///   the page may by design (`mayFailClosed`), and a keeper letting a forked
///   child go after a broker restart leaves no page reading zeros where data
///   was, but where the ClientSDK cannot reach (`letGo`);
/// - a fault woken `wakeLimit` times with no map event in between is a livelock;
/// - the broker keeps at most one fault per page of its clients.
/// After the schedule, with the plugins made reliable: every thread gets its
/// page (nothing stuck), and when the clients exit, every plugin that served
/// one (forked children too) is told Closed, once, after everything else of it.
public final class Simulation {
  public struct Failure: Error, CustomStringConvertible {
    public var seed: UInt64
    /// The step it failed at (past `scheduleSteps` if while settling).
    public var step: Int
    /// The schedule's length: `--steps` replays it.
    public var scheduleSteps: Int
    public var message: String
    public var trace: [String]
    public var description: String {
      "seed \(seed), step \(step) of a \(scheduleSteps)-step schedule: \(message)" + (trace.isEmpty ? "" : "\n" + trace.suffix(80).joined(separator: "\n"))
    }
  }

  public struct Statistics {
    public var steps = 0
    public var faults = 0
    public var fills = 0
    public var mapChanges = 0
    public var forks = 0
    /// mremaps that grew a range (in place or moved).
    public var grows = 0
    /// Balloons: every other page of a range dropped, one madvise at a time.
    public var balloons = 0
    public var brokerRestarts = 0
    public var pluginCrashes = 0
    /// Decision fills the kernel could not read the bytes of (EFAULT, injected).
    public var unreadableFills = 0
    /// Faults of clones' shared memory reported minor (the snapshot file's cache had the page).
    public var minorFaults = 0
    public var clientsServed = 0
    /// Pages failed closed where the model allows it.
    public var failedClosed = 0
    /// Pages of forked children left reading zeros where data was by a known
    /// hole of the ClientSDK after a broker restart (see `letGo`).
    public var exposedByKeepers = 0
    /// Delegation stream blocks the fake kernel filled (whole or in part).
    public var streamedBlocks = 0

    mutating func add(_ other: Statistics) {
      steps += other.steps
      faults += other.faults
      fills += other.fills
      mapChanges += other.mapChanges
      forks += other.forks
      grows += other.grows
      balloons += other.balloons
      brokerRestarts += other.brokerRestarts
      pluginCrashes += other.pluginCrashes
      unreadableFills += other.unreadableFills
      minorFaults += other.minorFaults
      clientsServed += other.clientsServed
      failedClosed += other.failedClosed
      exposedByKeepers += other.exposedByKeepers
      streamedBlocks += other.streamedBlocks
    }
  }

  public let seed: UInt64
  public internal(set) var statistics = Statistics()
  var random: SimRandom
  var now: UInt64 = 1_000_000_000
  let configuration: BrokerConfiguration
  /// The broker running now (a restart replaces it with a fresh one).
  var engine: BrokerEngine
  /// The simulated system's page size; every third client maps huge pages (`hugePageSize`) instead.
  static let smallPageSize = 4096
  static let hugePageSize = 2 << 20
  var processes: [SimProcess] = []
  var slots: [ClientID: Int] = [:]
  /// Forks whose FORK message was not read yet: the parent's slot, and the child.
  var forks: [UInt64: (parent: Int, child: SimProcess)] = [:]
  var nextTicket: UInt64 = 1
  var plugins: [SimPlugin]
  var step = 0
  let tracing: Bool
  public private(set) var trace: [String] = []
  var scheduleSteps = 0
  var actions: [Action] = []
  /// Plugins answer everything at once and never misbehave (the end of a run).
  var reliable = false
  var nextPid: Int32 = 1000
  /// Bytes of decisions, alive until their fills were performed.
  var buffers: [UnsafeMutableRawBufferPointer] = []
  var failure: String?
  /// Ranges a map change in progress touches, per process: a program hands
  /// memory on only once the change returned (a thread may still move
  /// memory into a hole another thread is making).
  var busy: [Int: [(thread: Int, range: Range<UInt>)]] = [:]
  /// Fresh pages made so far (grown tails): their serial numbers.
  var freshPages: UInt64 = 0
  /// The snapshot file every clone maps (region 1's backing at file offset 0):
  /// the offsets its page cache holds. The kernel's: it outlives broker restarts.
  var snapshotCache: Set<UInt64> = []
  /// Handles of the snapshot file the broker holds (one per Register), and the next one.
  var sharedFiles: Set<FileHandle> = []
  var nextSharedFile: UInt64 = 1 << 32  // apart from the delegated files' handles (their region ids), as the runtime numbers all files from one counter

  static let wakeLimit = 10
  /// Pages of each client's two regions: the second large enough for a
  /// balloon to fragment its drop record past `RegionSpec.maxExtents`.
  static let regionPages = [16, 72]
  /// Processes alive at once, forked children included.
  static let maxProcesses = 6
  /// Registered pages a process may grow to.
  static let maxPages = regionPages.reduce(0, +) + 16
  static let features: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap, .eventFork]

  public init(seed: UInt64, tracing: Bool = false) {
    self.seed = seed
    self.tracing = tracing
    random = SimRandom(seed: seed)
    var configuration = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0)
    configuration.plugins = [.init(name: "p0", executable: "/bin/true"), .init(name: "p1", executable: "/bin/true")]
    configuration.pluginDeadline = .milliseconds(50)
    configuration.registrationTimeout = .seconds(2)
    self.configuration = configuration
    engine = Self.makeEngine(configuration, seed: seed, now: now)
    plugins = [SimPlugin(name: "p0"), SimPlugin(name: "p1")]
  }

  /// A broker as the daemon starts it; its tokens (a forked child's) come from the seed.
  static func makeEngine(_ configuration: BrokerConfiguration, seed: UInt64, now: UInt64) -> BrokerEngine {
    var tokens = SimRandom(seed: seed ^ 0x5EED)
    // Checked values: the configuration is valid.
    return try! BrokerEngine(configuration: configuration, pageSize: smallPageSize, hugePageSizes: [hugePageSize], now: now, makeToken: { UInt128(tokens.next()) << 64 | UInt128(tokens.next()) | 1 })
  }

  /// Runs `steps` steps, then settles (plugins made reliable), then ends every client.
  public func run(steps: Int) throws(Failure) {
    scheduleSteps = steps
    for index in plugins.indices { connect(index) }
    for _ in 0..<3 { startClient() }
    try check()
    while step < steps {
      step += 1
      statistics.steps += 1
      takeStep()
      try check()
    }
    try settle()
    for slot in processes.indices where !processes[slot].exited { exitProcess(slot) }
    try settle()
    for plugin in plugins {
      for client in plugin.served.subtracting(plugin.closed).sorted() {
        throw fail("plugin \(plugin.name) served client \(client) and was never told Closed")
      }
    }
  }

  func note(_ line: @autoclosure () -> String) {
    if tracing { trace.append("[\(step)] " + line()) }
  }

  func fail(_ message: String) -> Failure {
    Failure(seed: seed, step: step, scheduleSteps: scheduleSteps, message: message, trace: trace)
  }

  private func check() throws(Failure) {
    if let failure { throw fail(failure) }
    // At most one per page of a client the broker serves (a forked child's
    // exit is seen at its next probe): a second fault of a page merges into the first.
    let bound = processes.count(where: \.knownToBroker) * Self.maxPages
    if engine.outstandingFaults > bound {
      throw fail("the broker keeps \(engine.outstandingFaults) faults, more than the \(bound) pages its clients have")
    }
    for process in processes where !process.exited {
      for (thread, state) in process.threads.enumerated() {
        if case .faulting(let page, _, let wakes) = state, wakes > Self.wakeLimit {
          throw fail("livelock: client \(process.id) thread \(thread) woken \(wakes) times at 0x\(String(page, radix: 16)) with no map event between")
        }
      }
    }
  }

  // MARK: - Steps

  private func takeStep() {
    switch random.below(1000) {
    case 0..<380: threadActs()
    case 380..<600: readSomeUffd()
    case 600..<880: pluginWorks(random.below(plugins.count))
    case 880..<970: passTime(UInt64(random.below(4_000_000)))
    case 970..<980: passTime(UInt64(random.below(80_000_000)))
    case 980..<992: pluginLifecycle(random.below(plugins.count))
    case 992..<999: clientLifecycle()
    default: restartBroker(midRead: random.chance(50))
    }
  }

  func passTime(_ nanoseconds: UInt64) {
    now += nanoseconds
    note("time +\(nanoseconds / 1_000) µs")
    engine.tick(now: now)
    perform()
    streamBlock()
  }

  // MARK: - Settling

  /// With plugins reliable and back, runs until every thread has its page
  /// and every message was read; fails if that does not happen.
  private func settle() throws(Failure) {
    reliable = true
    for index in plugins.indices {
      plugins[index].hung = false
      plugins[index].down = false
    }
    for _ in 0..<2_000 {
      step += 1
      for slot in processes.indices where processes[slot].attachment == .detached && !processes[slot].exited { reattach(slot) }
      for index in plugins.indices {
        connect(index)
        pluginWorks(index)
      }
      for slot in processes.indices where processes[slot].watched && !processes[slot].exited && !processes[slot].queue.isEmpty { readUffd(slot) }
      passTime(5_000_000)
      try check()
      let busy = processes.contains { process in
        process.exited ? process.knownToBroker : process.threads.contains { $0 != .running }
      }
      if !busy && forks.isEmpty && plugins.allSatisfy({ $0.inbox.isEmpty && $0.answers.isEmpty }) { return }
    }
    let stuck = processes.flatMap { process in
      process.exited
        ? (!process.knownToBroker ? [] : ["client \(process.id) ended and was never closed by the broker"])
        : process.threads.enumerated().compactMap { thread, state in state == .running ? nil : "client \(process.id) thread \(thread): \(state)" }
    }
    throw fail("stuck after the plugins came back: \(stuck.joined(separator: "; "))")
  }

  func describe(_ range: Range<UInt>) -> String { "0x\(String(range.lowerBound, radix: 16))+\(range.count / Self.smallPageSize)p" }

  func describe(_ event: BrokerEvent) -> String {
    switch event {
    case .regionOpened(let client, _, let region, let parent, _): "RegionOpened(client \(client), region \(region.id)\(parent == 0 ? "" : ", forked from \(parent)"))"
    case .removed(let range): "Removed(client \(range.clientID), region \(range.regionID), offsets \(range.startOffset / 4096)+\(range.range.count / Self.smallPageSize)p)"
    case .unmapped(let range): "Unmapped(client \(range.clientID), region \(range.regionID), offsets \(range.startOffset / 4096)+\(range.range.count / Self.smallPageSize)p)"
    case .remapped(let remap): "Remapped(client \(remap.clientID), region \(remap.regionID))"
    case .regionClosed(let client, let region): "RegionClosed(client \(client), region \(region))"
    case .closed(let client, _): "Closed(client \(client))"
    case .pagefault(let fault): "Pagefault(client \(fault.clientID), 0x\(String(fault.address, radix: 16)))"
    case .store(let store): "Store(client \(store.clientID))"
    case .decisionRefused(let fault, let cause, _): "DecisionRefused(fault \(fault), \(cause))"
    }
  }

  func describe(_ event: KernelEvent) -> String {
    switch event {
    case .pagefault(let fault): "fault 0x\(String(fault.address, radix: 16))"
    case .remove(let range): "REMOVE \(describe(range))"
    case .unmap(let range): "UNMAP \(describe(range))"
    case .remap(let from, let to, let length): "REMAP 0x\(String(from, radix: 16))→0x\(String(to, radix: 16)) \(length / Self.smallPageSize)p"
    case .fork(let ticket, _): "FORK (ticket \(ticket.rawValue))"
    }
  }
}
