/// A snapshot of what a running broker is doing, for `uffd-broker status`,
/// scripts (as JSON on the control socket) and the tests.
public struct BrokerStatus: Codable, Sendable {
  /// Bumped when a field changes meaning or goes away (new fields do not bump it).
  public var format = 1
  /// The broker's pid.
  public var pid: Int32 = 0
  /// Seconds since the broker started.
  public var uptimeSeconds: Double = 0
  /// The fault counters since the start.
  public var faults = FaultStatistics()
  /// Faults read and not settled, by where they are.
  public var faultsInFlight = 0
  /// Parked for redelivery (a retry, EAGAIN, a plugin away).
  public var faultsParked = 0
  /// How long resolved faults took, from the broker's read to their fill.
  public var faultLatencyMicroseconds = Latency()
  /// Every refusal, connection, disconnect and failure, by kind and cause.
  public var tally = Tally()
  /// Every client, by id.
  public var clients: [ClientStatus] = []
  /// Every plugin name the broker routes to, by name.
  public var plugins: [PluginStatus] = []
  /// The broker's open descriptors and their limit (`RLIMIT_NOFILE`, soft).
  public var descriptors = 0
  /// The soft `RLIMIT_NOFILE` the broker runs with.
  public var descriptorLimit = 0
  /// Where `/metrics` is served (`HOST:PORT`, the port bound when the config said 0); nil: not served.
  public var metricsListen: String?

  /// An empty status (the broker fills it in).
  public init() {}

  /// One client: a connection that registered memory, or a forked child of one.
  public struct ClientStatus: Codable, Sendable {
    /// The broker's id of the client (in its logs and plugin events).
    public var id: UInt64 = 0
    /// 0 for a forked child (it never connected) and before Register.
    public var pid: Int32 = 0
    /// The client it forked from (0: none).
    public var parent: UInt64 = 0
    /// Where it is in its life: `awaitingHello`, `awaitingRegister`, `opening`
    /// (its plugins accepting its regions), `active` or `closed`.
    public var phase = ""
    /// The pieces of registered memory the broker follows for it (a region an mremap cut counts once per piece).
    public var regions = 0
    /// Its faults read and not settled.
    public var faultsOut = 0

    /// An empty entry.
    public init() {}
  }

  /// One plugin name the broker routes to (configured, or connected by itself).
  public struct PluginStatus: Codable, Sendable {
    /// The plugin name regions name.
    public var name = ""
    /// `connected`, `away` (no connection now), `failedOver` or `failed`.
    public var state = ""
    /// The plugin its faults went to when it failed over; nil when it has not.
    public var fallback: String?
    /// The pid of its connection (0: none).
    public var connectedPID: Int32 = 0
    /// Its connection's id (0: none).
    public var connection: UInt64 = 0
    /// Its connection's packets the broker has handled.
    public var packetsApplied: UInt64 = 0
    /// The pid of the process the broker spawned for it (0: none, or not spawned by the broker).
    public var spawnedPID: Int32 = 0
    /// Faults sent to it.
    public var faultsSent: UInt64 = 0
    /// Its decisions the broker applied.
    public var decisionsApplied: UInt64 = 0
    /// `decisionsApplied` by kind.
    public var decisionsAppliedByKind = DecisionCounts()
    /// Its decisions refused as invalid (bad range, wrong length, not its fault...).
    public var invalidDecisions: UInt64 = 0
    /// Its decisions dropped as stale (a map event overlapped while it decided).
    public var staleDecisionsDropped: UInt64 = 0
    /// Its `retry` answers.
    public var retries: UInt64 = 0
    /// Faults sent to it again after being parked.
    public var redeliveries: UInt64 = 0
    /// Swap-out bytes it acknowledged storing.
    public var swapStoredBytes: UInt64 = 0
    /// Faults it holds now (sent, not answered).
    public var faultsInFlight = 0
    /// Parked faults of regions it serves.
    public var faultsParked = 0
    /// Faults it held when a connection of it went away, taken back for redelivery.
    public var faultsRequeued: UInt64 = 0
    /// Events kept for it while it is away.
    public var missedEvents = 0
    /// This plugin's share of the broker's tally.
    public var tally = Tally()

