import ArgumentParser
import BrokerCore
import BrokerProtocol
import Foundation
import Logging

/// The broker daemon: `uffd-broker [--config FILE] [--client-socket PATH] [--plugin-socket PATH]`.
@main
struct BrokerCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "uffd-broker",
    abstract: "Serve page faults of client processes through out-of-process plugins.",
    discussion: """
      Clients register memory on the client socket (passing their userfaultfd); plugins connect \
      to the plugin socket and decide how each fault is filled. The config file (JSON) may list \
      plugins to spawn and restart, and the uids allowed to connect:
        {"plugins": [{"name": "pattern", "executable": "/path/to/plugin", "arguments": [], "maxRestarts": 10}],
         "policies": {"pattern": {"fallback": "other", "onFailure": "poison", "failAfterMilliseconds": 30000}},
         "clientUIDs": [1000], "pluginUIDs": [0], "pluginDeadlineMilliseconds": 5000}
      """)

  @Option(help: "The socket clients register on.")
  var clientSocket: String = SocketPaths.client

  @Option(help: "The socket plugins connect to.")
  var pluginSocket: String = SocketPaths.plugin

  @Option(help: "A JSON config file (plugins to spawn, allowed uids, limits).")
  var config: String?

  @Option(help: "trace, debug, info, notice, warning, error or critical.")
  var logLevel: String = "info"

  func validate() throws {
    guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown log level \(logLevel)") }
    if let config, !FileManager.default.isReadableFile(atPath: config) { throw ValidationError("cannot read config file \(config)") }
  }

  func run() throws {
    let level = Logger.Level(rawValue: logLevel)!
    LoggingSystem.bootstrap { label in
      var handler = StreamLogHandler.standardError(label: label)
      handler.logLevel = level
      return handler
    }
    let logger = Logger(label: "uffd-broker")
    var configuration = BrokerConfiguration(clientSocketPath: clientSocket, pluginSocketPath: pluginSocket)
    if let config {
      do {
        try ConfigFile.load(path: config).apply(to: &configuration)
      } catch {
        throw ValidationError("config file \(config): \(error)")
      }
    }
    let broker = try Broker(configuration: configuration, logger: logger)
    try broker.run(handleSignals: true)
  }
}

/// The JSON config file; every field is optional.
struct ConfigFile: Decodable {
  struct Plugin: Decodable {
    var name: String
    var executable: String
    var arguments: [String]?
    var maxRestarts: Int?
  }
  struct Policy: Decodable {
    var fallback: String?
    var onFailure: String?
    var failAfterMilliseconds: Int?
  }
  var clientSocket: String?
  var pluginSocket: String?
  var plugins: [Plugin]?
  var policies: [String: Policy]?
  var clientUIDs: [UInt32]?
  var pluginUIDs: [UInt32]?
  var clientGIDs: [UInt32]?
  var pluginGIDs: [UInt32]?
  var pluginDeadlineMilliseconds: Int?
  var registrationTimeoutMilliseconds: Int?
  var maxClients: Int?
  var maxRegionsPerClient: Int?
  var maxInFlightPerPlugin: Int?

  static func load(path: String) throws -> ConfigFile {
    try JSONDecoder().decode(ConfigFile.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
  }

  func apply(to configuration: inout BrokerConfiguration) throws {
    if let clientSocket { configuration.clientSocketPath = clientSocket }
    if let pluginSocket { configuration.pluginSocketPath = pluginSocket }
    if let plugins {
      configuration.plugins = plugins.map { .init(name: $0.name, executable: $0.executable, arguments: $0.arguments ?? [], maxRestarts: $0.maxRestarts ?? 10) }
    }
    for (name, policy) in policies ?? [:] {
      guard let onFailure = BrokerConfiguration.PluginPolicy.OnFailure(rawValue: policy.onFailure ?? "wait") else {
        throw ValidationError("policy of \(name): onFailure must be wait, poison or kill")
      }
      configuration.policies[name] = .init(fallback: policy.fallback, onFailure: onFailure, failAfterMilliseconds: policy.failAfterMilliseconds ?? 30_000)
    }
    if let clientUIDs { configuration.clientUIDs = Set(clientUIDs) }
    if let pluginUIDs { configuration.pluginUIDs = Set(pluginUIDs) }
    if let clientGIDs { configuration.clientGIDs = Set(clientGIDs) }
    if let pluginGIDs { configuration.pluginGIDs = Set(pluginGIDs) }
    if let pluginDeadlineMilliseconds { configuration.pluginDeadlineMilliseconds = pluginDeadlineMilliseconds }
    if let registrationTimeoutMilliseconds { configuration.registrationTimeoutMilliseconds = registrationTimeoutMilliseconds }
    if let maxClients { configuration.maxClients = maxClients }
    if let maxRegionsPerClient { configuration.maxRegionsPerClient = maxRegionsPerClient }
    if let maxInFlightPerPlugin { configuration.maxInFlightPerPlugin = maxInFlightPerPlugin }
  }
}
