import BrokerProtocol

/// Everything the broker is told at start-up (from flags and the config file).
public struct BrokerConfiguration: Sendable {
  /// A plugin the broker spawns and restarts.
  public struct SpawnedPlugin: Sendable, Equatable {
    public var name: String
    public var executable: String
    public var arguments: [String]
    /// Restarts in a row (each after less than 30 s of life) before the broker
    /// gives the plugin up; its regions then fail over or fail closed (`PluginPolicy`).
    public var maxRestarts: Int
    /// The user the plugin runs as: a name or a number. nil: when the broker
    /// runs as root, the dedicated user `uffd-plugin` if it exists, else
    /// `nobody`; otherwise the broker's own user (it cannot become another).
    /// A plugin runs as root only when this says `root`.
    public var user: String?
    /// Its group (a name or a number; nil: the user's primary group, with the
    /// user's supplementary groups).
    public var group: String?
    public init(name: String, executable: String, arguments: [String] = [], maxRestarts: Int = 10, user: String? = nil, group: String? = nil) {
      self.name = name
      self.executable = executable
      self.arguments = arguments
      self.maxRestarts = maxRestarts
      self.user = user
      self.group = group
    }
  }

  /// What happens to a plugin's regions when it is gone for good: given up by
  /// the supervisor, or away longer than `failAfter`.
  public struct PluginPolicy: Sendable, Equatable {
    public enum OnFailure: String, Sendable, Equatable {
      /// Keep the faults parked (the faulting threads wait for the plugin).
      case wait
      /// Fail closed: every fault of its regions is poisoned (the access gets SIGBUS).
      case poison
      /// Fail closed: kill the client processes that have regions on it.
      case kill
    }
    /// A plugin that takes the regions over (it is told of them with RegionOpened).
    public var fallback: String?
    public var onFailure: OnFailure
    public var failAfter: Duration
    public init(fallback: String? = nil, onFailure: OnFailure = .wait, failAfter: Duration = .seconds(30)) {
      self.fallback = fallback
      self.onFailure = onFailure
      self.failAfter = failAfter
    }
  }

  /// A socket that speaks Firecracker's page-fault handler protocol (a VMM
  /// restoring a snapshot sends its guest regions and userfaultfd there): the
  /// guest memory of every VMM that connects is served by `plugin`, with
  /// `argument` (the snapshot's memory file, say). Who may connect is decided
  /// as for clients (`clientUIDs`, `clientGIDs`).
  public struct FirecrackerSocket: Sendable, Equatable {
    public var path: String
    public var plugin: String
    public var argument: String
    public init(path: String, plugin: String, argument: String = "") {
      (self.path, self.plugin, self.argument) = (path, plugin, argument)
    }
  }

  /// Live metrics: served on `/metrics` over HTTP on a loopback address, and/or
  /// written as a node_exporter textfile. Read at start (a reload keeps the running ones).
  public struct Metrics: Sendable, Equatable {
    /// `HOST:PORT` to serve `/metrics` on (a loopback address: 127.x.y.z or [::1]; port 0: any free port); nil: not served.
    public var listen: String?
    /// A file rewritten each interval in the Prometheus text format (temp file, then rename); nil: none.
    public var textfile: String?
    /// How often the loop hands a snapshot to the exporter.
    public var interval: Duration
    public init(listen: String? = nil, textfile: String? = nil, interval: Duration = .seconds(1)) {
      self.listen = listen
      self.textfile = textfile
      self.interval = interval
    }

