import ArgumentParser
import BrokerCore
import BrokerMetrics
import BrokerRuntime
import BrokerProtocol
import Foundation
import Logging

/// The broker daemon: `uffd-broker [serve] [--config FILE] [--client-socket PATH] ...`,
/// and `uffd-broker status` (or `stats`) to ask a running one what it is doing.
@main
struct BrokerCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "uffd-broker",
    abstract: "Serve page faults of client processes through out-of-process plugins.",
    version: uffdBrokerVersion,
    subcommands: [Serve.self, Status.self, CheckConfig.self, VMSocket.self],
    defaultSubcommand: Serve.self)
}

struct Serve: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Serve page faults (the default command).",
    discussion: """
      Clients register memory on the client socket (passing their userfaultfd); plugins connect \
      to the plugin socket and decide how each fault is filled; its owner and root ask for its \
      status on the control socket. The config file (JSON) may list plugins to spawn and restart, \
      and the uids allowed to connect:
        {"plugins": [{"name": "pattern", "executable": "/path/to/plugin", "arguments": [], "maxRestarts": 10, "user": "nobody"}],
         "policies": {"pattern": {"fallback": "other", "onFailure": "poison", "failAfterMilliseconds": 30000}},
         "clientUIDs": [1000], "pluginUIDs": [0], "pluginDeadlineMilliseconds": 5000,
         "metrics": {"listen": "127.0.0.1:9464", "textfile": "/var/lib/node_exporter/uffd-broker.prom", "intervalMilliseconds": 1000}}
      """)

  @Option(help: "The socket clients register on (default: the config's clientSocket, else client.sock in \(SocketPaths.defaultsDescription)).")
  var clientSocket: String?

  @Option(help: "The socket plugins connect to (default: the config's pluginSocket, else plugin.sock in \(SocketPaths.defaultsDescription)).")
  var pluginSocket: String?

  @Option(help: "The socket `uffd-broker status` asks (default: the config's controlSocket, else control.sock beside a client socket given, else in \(SocketPaths.defaultsDescription)).")
  var controlSocket: String?

  @Option(help: "A JSON config file (plugins to spawn, allowed uids, limits).")
  var config: String?

  @Option(help: "trace, debug, info, notice, warning, error or critical.")
  var logLevel: String = "info"

  @Option(help: "text (for people), logfmt or json (for collectors); under systemd's journal lines carry their priority instead of a timestamp.")
  var logFormat: BrokerLogHandler.Format = .text

  func validate() throws {
    guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown log level \(logLevel)") }
    if let config, !FileManager.default.isReadableFile(atPath: config) { throw ValidationError("cannot read config file \(config)") }
  }

  func run() throws {
    let level = Logger.Level(rawValue: logLevel)!
    let format = logFormat
    LoggingSystem.bootstrap { label in
      var handler = BrokerLogHandler(format: format, label: label)
      handler.logLevel = level
      return handler
    }
    let logger = Logger(label: "uffd-broker")
    var configuration: BrokerConfiguration
    do {
      configuration = try ConfigFile.configuration(at: config)
    } catch {
      // A bad config is no usage error: the reason alone, and EX_CONFIG.
      throw Self.exit(78, "config file \(config ?? "(none)"): \(ConfigFile.describe(error))")
    }
    // The command line wins over the config file.
    if let clientSocket { configuration.clientSocketPath = clientSocket }
    if let pluginSocket { configuration.pluginSocketPath = pluginSocket }
    if let controlSocket { configuration.controlSocketPath = controlSocket }
    // A broker given its own client socket keeps its control socket beside it
    // (two brokers on different sockets must not meet at the default one).
    if configuration.controlSocketPath?.isEmpty ?? true, !configuration.clientSocketPath.isEmpty {
      configuration.controlSocketPath = URL(fileURLWithPath: configuration.clientSocketPath).deletingLastPathComponent().appendingPathComponent("control.sock").path
    }
    do throws(BrokerError) {
      if configuration.clientSocketPath.isEmpty { configuration.clientSocketPath = try SocketPaths.client }
      if configuration.pluginSocketPath.isEmpty { configuration.pluginSocketPath = try SocketPaths.plugin }
      if configuration.controlSocketPath?.isEmpty ?? true { configuration.controlSocketPath = try SocketPaths.control }
    } catch {
      // No default outside /tmp (non-root without XDG_RUNTIME_DIR): EX_CONFIG too.
      throw Self.exit(78, error.message)
    }
    let broker: BrokerRuntime
    // Metrics: off unless configured; read at start only (a reload keeps these).
    let exporter = configuration.metrics.map { MetricsExporter($0, logger: logger) }
    do {
      // SIGHUP reads the file again (its sockets stay those the broker has).
      let path = config
      broker = try BrokerRuntime(configuration: configuration, logger: logger, handleSignals: true,
                                 reload: path.map { path in { try ConfigFile.reloadedConfiguration(at: path) } }, publisher: exporter)
      // After the runtime blocked the signals it reads from its signalfd: the
      // exporter's threads inherit the mask (a thread that did not would take
      // SIGTERM's default action, and the broker would die without cleaning up).
      try exporter?.start()
    } catch {
      exporter?.stop()
      // It could not take its sockets (unsafe directory, a file in the way, a
      // broker already serving, the metrics port taken): the reason alone, and EX_CANTCREAT.
      throw Self.exit(73, "\(error)")
    }
    defer { exporter?.stop() }
    try broker.run()
  }

  /// Says why on one line of stderr, and exits with `status` (no usage text).
  private static func exit(_ status: Int32, _ reason: String) -> ExitCode {
    FileHandle.standardError.write(Data("uffd-broker: \(reason)\n".utf8))
    return ExitCode(status)
  }
}

