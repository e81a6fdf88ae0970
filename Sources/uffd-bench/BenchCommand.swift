import ArgumentParser
import BrokerProtocol

/// `uffd-bench`: the benchmark driver, and the broker and plugin roles it
/// spawns from its own executable (`--role`, hidden from `--help`; see
/// `BenchProcesses`).
@main
struct BenchCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "uffd-bench",
    abstract: "Measure brokered page faults against the in-process handler, and verify every page.",
    discussion: """
      Every mode runs once per round, round-robin on fresh memory, on the same machine in the same run; \
      the summary gives medians over the rounds and ratios to the inprocess baseline. A run starts by saying what each \
      of its modes measures.
      Exit status 0 when every page read back right, 1 when a page was wrong or a run failed, 64 for a bad option.
      """,
    version: uffdBrokerVersion,
    subcommands: [RestoreCommand.self])

  @Option(help: ArgumentHelp("Pages of 4 KiB touched per round, \(BenchOptions.pagesRange.lowerBound) to \(BenchOptions.pagesRange.upperBound).", valueName: "n"))
  var pages = BenchOptions().pages

  @Option(help: ArgumentHelp("Rounds, \(BenchOptions.roundsRange.lowerBound) to \(BenchOptions.roundsRange.upperBound); the modes run round-robin within each, medians are reported.", valueName: "r"))
  var rounds = BenchOptions().rounds

  @Option(help: ArgumentHelp("Modes to run, comma separated (default: all of them).", valueName: "m1,m2,..."))
  var modes: ModeList?

  @Option(help: ArgumentHelp("Protobuf encode/decode iterations per micro-benchmark repetition, \(BenchOptions.microIterationsRange.lowerBound) (skips them) to \(BenchOptions.microIterationsRange.upperBound).", valueName: "k"))
  var microIterations = BenchOptions().microIterations

  // The child roles: the driver starts `uffd-bench --role broker --client-socket P --plugin-socket Q`
  // and `uffd-bench --role plugin --name NAME --mode KIND --plugin-socket Q`, fd 3 their control socket.
  @Option(help: .hidden) var role: Role?
  @Option(help: .hidden) var clientSocket: String?
  @Option(help: .hidden) var pluginSocket: String?
  @Option(help: .hidden) var name: String?
  @Option(help: .hidden) var mode: PluginKind?
  @Option(help: .hidden) var controlFD: CInt = 3

  enum Role: String, ExpressibleByArgument {
    case broker, plugin
  }

  func validate() throws {
    for (flag, value, range) in [("--pages", pages, BenchOptions.pagesRange), ("--rounds", rounds, BenchOptions.roundsRange),
                                 ("--micro-iterations", microIterations, BenchOptions.microIterationsRange)] where !range.contains(value) {
      throw ValidationError("\(flag) is \(value); it must be from \(range.lowerBound) to \(range.upperBound)")
    }
    switch role {
    case nil:
      let least = { (mode: ModeDefinition) in mode.workload.clients * mode.workload.regionsPerClient * mode.workload.threadsPerClient }
      if let mode = (modes?.modes ?? Modes.all).first(where: { least($0) > pages }) {
        throw ValidationError("mode \(mode.name) needs --pages of at least \(least(mode))")
      }
    case .broker:
      guard clientSocket != nil, pluginSocket != nil else { throw ValidationError("--role broker needs --client-socket and --plugin-socket") }
    case .plugin:
      guard name != nil, mode != nil, pluginSocket != nil else { throw ValidationError("--role plugin needs --name, --mode and --plugin-socket") }
    }
  }

  func run() throws {
    let status: Int32
    switch role {
    case nil:
      var options = BenchOptions(pages: pages, rounds: rounds, microIterations: microIterations)
      if let modes { options.modes = modes.modes }
      status = Bench.run(options, arguments: CommandLine.arguments)
    case .broker:
      status = BrokerRole.run(BrokerRoleOptions(clientSocket: clientSocket!, pluginSocket: pluginSocket!, controlFD: controlFD))
    case .plugin:
      status = PluginRole.run(PluginRoleOptions(name: name!, kind: mode!, pluginSocket: pluginSocket!, controlFD: controlFD))
    }
    if status != 0 { throw ExitCode(status) }
  }
}
