import ArgumentParser
import BrokerCore
import BrokerRuntime
import Foundation

/// `uffd-broker check-config FILE`: whether a broker would start with a config file, without starting one.
struct CheckConfig: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "check-config",
    abstract: "Check a config file as the broker would at start, without starting it.",
    discussion: "Exit status 0 and a summary when a broker would accept it; 78 (EX_CONFIG) and the reason on stderr when not.")

  @Argument(help: "The JSON config file.")
  var file: String

  func run() throws {
    let configuration: BrokerConfiguration
    do {
      configuration = try ConfigFile.configuration(at: file)
    } catch {
      FileHandle.standardError.write(Data("uffd-broker check-config: \(file): \(ConfigFile.describe(error))\n".utf8))
      throw ExitCode(78)
    }
    let spawned = configuration.plugins.map(\.name).joined(separator: ", ")
    print("\(file): ok; plugins spawned: \(spawned.isEmpty ? "none" : spawned); policies for \(configuration.policies.count); "
      + "clients from uids \(configuration.clientUIDs.sorted()), plugins from uids \(configuration.pluginUIDs.sorted()); "
      + "metrics: \(configuration.metrics.map { [$0.listen.map { "http://\($0)/metrics" }, $0.textfile].compactMap { $0 }.joined(separator: " and ") } ?? "off")")
  }
}
