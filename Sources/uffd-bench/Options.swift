import ArgumentParser

/// What the benchmark driver runs (from `BenchCommand`'s options, checked).
struct BenchOptions {
  var pages = 65_536
  var rounds = 5
  var modes: [ModeDefinition] = Modes.all
  /// Iterations of each protobuf micro-benchmark repetition (0 skips them).
  var microIterations = 200_000

  /// The allowed values, for `--help` and the checks.
  static let pagesRange = 16...16_777_216
  static let roundsRange = 1...1000
  static let microIterationsRange = 0...100_000_000
}

/// `--modes`: mode names, comma separated, each at most once (a repeat is dropped).
struct ModeList: ExpressibleByArgument {
  var modes: [ModeDefinition]

  init?(argument: String) {
    var modes: [ModeDefinition] = []
    for name in argument.split(separator: ",").map(String.init) {
      guard let mode = Modes.named(name) else { return nil }
      if !modes.contains(where: { $0.name == name }) { modes.append(mode) }
    }
    guard !modes.isEmpty else { return nil }
    self.modes = modes
  }

  static var allValueStrings: [String] { Modes.all.map(\.name) }
  static var defaultCompletionKind: CompletionKind { .list(allValueStrings) }
}

extension PluginKind: ExpressibleByArgument {}

/// The broker child role (`--role broker`), spawned by the driver.
struct BrokerRoleOptions {
  var clientSocket: String
  var pluginSocket: String
  var controlFD: CInt
}

/// A plugin child role (`--role plugin`), spawned by the driver.
struct PluginRoleOptions {
  var name: String
  var kind: PluginKind
  var pluginSocket: String
  var controlFD: CInt
}