/// The JSON config file; every field is optional, and a field it does not
/// know is an error (a misspelt `clientUIDs` must not silently fall back to
/// the defaults).
struct ConfigFile: Decodable {
  struct Plugin: Decodable {
    var name: String
    var executable: String
    var arguments: [String]?
    var maxRestarts: Int?
    var user: String?
    var group: String?
    enum CodingKeys: String, CodingKey, CaseIterable { case name, executable, arguments, maxRestarts, user, group }
  }
  struct Metrics: Decodable {
    var listen: String?
    var textfile: String?
    var intervalMilliseconds: Int?
    enum CodingKeys: String, CodingKey, CaseIterable { case listen, textfile, intervalMilliseconds }
  }
  struct Policy: Decodable {
    var fallback: String?
    var onFailure: String?
    var failAfterMilliseconds: Int?
    enum CodingKeys: String, CodingKey, CaseIterable { case fallback, onFailure, failAfterMilliseconds }
  }
  struct FirecrackerSocket: Decodable {
    var path: String
    var plugin: String
    var argument: String?
    enum CodingKeys: String, CodingKey, CaseIterable { case path, plugin, argument }
  }
  var clientSocket: String?
  var pluginSocket: String?
  var controlSocket: String?
  var firecrackerSockets: [FirecrackerSocket]?
  var plugins: [Plugin]?
  var policies: [String: Policy]?
  var clientUIDs: [UInt32]?
  var pluginUIDs: [UInt32]?
  var clientGIDs: [UInt32]?
  var pluginGIDs: [UInt32]?
  var pluginDeadlineMilliseconds: Int?
  var registrationTimeoutMilliseconds: Int?
  var helloTimeoutMilliseconds: Int?
  var maxClients: Int?
  var maxClientsPerUID: Int?
  var maxPluginConnections: Int?
  var maxPluginNames: Int?
  var maxRegionsPerClient: Int?
  var maxInFlightPerPlugin: Int?
  var metrics: Metrics?
  enum CodingKeys: String, CodingKey, CaseIterable {
    case clientSocket, pluginSocket, controlSocket, firecrackerSockets, plugins, policies, clientUIDs, pluginUIDs, clientGIDs, pluginGIDs
    case pluginDeadlineMilliseconds, registrationTimeoutMilliseconds, helloTimeoutMilliseconds
    case maxClients, maxClientsPerUID, maxPluginConnections, maxPluginNames, maxRegionsPerClient, maxInFlightPerPlugin, metrics
  }

