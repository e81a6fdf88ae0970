/// How the bytes of a plugin's answer are produced (the `--mode` of a plugin role).
enum PluginKind: String, Sendable {
  /// One page per fault: `.copy` with the page's pattern, the bytes inside the decision.
  case bytes
  /// One page per fault: `.copy`, the bytes in the shared-memory area (the SDK's default).
  case copy
  /// The aligned 64 KiB block around the fault (clamped to the region): `.copyRange`.
  case prefetch
  /// No faults at all: each region is delegated to the broker, backed by a memfd of the pattern.
  case delegate
  /// Zero-fill answering UFFDIO_ZEROPAGE even for a write fault (which then takes a copy-on-write fault).
  case zeroPage = "zero-page"
  /// Zero-fill answering a write fault with a copied page of zeros (the zero-fill plugin's choice).
  case zeroCopy = "zero-copy"
}

/// A plugin process the benchmark starts (once per run) and routes regions to.
struct PluginInstance: Hashable, Sendable {
  var name: String
  var kind: PluginKind
}

/// Who resolves the faults of a round.
enum Backend: Sendable {
  /// No userfaultfd: the kernel's own first-touch fault.
  case plain
  /// A `UserfaultFDDispatcher` thread in this process (the seed's design).
  case inProcess
  /// The broker child process and its plugin processes.
  case broker
}

enum AccessOrder: Sendable {
  case sequential
  /// A fixed random permutation of each thread's pages (same in every round).
  case random
}

/// Everything that differs between modes; the round runner does the rest.
struct Workload: Sendable {
  var backend: Backend
  var order: AccessOrder = .sequential
  /// BrokerClient instances (each with its own userfaultfd); 1 for the non-broker backends.
  var clients = 1
  /// Regions per client; region i goes to plugin i % plugins.count.
  var regionsPerClient = 1
  /// Faulting threads per client, each on a contiguous share of its client's pages.
  var threadsPerClient = 1
  var plugins: [PluginInstance] = []
  /// Pages one fault fills (16 for a 64 KiB prefetch): only the first touch of
  /// each such aligned block of a region is a fault and is timed.
  var pagesPerFault = 1
  /// Pages start as zeros (zero-fill plugins): only the touch's own store holds the pattern.
  var zeroFilled = false
}

/// One benchmark mode: a name for `--modes`, the item number of issue 5, and its workload.
struct ModeDefinition: Sendable {
  var name: String
  var item: Int
  var summary: String
  var workload: Workload
  var usesBroker: Bool { workload.backend == .broker }
}

/// The mode table. Adding a mode is one entry here (plus a plugin kind if its
/// plugin answers differently); the round runner is generic over `Workload`.
enum Modes {
  static let bytesPlugin = PluginInstance(name: "bench-bytes", kind: .bytes)
  static let copyPlugin = PluginInstance(name: "bench-copy", kind: .copy)
  static let delegatePlugin = PluginInstance(name: "bench-delegate", kind: .delegate)
  static let prefetchPlugin = PluginInstance(name: "bench-prefetch", kind: .prefetch)
  static let pluginA = PluginInstance(name: "bench-a", kind: .copy)
  static let pluginB = PluginInstance(name: "bench-b", kind: .copy)

  /// The baseline of every ratio.
  static let baseline = "inprocess"
  /// The baseline of the multi-client ratio.
  static let singleClient = "brokered"

  static let all: [ModeDefinition] = [
    ModeDefinition(name: "plain", item: 1, summary: "first touch of anonymous memory, no userfaultfd (the floor)",
                   workload: Workload(backend: .plain)),
    ModeDefinition(name: "inprocess", item: 2, summary: "UserfaultFDDispatcher thread in this process, UFFDIO_COPY of one page (baseline)",
                   workload: Workload(backend: .inProcess)),
    ModeDefinition(name: "brokered", item: 3, summary: "broker + plugin processes, one page per fault, bytes in the decision",
                   workload: Workload(backend: .broker, plugins: [bytesPlugin])),
    ModeDefinition(name: "shared", item: 4, summary: "as brokered, the page in the plugin's shared memory, the decision names its offset",
                   workload: Workload(backend: .broker, plugins: [copyPlugin])),
    ModeDefinition(name: "prefetch-seq", item: 5, summary: "plugin answers the aligned 64 KiB block (.copyRange), sequential access",
                   workload: Workload(backend: .broker, plugins: [prefetchPlugin], pagesPerFault: 16)),
    ModeDefinition(name: "prefetch-random", item: 5, summary: "as prefetch-seq, pages touched in a fixed random permutation",
                   workload: Workload(backend: .broker, order: .random, plugins: [prefetchPlugin], pagesPerFault: 16)),
    ModeDefinition(name: "local", item: 6, summary: "broker-local fast path: the plugin delegated the region (a memfd of the pattern)",
                   workload: Workload(backend: .broker, plugins: [delegatePlugin])),
    ModeDefinition(name: "zero-page", item: 0, summary: "zero-fill, write faults answered with UFFDIO_ZEROPAGE (then a copy-on-write fault)",
                   workload: Workload(backend: .broker, plugins: [PluginInstance(name: "bench-zero-page", kind: .zeroPage)], zeroFilled: true)),
    ModeDefinition(name: "zero-copy", item: 0, summary: "zero-fill, write faults answered with a copied page of zeros",
                   workload: Workload(backend: .broker, plugins: [PluginInstance(name: "bench-zero-copy", kind: .zeroCopy)], zeroFilled: true)),
    ModeDefinition(name: "threads2", item: 7, summary: "brokered, two faulting threads on the halves of one client's region",
                   workload: Workload(backend: .broker, threadsPerClient: 2, plugins: [copyPlugin])),
    ModeDefinition(name: "clients64", item: 7, summary: "64 BrokerClients (own uffd each) x 16 regions over 2 plugins, a thread per client",
                   workload: Workload(backend: .broker, clients: 64, regionsPerClient: 16, plugins: [pluginA, pluginB])),
  ]

  static func named(_ name: String) -> ModeDefinition? { all.first { $0.name == name } }
}