    /// The host and port of a loopback `listen` address, or why it is not one.
    public static func loopbackAddress(_ listen: String) throws(BrokerError) -> (host: String, port: Int) {
      let rule = "it must be HOST:PORT with a loopback HOST (127.x.y.z or [::1]) and a PORT from 0 to 65535"
      guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]), (0...65535).contains(port) else {
        throw BrokerError(.malformed, "metrics.listen \"\(listen)\" is not an address; \(rule)")
      }
      var host = String(listen[..<colon])
      if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
      let octets = host.split(separator: ".", omittingEmptySubsequences: false).map { UInt8($0) }
      let isLoopback = host == "::1" || (octets.count == 4 && octets.allSatisfy { $0 != nil } && octets[0] == 127)
      guard isLoopback else {
        throw BrokerError(.malformed, "metrics.listen \"\(listen)\" is not a loopback address (the metrics are served without authentication); \(rule)")
      }
      return (host, port)
    }
  }

  public var clientSocketPath: String
  public var pluginSocketPath: String
  public var firecrackerSockets: [FirecrackerSocket] = []
  /// Where the `ControlChannel` listens (nil: nowhere; the daemon's default is `SocketPaths.control`).
  public var controlSocketPath: String?
  public var plugins: [SpawnedPlugin] = []
  /// Per plugin name; a plugin without an entry waits forever for its return.
  public var policies: [String: PluginPolicy] = [:]
  /// uids allowed to register memory (default: the broker's own uid).
  public var clientUIDs: Set<UInt32>
  /// uids allowed to serve as plugins (default: the broker's own uid).
  public var pluginUIDs: Set<UInt32>
  /// gids whose members may also register memory / serve as plugins (default: none).
  public var clientGIDs: Set<UInt32> = []
  public var pluginGIDs: Set<UInt32> = []
  /// A plugin with faults in flight longer than this is considered hung and disconnected.
  public var pluginDeadline: Duration = .seconds(5)
  /// How long a Register may wait for its plugins' replies.
  public var registrationTimeout: Duration = .seconds(10)
  /// How long a new connection may take to say Hello (and a client to Register).
  public var helloTimeout: Duration = .seconds(5)
  public var maxClients = 1024
  /// Clients one uid may have at once, its forked children counted.
  public var maxClientsPerUID = 256
  /// Plugin connections at once, welcomed or not.
  public var maxPluginConnections = 64
  /// Plugin names the broker keeps state for (each Hello with a new name adds one).
  public var maxPluginNames = 256
  public var maxRegionsPerClient = 256
  public var maxInFlightPerPlugin = 65_536
  /// Invalid decisions a plugin may send before it is disconnected.
  public var maxInvalidDecisions = 16
  /// nil: no metrics (the loop does nothing for them).
  public var metrics: Metrics?

  /// Clients and plugins are allowed by default to `owner` alone (the broker's uid).
  public init(clientSocketPath: String, pluginSocketPath: String, owner: UInt32) {
    self.clientSocketPath = clientSocketPath
    self.pluginSocketPath = pluginSocketPath
    clientUIDs = [owner]
    pluginUIDs = [owner]
  }

  /// Checks every value against its rule; the error names the field, the value
  /// and the rule (a negative deadline once trapped the running broker). The
  /// runtime checks the plugins' executables besides.
  public func validate() throws(BrokerError) {
    let day = 86_400_000
    let ranges: [(String, Int, ClosedRange<Int>)] = [
      ("pluginDeadlineMilliseconds", pluginDeadline.wholeMilliseconds, 1...day),
      ("registrationTimeoutMilliseconds", registrationTimeout.wholeMilliseconds, 1...day),
      ("helloTimeoutMilliseconds", helloTimeout.wholeMilliseconds, 1...day),
      ("maxClients", maxClients, 1...1 << 20),
      ("maxClientsPerUID", maxClientsPerUID, 1...1 << 20),
      ("maxPluginConnections", maxPluginConnections, 1...1 << 16),
      ("maxPluginNames", maxPluginNames, 1...1 << 16),
      ("maxRegionsPerClient", maxRegionsPerClient, 1...1 << 16),
      ("maxInFlightPerPlugin", maxInFlightPerPlugin, 1...1 << 24),
    ] + plugins.enumerated().map { ("plugins[\($0.offset)].maxRestarts", $0.element.maxRestarts, 0...1_000_000) }
      + policies.sorted { $0.key < $1.key }.map { ("policies.\($0.key).failAfterMilliseconds", $0.value.failAfter.wholeMilliseconds, 0...day) }
      + (metrics.map { [("metrics.intervalMilliseconds", $0.interval.wholeMilliseconds, 100...day)] } ?? [])
    for (field, value, range) in ranges where !range.contains(value) {
      throw BrokerError(.malformed, "\(field) is \(value); it must be from \(range.lowerBound) to \(range.upperBound)")
    }
    var names = Set<String>()
    for (index, plugin) in plugins.enumerated() {
      guard !plugin.name.isEmpty, names.insert(plugin.name).inserted else {
        throw BrokerError(.malformed, "plugins[\(index)].name \"\(plugin.name)\" is empty or used twice")
      }
      for (field, value) in [("user", plugin.user), ("group", plugin.group)] where value?.isEmpty == true {
        throw BrokerError(.malformed, "plugins[\(index)].\(field) is empty; leave it out for the default")
      }
    }
    var paths: Set<String> = [clientSocketPath, pluginSocketPath, controlSocketPath ?? ""]
    for (index, socket) in firecrackerSockets.enumerated() {
      guard socket.path.hasPrefix("/"), paths.insert(socket.path).inserted else {
        throw BrokerError(.malformed, "firecrackerSockets[\(index)].path \"\(socket.path)\" must be an absolute path no other socket uses")
      }
      guard !socket.plugin.isEmpty, socket.plugin.utf8.count <= RegionSpec.maxPluginNameBytes, socket.argument.utf8.count <= RegionSpec.maxArgumentBytes else {
        throw BrokerError(.malformed, "firecrackerSockets[\(index)]: plugin must be 1 to \(RegionSpec.maxPluginNameBytes) bytes, argument at most \(RegionSpec.maxArgumentBytes)")
      }
    }
    if let metrics {
      if let listen = metrics.listen { _ = try Metrics.loopbackAddress(listen) }
      if metrics.textfile?.isEmpty == true { throw BrokerError(.malformed, "metrics.textfile is empty; leave it out for none") }
      if metrics.listen == nil && metrics.textfile == nil { throw BrokerError(.malformed, "metrics names neither listen nor textfile; leave it out for no metrics") }
    }
    for (name, policy) in policies.sorted(by: { $0.key < $1.key }) where policy.fallback == name {
      throw BrokerError(.malformed, "policies.\(name).fallback names the plugin itself")
    }
  }
}

extension Duration {
  /// Whole milliseconds, saturated at the ends of `Int` (the config file's unit).
  public var wholeMilliseconds: Int {
    let (seconds, attoseconds) = components
    let (milliseconds, overflow) = seconds.multipliedReportingOverflow(by: 1000)
    if overflow { return seconds < 0 ? .min : .max }
    return Int(milliseconds + attoseconds / 1_000_000_000_000_000)
  }

  /// Nanoseconds of a duration `validate()` accepted (positive, at most a day): the engine's clock unit.
  package var nanoseconds: UInt64 {
    UInt64(components.seconds) * 1_000_000_000 + UInt64(components.attoseconds / 1_000_000_000)
  }
}