  /// An error of loading a config, for a person: JSON errors say where, type errors which field.
  static func describe(_ error: any Error) -> String {
    switch error {
    case let error as BrokerError: return error.message
    case DecodingError.typeMismatch(let type, let context), DecodingError.valueNotFound(let type, let context):
      return "\(path(context.codingPath)) must be \(type == Int.self || type == UInt32.self ? "a whole number" : "\(type)")"
    case DecodingError.keyNotFound(let key, let context):
      return "\(path(context.codingPath + [key])) is missing"
    case DecodingError.dataCorrupted(let context):
      let underlying = (context.underlyingError as NSError?)?.userInfo[NSDebugDescriptionErrorKey] as? String
      return "not valid JSON\(context.codingPath.isEmpty ? "" : " at \(path(context.codingPath))"): \(underlying ?? context.debugDescription)"
    case let error as NSError where error.domain == NSCocoaErrorDomain:
      // Reading the file (its JSON syntax errors are `BrokerError`s that say where).
      return "cannot read it: \(error.userInfo[NSDebugDescriptionErrorKey] as? String ?? error.localizedDescription)"
    default: return "\(error)"
    }
  }

  private static func path(_ keys: [any CodingKey]) -> String {
    keys.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined().drop { $0 == "." }.description
  }

