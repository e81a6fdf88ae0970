/// What this process was started as: the benchmark driver (the client), or one
/// of the child roles it spawns from its own executable.
enum Invocation {
  case help
  case bench(BenchOptions)
  case broker(BrokerRoleOptions)
  case plugin(PluginRoleOptions)
}

struct BenchOptions {
  var pages = 65_536
  var rounds = 5
  var modes: [ModeDefinition] = Modes.all
  /// Iterations of each protobuf micro-benchmark repetition (0 skips them).
  var microIterations = 200_000
}

struct BrokerRoleOptions {
  var clientSocket: String
  var pluginSocket: String
  var controlFD: CInt
}

struct PluginRoleOptions {
  var name: String
  var kind: PluginKind
  var pluginSocket: String
  var controlFD: CInt
}

struct UsageError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

enum Options {
  static let usage = """
    usage: uffd-bench [--pages N] [--rounds R] [--modes m1,m2,...] [--micro-iterations K]
      --pages N             pages of 4 KiB touched per round (default 65536)
      --rounds R            rounds; modes run round-robin within each round, medians reported (default 5)
      --modes LIST          comma-separated, from: \(Modes.all.map(\.name).joined(separator: ","))
      --micro-iterations K  protobuf encode/decode iterations per repetition (default 200000, 0 skips)
    child roles (spawned by the benchmark from its own executable; fd 3 is the control socket):
      uffd-bench --role broker --client-socket P --plugin-socket Q
      uffd-bench --role plugin --name NAME --mode bytes|copy|prefetch|delegate|zero-page|zero-copy --plugin-socket Q
    """

  static func parse(_ arguments: [String]) throws(UsageError) -> Invocation {
    var values: [String: String] = [:]
    var index = 1
    while index < arguments.count {
      let flag = arguments[index]
      if flag == "--help" || flag == "-h" { return .help }
      guard flag.hasPrefix("--") else { throw UsageError("unexpected argument \(flag)") }
      guard index + 1 < arguments.count else { throw UsageError("\(flag) needs a value") }
      values[String(flag.dropFirst(2))] = arguments[index + 1]
      index += 2
    }
    let known: Set<String> = ["pages", "rounds", "modes", "micro-iterations", "role", "client-socket", "plugin-socket", "name", "mode", "control-fd"]
    if let unknown = values.keys.sorted().first(where: { !known.contains($0) }) { throw UsageError("unknown option --\(unknown)") }
    let controlFD = CInt(values["control-fd"] ?? "3") ?? 3

    switch values["role"] {
    case nil:
      var options = BenchOptions()
      if let text = values["pages"] {
        guard let pages = Int(text), pages >= 16 else { throw UsageError("--pages must be an integer >= 16") }
        options.pages = pages
      }
      if let text = values["rounds"] {
        guard let rounds = Int(text), rounds >= 1 else { throw UsageError("--rounds must be an integer >= 1") }
        options.rounds = rounds
      }
      if let text = values["micro-iterations"] {
        guard let iterations = Int(text), iterations >= 0 else { throw UsageError("--micro-iterations must be an integer >= 0") }
        options.microIterations = iterations
      }
      if let text = values["modes"] {
        var modes: [ModeDefinition] = []
        for name in text.split(separator: ",").map(String.init) {
          guard let mode = Modes.named(name) else { throw UsageError("unknown mode \(name); known: \(Modes.all.map(\.name).joined(separator: ","))") }
          if !modes.contains(where: { $0.name == name }) { modes.append(mode) }
        }
        guard !modes.isEmpty else { throw UsageError("--modes is empty") }
        options.modes = modes
      }
      return .bench(options)
    case "broker":
      guard let client = values["client-socket"], let plugin = values["plugin-socket"] else {
        throw UsageError("--role broker needs --client-socket and --plugin-socket")
      }
      return .broker(BrokerRoleOptions(clientSocket: client, pluginSocket: plugin, controlFD: controlFD))
    case "plugin":
      guard let name = values["name"], let modeText = values["mode"], let socket = values["plugin-socket"] else {
        throw UsageError("--role plugin needs --name, --mode and --plugin-socket")
      }
      guard let kind = PluginKind(rawValue: modeText) else { throw UsageError("unknown plugin mode \(modeText)") }
      return .plugin(PluginRoleOptions(name: name, kind: kind, pluginSocket: socket, controlFD: controlFD))
    case let role?:
      throw UsageError("unknown role \(role)")
    }
  }
}
