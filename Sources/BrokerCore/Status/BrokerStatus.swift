/// A snapshot of what a running broker is doing, for `uffd-broker status`,
/// scripts (as JSON on the control socket) and the tests.
public struct BrokerStatus: Codable, Sendable {
  /// Bumped when a field changes meaning or goes away (new fields do not bump it).
  public var format = 1
  public var pid: Int32 = 0
  public var uptimeSeconds: Double = 0
  public var faults: BrokerEngine.Statistics
  /// Faults read and not settled, by where they are.
  public var faultsInFlight = 0
  public var faultsParked = 0
  /// Every refusal, connection, disconnect and failure, by kind and cause.
  public var tally: Tally
  public var clients: [ClientStatus]
  public var plugins: [PluginStatus]

  public struct ClientStatus: Codable, Sendable {
    public var id: UInt64
    /// 0 for a forked child (it never connected) and before Register.
    public var pid: Int32
    /// The client it forked from (0: none).
    public var parent: UInt64
    public var phase: String
    public var regions: Int
    public var faultsOut: Int
  }

  public struct PluginStatus: Codable, Sendable {
    public var name: String
    /// `connected`, `away` (no connection now), `failedOver` or `failed`.
    public var state: String
    public var fallback: String?
    /// The pid of its connection (0: none).
    public var connectedPID: Int32
    /// The pid of the process the broker spawned for it (0: none, or not spawned by the broker).
    public var spawnedPID: Int32 = 0
    public var faultsSent: UInt64
    public var decisionsApplied: UInt64
    public var faultsInFlight: Int
    /// Events kept for it while it is away.
    public var missedEvents: Int
    /// This plugin's share of the broker's tally.
    public var tally: Tally
  }

  public func plugin(_ name: String) -> PluginStatus? { plugins.first { $0.name == name } }
  public func client(pid: Int32) -> ClientStatus? { clients.first { $0.pid == pid } }
}