  /// The configuration a broker would run with, from the file at `path` (nil: none),
  /// checked (values, plugin names, executables). Empty socket paths stand for
  /// "not given": the defaults are resolved only for what neither the config
  /// nor the command line names.
  static func configuration(at path: String?) throws -> BrokerConfiguration {
    var configuration = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "")
    if let path { try load(path: path).apply(to: &configuration) }
    try configuration.validate()
    try configuration.checkExecutables()
    try configuration.checkPluginUsers()
    return configuration
  }

  static func load(path: String) throws -> ConfigFile {
    let data = try Data(contentsOf: URL(fileURLWithPath: path))
    try rejectUnknownFields(in: try parse(data))
    return try JSONDecoder().decode(ConfigFile.self, from: data)
  }

  /// The JSON of a config file; a syntax error says where, by line and column
  /// (Foundation's parser names only a byte offset, the decoder nothing).
  private static func parse(_ data: Data) throws -> Any {
    do {
      return try JSONSerialization.jsonObject(with: data)
    } catch let error as NSError where error.domain == NSCocoaErrorDomain {
      let message = error.userInfo[NSDebugDescriptionErrorKey] as? String ?? error.localizedDescription
      let (offset, reason) = JSONTextPosition.syntaxError(message, textLength: data.count)
      guard let offset else { throw BrokerError(.malformed, "not valid JSON: \(reason)") }
      let position = JSONTextPosition(byteOffset: offset, in: [UInt8](data))
      throw BrokerError(.malformed, "not valid JSON at \(position)\(offset >= data.count ? " (the end of the file)" : ""): \(reason)")
    }
  }

  /// The configuration of a SIGHUP: as `configuration(at:)`, its errors said as at start.
  static func reloadedConfiguration(at path: String) throws(BrokerError) -> BrokerConfiguration {
    do {
      return try configuration(at: path)
    } catch let error as BrokerError {
      throw error
    } catch let error as DecodingError {
      throw BrokerError(.malformed, describe(error))
    } catch {
      throw BrokerError(.io, describe(error))
    }
  }

  /// Throws naming every field (top level, in `plugins`, in `policies`) that no `CodingKeys` lists.
  private static func rejectUnknownFields(in json: Any) throws {
    guard let top = json as? [String: Any] else { return }  // the decoder says why
    var unknown = unknownKeys(of: top, known: CodingKeys.self, at: "")
    for (index, plugin) in (top["plugins"] as? [Any] ?? []).enumerated() {
      unknown += unknownKeys(of: plugin, known: Plugin.CodingKeys.self, at: "plugins[\(index)].")
    }
    for (index, socket) in (top["firecrackerSockets"] as? [Any] ?? []).enumerated() {
      unknown += unknownKeys(of: socket, known: FirecrackerSocket.CodingKeys.self, at: "firecrackerSockets[\(index)].")
    }
    if let metrics = top["metrics"] { unknown += unknownKeys(of: metrics, known: Metrics.CodingKeys.self, at: "metrics.") }
    for (name, policy) in top["policies"] as? [String: Any] ?? [:] {
      unknown += unknownKeys(of: policy, known: Policy.CodingKeys.self, at: "policies.\(name).")
    }
    guard unknown.isEmpty else { throw BrokerError(.malformed, "unknown field\(unknown.count == 1 ? "" : "s") \(unknown.sorted().joined(separator: ", "))") }
  }

  private static func unknownKeys<Keys: CodingKey & CaseIterable>(of object: Any, known: Keys.Type, at path: String) -> [String] {
    guard let object = object as? [String: Any] else { return [] }
    let names = Set(Keys.allCases.map(\.stringValue))
    return object.keys.filter { !names.contains($0) }.map { path + $0 }
  }

  func apply(to configuration: inout BrokerConfiguration) throws {
    if let clientSocket { configuration.clientSocketPath = clientSocket }
    if let pluginSocket { configuration.pluginSocketPath = pluginSocket }
    if let controlSocket { configuration.controlSocketPath = controlSocket }
    if let firecrackerSockets {
      configuration.firecrackerSockets = firecrackerSockets.map { .init(path: $0.path, plugin: $0.plugin, argument: $0.argument ?? "") }
    }
    if let plugins {
      configuration.plugins = plugins.map { .init(name: $0.name, executable: $0.executable, arguments: $0.arguments ?? [], maxRestarts: $0.maxRestarts ?? 10, user: $0.user, group: $0.group) }
    }
    for (name, policy) in policies ?? [:] {
      guard let onFailure = BrokerConfiguration.PluginPolicy.OnFailure(rawValue: policy.onFailure ?? "wait") else {
        throw BrokerError(.malformed, "policies.\(name).onFailure must be wait, poison or kill")
      }
      configuration.policies[name] = .init(fallback: policy.fallback, onFailure: onFailure, failAfter: .milliseconds(policy.failAfterMilliseconds ?? 30_000))
    }
    if let clientUIDs { configuration.clientUIDs = Set(clientUIDs) }
    if let pluginUIDs { configuration.pluginUIDs = Set(pluginUIDs) }
    if let clientGIDs { configuration.clientGIDs = Set(clientGIDs) }
    if let pluginGIDs { configuration.pluginGIDs = Set(pluginGIDs) }
    if let pluginDeadlineMilliseconds { configuration.pluginDeadline = .milliseconds(pluginDeadlineMilliseconds) }
    if let registrationTimeoutMilliseconds { configuration.registrationTimeout = .milliseconds(registrationTimeoutMilliseconds) }
    if let helloTimeoutMilliseconds { configuration.helloTimeout = .milliseconds(helloTimeoutMilliseconds) }
    if let maxClients { configuration.maxClients = maxClients }
    if let maxClientsPerUID { configuration.maxClientsPerUID = maxClientsPerUID }
    if let maxPluginConnections { configuration.maxPluginConnections = maxPluginConnections }
    if let maxPluginNames { configuration.maxPluginNames = maxPluginNames }
    if let maxRegionsPerClient { configuration.maxRegionsPerClient = maxRegionsPerClient }
    if let maxInFlightPerPlugin { configuration.maxInFlightPerPlugin = maxInFlightPerPlugin }
    if let metrics {
      configuration.metrics = .init(listen: metrics.listen, textfile: metrics.textfile, interval: .milliseconds(metrics.intervalMilliseconds ?? 1000))
    }
  }
}