    /// An empty entry.
    public init() {}
  }

  /// Percentiles of a latency, in microseconds (to two significant digits).
  public struct Latency: Codable, Sendable {
    /// How many were measured.
    public var count: UInt64 = 0
    /// The median.
    public var p50: UInt64 = 0
    /// The 90th percentile.
    public var p90: UInt64 = 0
    /// The 99th percentile.
    public var p99: UInt64 = 0
    /// The 99.9th percentile.
    public var p999: UInt64 = 0
    /// The longest.
    public var max: UInt64 = 0

    /// None measured.
    public init() {}
  }

  /// The entry of plugin `name`, if the broker routes to it.
  public func plugin(_ name: String) -> PluginStatus? { plugins.first { $0.name == name } }
  /// The first client entry with pid `pid` (a forked child has pid 0).
  public func client(pid: Int32) -> ClientStatus? { clients.first { $0.pid == pid } }

  /// Changes the entry of plugin `name`, adding it (state `away`) if there is none.
  package mutating func updatePlugin(_ name: String, _ change: (inout PluginStatus) -> Void) {
    if let index = plugins.firstIndex(where: { $0.name == name }) { return change(&plugins[index]) }
    var entry = PluginStatus()
    entry.name = name
    entry.state = "away"
    change(&entry)
    plugins.append(entry)
  }
}

/// The broker's fault counters since it started.
public struct FaultStatistics: Codable, Sendable {
  /// Faults sent to plugins (redeliveries included).
  public var faultsSent = 0
  /// Plugin decisions applied with an ioctl.
  public var decisionsApplied = 0
  /// Decisions dropped because a remove, unmap or remap over their range was read
  /// after the fault was sent (the fault is redelivered).
  public var staleDecisionsDropped = 0
  /// Decisions refused by validation (see `Refusal`).
  public var invalidDecisions = 0
  /// Decisions of kind `retry`.
  public var retries = 0
  /// Faults resolved by the broker itself from a delegated range.
  public var resolvedLocally = 0
  /// Faults in new memory (a grown tail, a `DONTUNMAP` source) filled with zeros.
  public var newMemoryFills = 0
  /// Minor faults of shared memory: pages already in the file's cache, mapped
  /// with no plugin asked (a clone's pages another clone's faults filled).
  public var minorFaultsResolved: UInt64 = 0
  /// Faults the broker could not place, failed closed (poison or kill).
  public var failedClosed = 0
  /// Swapped-out bytes a plugin came back without (their faults fail closed).
  public var swappedBytesLost: UInt64 = 0
  /// Faults resolved, by decisions and locally.
  public var faultsResolved: UInt64 = 0
  /// `decisionsApplied` by kind.
  public var decisionsAppliedByKind = DecisionCounts()
  /// Parked faults delivered again (routed anew after a backoff or a map event).
  public var redeliveries: UInt64 = 0
  /// Swap-out bytes plugins acknowledged storing.
  public var swapStoredBytes: UInt64 = 0
  /// Bytes dropped by clients after a swap-out stored them (their faults bring them back).
  public var swappedOutBytes: UInt64 = 0

  /// All zero.
  public init() {}
}

/// Decisions applied, by kind (fixed fields: counting allocates nothing).
public struct DecisionCounts: Codable, Sendable, Equatable {
  /// Copies (inline or from the shared area).
  public var copy: UInt64 = 0
  /// Zero fills.
  public var zero: UInt64 = 0
  /// Poisoned ranges (their accesses get SIGBUS).
  public var poison: UInt64 = 0

  /// All zero.
  public init() {}

  /// Counts one decision of `kind` (`retry` is never applied, and is not counted here).
  package mutating func count(_ kind: DecisionKind) {
    switch kind {
    case .copy: copy += 1
    case .zero: zero += 1
    case .poison: poison += 1
    case .retry: break
    }
  }
}
