import ArgumentParser

/// `uffd-bench restore`: snapshot restore, eager read against lazy restore through the snapshot plugin.
struct RestoreCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "restore",
    abstract: "Restore a snapshot file eagerly (read it all) and lazily (the snapshot plugin, per fault), and compare the time to the end of the work.",
    discussion: """
      Writes a snapshot file of --mib MiB in --directory, then in every round restores it with each strategy into fresh \
      memory while a worker thread reads --percent of its pages (100: all, in order; less: that share at random over the \
      whole range) and checks their checksum against the file; medians over --rounds rounds (the bench's own option, default 5). Needs the snapshot-plugin executable next to this one. \
      Exit status 0 when every checksum matched, 1 when one did not or a run failed, 64 for a bad option.
      """)

  @Option(help: ArgumentHelp("Snapshot size in MiB, \(RestoreOptions.mibRange.lowerBound) to \(RestoreOptions.mibRange.upperBound).", valueName: "mib"))
  var mib = RestoreOptions().mib

  @Option(help: ArgumentHelp("Share of the pages the worker reads, \(RestoreOptions.percentRange.lowerBound) to \(RestoreOptions.percentRange.upperBound).", valueName: "percent"))
  var percent = RestoreOptions().percent

  /// `--rounds` is the bench's own option (a parent's option wins over a subcommand's of the same name).
  @ParentCommand var bench: BenchCommand

  @Option(help: ArgumentHelp("Strategies besides eager (always run, the baseline), comma separated (default: all).", valueName: "s1,s2,..."))
  var strategies: RestoreStrategyList?

  @Option(help: ArgumentHelp("Where to write the snapshot file (best on a disk, not tmpfs).", valueName: "dir"))
  var directory = RestoreOptions().directory

  @Flag(help: "Keep the snapshot in the page cache (read it before every round) instead of dropping it.")
  var warmCache = false

  func validate() throws {
    for (flag, value, range) in [("--mib", mib, RestoreOptions.mibRange), ("--percent", percent, RestoreOptions.percentRange)] where !range.contains(value) {
      throw ValidationError("\(flag) is \(value); it must be from \(range.lowerBound) to \(range.upperBound)")
    }
  }

  func run() throws {
    var options = RestoreOptions(mib: mib, percent: percent, rounds: bench.rounds, directory: directory, warmCache: warmCache)
    if let strategies { options.strategies = strategies.strategies }
    let status = RestoreBench.run(options, arguments: CommandLine.arguments)
    if status != 0 { throw ExitCode(status) }
  }
}
