import ArgumentParser
import BrokerProtocol
import Glibc
import PluginSDK

/// `snapshot-plugin [NAME] [--root DIR]... [--prefetch PAGES] [--delegate] [--stream] [--record FILE] [--replay FILE] [--stats FILE]`.
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

  @Flag(help: "With --delegate or --replay: the broker also fills every page of the region in the background while the client runs.")
  var stream = false

  @Option(help: ArgumentHelp("Record the order of a restore's faults in this file when its region closes (a restore without a usable --replay record is served by this plugin, which sees every fault).", valueName: "file"))
  var record: String?

  @Option(help: ArgumentHelp("Delegate each region whose snapshot matches this working-set record, the broker streaming the recorded pages first; a stale or corrupt record is ignored (logged).", valueName: "file"))
  var replay: String?

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
      let plugin = SnapshotPlugin(prefetchPages: prefetch, delegate: delegate, stream: stream, files: files, recordPath: record, replayPath: replay)
      try PluginRunner.run(plugin, name: name,
                           maxPrefetch: prefetch * pageSize, statsPath: stats)
    } catch {
      logLine("\(error)")
      throw ExitCode.failure
    }
  }
}
