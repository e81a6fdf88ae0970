import ArgumentParser
import BrokerProtocol
import Glibc
import PluginSDK

/// `zero-fill-plugin [NAME] [--delegate]`.
@main
struct ZeroFillCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "zero-fill-plugin",
    abstract: "Serve every page as zeros (the simplest plugin).",
    version: uffdBrokerVersion)

  @Argument(help: "The plugin name regions name.")
  var name = "zero-fill"

  @Flag(help: "Hand the regions to the broker, which then fills them with zeros itself.")
  var delegate = false

  func run() throws {
    do {
      try PluginRunner.run(ZeroFill(delegate: delegate), name: name)
    } catch {
      let line = "zero-fill-plugin: \(error)\n"
      _ = line.withCString { write(2, $0, strlen($0)) }
      throw ExitCode.failure
    }
  }
}
