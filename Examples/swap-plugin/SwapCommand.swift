import ArgumentParser
import BrokerProtocol
import Glibc
import PluginSDK

/// `swap-plugin [NAME] [--stats FILE] [--corrupt-offset N] [--state-dir DIR]`.
@main
struct SwapCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "swap-plugin",
    abstract: "Keep swapped-out pages compressed, and serve them back.",
    discussion: """
      Without --state-dir the compressed pages live in memfds the broker keeps for this plugin name \
      (they survive the plugin); with it, in files there (they also survive the broker).
      """,
    version: uffdBrokerVersion)

  @Argument(help: "The plugin name regions name.")
  var name = "swap"

  @Option(help: ArgumentHelp("Write counters to this file now and then.", valueName: "file"))
  var stats: String?

  @Option(help: ArgumentHelp("Corrupt the stored block at this region offset (for tests: its pages must fail closed).", valueName: "offset"))
  var corruptOffset: UInt64?

  @Option(help: ArgumentHelp("Keep the compressed pages in files in this directory (made if missing, 0700).", valueName: "dir"))
  var stateDir: String?

  func run() throws {
    do {
      if let stateDir { mkdir(stateDir, 0o700) }
      try PluginRunner.run(SwapPlugin(corruptOffset: corruptOffset, stateDirectory: stateDir), name: name, statsPath: stats)
    } catch {
      let line = "swap-plugin: \(error)\n"
      _ = line.withCString { write(2, $0, strlen($0)) }
      throw ExitCode.failure
    }
  }
}
