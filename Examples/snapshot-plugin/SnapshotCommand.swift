import ArgumentParser
import BrokerProtocol
import Glibc
import PluginSDK

/// `snapshot-plugin [NAME] [--root DIR]... [--prefetch PAGES] [--delegate] [--stats FILE]`.
@main
struct SnapshotCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "snapshot-plugin",
    abstract: "Serve regions from snapshot files: a region's argument is the file's absolute path.",
    discussion: """
      The file must lie beneath a --root directory (no symbolic links on the way) and be readable by \
      the client's uid; without --root every file is refused. Connects to UFFD_BROKER_PLUGIN_SOCKET \
      (or the socket its broker hands it when it spawns it).
      """,
    version: uffdBrokerVersion)

  @Argument(help: "The plugin name regions name.")
  var name = "snapshot"

  @Option(name: .customLong("root"), help: ArgumentHelp("A directory the snapshot files may lie beneath (repeatable).", valueName: "dir"))
  var roots: [String] = []

  @Option(help: "Pages filled per fault, an aligned block around the faulting page (1 to 32).")
  var prefetch = 1

  @Flag(help: "Hand each region to the broker, which then reads the file descriptor this plugin opened.")
  var delegate = false

  @Option(help: ArgumentHelp("Write counters to this file now and then.", valueName: "file"))
  var stats: String?

  func validate() throws {
    guard (1...32).contains(prefetch) else { throw ValidationError("--prefetch must be from 1 to 32 pages") }
  }

  func run() throws {
    do {
      let files = try ClientFiles(roots: roots)
      if roots.isEmpty { logLine("no --root given: every snapshot file will be refused") }
      let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
      try PluginRunner.run(SnapshotPlugin(prefetchPages: prefetch, delegate: delegate, files: files), name: name,
                           maxPrefetch: prefetch * pageSize, statsPath: stats)
    } catch {
      logLine("\(error)")
      throw ExitCode.failure
    }
  }
}
