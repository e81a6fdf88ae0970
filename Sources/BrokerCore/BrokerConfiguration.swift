import BrokerProtocol
import Glibc

/// Everything the broker is told at start-up (from flags and the config file).
public struct BrokerConfiguration: Sendable {
  /// A plugin the broker spawns and restarts.
  public struct SpawnedPlugin: Sendable, Equatable {
    public var name: String
    public var executable: String
    public var arguments: [String]
    public init(name: String, executable: String, arguments: [String] = []) {
      self.name = name
      self.executable = executable
      self.arguments = arguments
    }
  }

  public var clientSocketPath: String
  public var pluginSocketPath: String
  public var plugins: [SpawnedPlugin] = []
  /// uids allowed to register memory (default: the broker's own uid).
  public var clientUIDs: Set<UInt32>
  /// uids allowed to serve as plugins (default: the broker's own uid).
  public var pluginUIDs: Set<UInt32>
  /// A plugin with faults in flight longer than this is considered hung and disconnected.
  public var pluginDeadlineMilliseconds = 5_000
  /// How long a Register may wait for its plugins' replies.
  public var registrationTimeoutMilliseconds = 10_000
  public var maxClients = 1024
  public var maxRegionsPerClient = 256
  public var maxInFlightPerPlugin = 65_536
  /// Invalid decisions a plugin may send before it is disconnected.
  public var maxInvalidDecisions = 16

  public init(clientSocketPath: String, pluginSocketPath: String) {
    self.clientSocketPath = clientSocketPath
    self.pluginSocketPath = pluginSocketPath
    clientUIDs = [getuid()]
    pluginUIDs = [getuid()]
  }
}
