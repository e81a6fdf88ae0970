import ArgumentParser

/// How `uffd-bench restore` brings a snapshot back into fresh memory.
struct RestoreStrategy: Sendable, Equatable {
  enum Kind: Sendable, Equatable {
    /// `pread` the whole file into the mapping, then let the worker run.
    case eager
    /// Register the mapping with the broker; the snapshot plugin serves each
    /// fault from the file (`prefetch` pages per fault; `delegated`: the
    /// plugin hands the file to the broker, which serves the faults itself;
    /// `stream`: the broker also fills the whole file in the background;
    /// `replay`: a warm-up restore, not timed, records the faults' order, which
    /// later restores stream first).
    case lazy(prefetch: Int, delegated: Bool, stream: Bool = false, replay: Bool = false)
  }

  var name: String
  var summary: String
  var kind: Kind

  /// The snapshot plugin's name for this strategy (nil: eager needs none).
  var pluginName: String? { name == Self.eager.name ? nil : "restore-" + name }

  /// The baseline of every ratio.
  static let eager = RestoreStrategy(name: "eager", summary: "pread the whole file into the mapping, then touch", kind: .eager)

  /// 32 pages is the most either lazy path fills per fault: the plugin's
  /// `--prefetch` and the SDK's `maxPrefetch` (half a 256 KiB packet), and the
  /// broker's local fill (`BrokerEngine.maxLocalFillPages`).
  static let all: [RestoreStrategy] = [
    eager,
    RestoreStrategy(name: "lazy-1", summary: "snapshot plugin, one page per fault", kind: .lazy(prefetch: 1, delegated: false)),
    RestoreStrategy(name: "lazy-16", summary: "snapshot plugin --prefetch 16 (64 KiB per fault)", kind: .lazy(prefetch: 16, delegated: false)),
    RestoreStrategy(name: "lazy-32", summary: "snapshot plugin --prefetch 32 (128 KiB per fault, the most it allows)", kind: .lazy(prefetch: 32, delegated: false)),
    RestoreStrategy(name: "local-1", summary: "snapshot plugin --delegate: the broker preads one page per fault", kind: .lazy(prefetch: 1, delegated: true)),
    RestoreStrategy(name: "local-16", summary: "--delegate --prefetch 16: the broker fills 64 KiB per fault", kind: .lazy(prefetch: 16, delegated: true)),
    RestoreStrategy(name: "local-32", summary: "--delegate --prefetch 32: the broker fills 128 KiB per fault (its most)", kind: .lazy(prefetch: 32, delegated: true)),
    RestoreStrategy(name: "stream-32", summary: "local-32 --stream: the broker also fills the whole file in the background", kind: .lazy(prefetch: 32, delegated: true, stream: true)),
    RestoreStrategy(name: "replay-1", summary: "--replay: the broker streams the pages a warm-up restore faulted, in its order, one page each",
                    kind: .lazy(prefetch: 1, delegated: true, replay: true)),
    RestoreStrategy(name: "replay-32", summary: "--replay --prefetch 32: the same by the 32-page blocks around them",
                    kind: .lazy(prefetch: 32, delegated: true, replay: true)),
  ]

  static func named(_ name: String) -> RestoreStrategy? { all.first { $0.name == name } }
}

/// `--strategies`: names, comma separated, each at most once; eager is always run first (the baseline).
struct RestoreStrategyList: ExpressibleByArgument {
  var strategies: [RestoreStrategy]

  init?(argument: String) {
    var strategies = [RestoreStrategy.eager]
    for name in argument.split(separator: ",").map(String.init) {
      guard let strategy = RestoreStrategy.named(name) else { return nil }
      if !strategies.contains(strategy) { strategies.append(strategy) }
    }
    self.strategies = strategies
  }

  static var allValueStrings: [String] { RestoreStrategy.all.map(\.name) }
  static var defaultCompletionKind: CompletionKind { .list(allValueStrings) }
}
