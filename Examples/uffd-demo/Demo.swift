import ArgumentParser
import BrokerProtocol
import ChildProcess
import Glibc

/// The demo: a broker and two sample plugins as real processes, and a client
/// workload that restores a snapshot lazily and swaps a working set out and in.
@main
struct Demo: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "uffd-demo",
    abstract: "Run uffd-broker with the snapshot and swap plugins on a real workload, and check every page.",
    version: uffdBrokerVersion)

  /// The allowed values, for `--help` and `validate()`.
  static let mibRange = 1...16_384
  static let threadsRange = 1...64
  static let prefetchRange = 1...32
  static let knownScenarios = ["restore", "swap"]

  @Option(help: ArgumentHelp("Snapshot size to restore, in MiB, \(range(mibRange)).", valueName: "mib"))
  var snapshotMib = 256
  @Option(help: ArgumentHelp("Working set for the swap scenario, in MiB, \(range(mibRange)); half of it is swapped out.", valueName: "mib"))
  var swapMib = 64
  @Option(help: ArgumentHelp("Faulting threads, \(range(threadsRange)).", valueName: "n"))
  var threads = 2
  @Option(help: ArgumentHelp("Pages per prefetch block of the snapshot plugin, \(range(prefetchRange)) (1: no prefetch).", valueName: "pages"))
  var prefetch = 16
  @Option(help: ArgumentHelp("Scenarios to run, comma separated, from: \(knownScenarios.joined(separator: ", ")).", valueName: "list"))
  var scenarios = knownScenarios.joined(separator: ",")
  @Flag(help: "Let the snapshot plugin delegate its regions: the broker reads the snapshot itself (no round trip per fault).")
  var delegate = false
  @Flag(help: "Restore into 2 MiB huge pages (MAP_HUGETLB): one fault per huge page. Raises /proc/sys/vm/nr_hugepages for the run (root).")
  var hugePages = false

  private static func range(_ range: ClosedRange<Int>) -> String { "\(range.lowerBound) to \(range.upperBound)" }

  func validate() throws {
    for (flag, value, range) in [("--snapshot-mib", snapshotMib, Self.mibRange), ("--swap-mib", swapMib, Self.mibRange),
                                 ("--threads", threads, Self.threadsRange), ("--prefetch", prefetch, Self.prefetchRange)] where !range.contains(value) {
      throw ValidationError("\(flag) is \(value); it must be from \(range.lowerBound) to \(range.upperBound)")
    }
    let names = scenarios.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    for name in names where !Self.knownScenarios.contains(name) {
      throw ValidationError("unknown scenario \"\(name)\" in --scenarios; known: \(Self.knownScenarios.joined(separator: ", "))")
    }
  }

  func run() throws {
    let services = try DemoServices(prefetchPages: prefetch, delegate: delegate)
    CleanupOnSignal.install(services)
    defer { services.shutdown() }
    try services.waitUntilReady()
    print("uffd-demo: broker and plugins started in \(services.directory)")
    var results: [PhaseResult] = []
    do {
      let chosen = Set(scenarios.split(separator: ",").map(String.init))
      if chosen.contains("restore") {
        let pool = hugePages ? try HugePagePool(adding: (snapshotMib + 1) / 2) : nil
        defer { pool?.release() }
        results.append(try restoreSnapshot(services: services, mib: snapshotMib, threads: threads, prefetchPages: prefetch, delegated: delegate,
                                           hugePageSize: hugePages ? 2 << 20 : nil))
      }
      if chosen.contains("swap") {
        results += try swapWorkingSet(services: services, mib: swapMib, threads: threads)
      }
    } catch {
      Self.printError("uffd-demo: \(error)\n--- broker log ---\n\(services.brokerLog)")
      throw ExitCode(1)
    }
    printSummary(results)
    let wrong = results.reduce(0) { $0 + $1.wrongPages }
    if wrong > 0 {
      Self.printError("uffd-demo: FAILED: \(Wording.count(wrong, "page")) read back wrong")
      throw ExitCode(1)
    }
    print("uffd-demo: every page verified")
  }

  /// A failure goes to stderr (after what stdout holds so far).
  private static func printError(_ text: String) {
    fflush(nil)
    (text + "\n").withCString { _ = write(STDERR_FILENO, $0, strlen($0)) }
  }

  private func printSummary(_ results: [PhaseResult]) {
    func column(_ text: String, _ width: Int) -> String { text.count >= width ? text : text + String(repeating: " ", count: width - text.count) }
    func right(_ text: String, _ width: Int) -> String { text.count >= width ? text : String(repeating: " ", count: width - text.count) + text }
    print("")
    print(column("phase", 10) + column("plugin", 10) + right("pages", 8) + right("faults", 8) + right("pages/s", 10) + right("p50 µs", 9) + right("p99 µs", 9) + right("wrong", 7) + "  notes")
    for r in results {
      let latency = r.latencies.isEmpty
      print(column(r.name, 10) + column(r.plugin, 10) + right("\(r.pages)", 8) + right("\(r.faults)", 8) + right("\(Int(r.pagesPerSecond))", 10)
        + right(latency ? "-" : String(format1: r.percentile(0.5)), 9) + right(latency ? "-" : String(format1: r.percentile(0.99)), 9)
        + right("\(r.wrongPages)", 7) + "  " + r.note)
    }
    print("(latency: each page's first touch, as the faulting thread saw it; with prefetch most touches find the page already there)")
  }
}

/// Ctrl-C or SIGTERM: stop the broker and its plugins, remove the temp
/// directory, exit 130. A thread waits for the signals, blocked everywhere else.
enum CleanupOnSignal {
  nonisolated(unsafe) private static var services: DemoServices?

  static func install(_ services: DemoServices) {
    self.services = services
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    _ = spawnWaiter()
  }

  private static func spawnWaiter() -> pthread_t {
    var thread = pthread_t()
    pthread_create(&thread, nil, { _ in
      var set = sigset_t()
      sigemptyset(&set)
      sigaddset(&set, SIGINT)
      sigaddset(&set, SIGTERM)
      var signal: CInt = 0
      sigwait(&set, &signal)
      "\nuffd-demo: interrupted, stopping the broker and its plugins\n".withCString { _ = write(2, $0, strlen($0)) }
      CleanupOnSignal.services?.shutdown()
      _exit(130)
    }, nil)
    return thread
  }
}
