import BrokerProtocol
import CLinux
import ChildProcess
import ClientSDK
import Glibc
import LinuxSupport
import Userfaultfd

/// What `uffd-bench restore` runs (from `RestoreCommand`'s options, checked).
struct RestoreOptions {
  var mib = 256
  var percent = 100
  var rounds = BenchOptions().rounds
  var strategies = RestoreStrategy.all
  /// Where the snapshot file is written (a disk, so that dropping it from the cache means something).
  var directory = "/var/tmp"
  /// Keep the file in the page cache (read it before every round) instead of dropping it.
  var warmCache = false

  static let mibRange = 1...16_384
  static let percentRange = 1...100
}

/// One strategy's round.
struct RestoreResult {
  var strategy: String
  var round: Int
  /// Eager: the read of the whole file; lazy: registering the mapping with the broker.
  var restoreNs: UInt64
  /// From the restore's end to the worker's last page.
  var touchNs: UInt64
  /// The fraction of the file in the page cache when the round started.
  var cached: Double
  var totalNs: UInt64 { restoreNs + touchNs }
}

/// Snapshot restore, eager against lazy: a snapshot file is written once;
/// every round restores it with each strategy into fresh anonymous memory
/// and a worker thread reads the chosen pages; the clock runs from the start
/// of the restore to the worker's last page. The worker's checksum must match
/// the file's, or the run fails.
enum RestoreBench {
  static func run(_ options: RestoreOptions, arguments: [String]) -> Int32 {
    let loadBefore = Report.loadAverage()
    let pages = options.mib * 256
    print("# command: " + arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " "))
    print("# restore \(options.mib) MiB, the worker reads \(options.percent == 100 ? "every page in order" : "\(options.percent)% of the pages at random over the whole range"), "
      + "\(options.rounds) rounds, strategies interleaved (the order rotates each round):")
    for strategy in options.strategies { print("#   \(Format.left(strategy.name, 9)) \(strategy.summary)") }
    print("# time = restore (eager: the read; lazy: registering with the broker) + the worker's reads; fresh memory, 4 KiB pages (no THP)")
    fflush(nil)
    guard systemPageSize == 4096 else {
      Console.error("this benchmark assumes 4 KiB pages (the system's are \(systemPageSize))")
      return 1
    }
    let lazy = options.strategies.filter { $0.pluginName != nil }
    if !lazy.isEmpty && !UserfaultFD.isSupported {
      Console.error("userfaultfd is not available to this process (run as root or set vm.unprivileged_userfaultfd=1)")
      return 1
    }
    let pluginExecutable = ChildProcess.productsDirectory + "/snapshot-plugin"
    if !lazy.isEmpty && access(pluginExecutable, X_OK) != 0 {
      Console.error("\(pluginExecutable) is missing: build it as well (swift build -c release --product snapshot-plugin)")
      return 1
    }

    var template = Array((options.directory + "/uffd-bench-restore.XXXXXX").utf8CString)
    guard let made = mkdtemp(&template) else {
      Console.error("cannot make a directory in \(options.directory): errno \(errno)")
      return 1
    }
    let directory = String(cString: made)
    defer { rmdir(directory) }
    /// A replay strategy's working-set record.
    func record(_ name: String) -> String { directory + "/\(name).working-set" }
    let generation = monotonicNanoseconds()
    let image: SnapshotImage
    do {
      image = try SnapshotImage(path: directory + "/snapshot", pages: pages)
    } catch {
      Console.error("\(error)")
      return 1
    }
    let touched = TouchSet(pages: pages, percent: options.percent)
    let expected = image.expectedChecksum(touched)
    print("# snapshot \(image.path): written and synced in \(Format.fixed(Double(monotonicNanoseconds() - generation) / 1e9, 2)) s; "
      + (options.warmCache ? "kept in the page cache (read before every round unless all cached; the cached fraction is reported)"
         : "dropped from the page cache before every round (posix_fadvise DONTNEED; the cached fraction is reported; the host may still cache the disk)"))
    fflush(nil)

    // Before any thread exists: SIGINT/SIGTERM are blocked in every thread and
    // read by the watchdog, which cleans up (children, sockets) and exits.
    let signals = clinux_signalfd([SIGINT, SIGTERM], 2)
    var processes: BenchProcesses?
    var plugins: [(label: String, process: ChildProcess)] = []
    /// On failure the plugins' logs stay (and so does the directory) for a look.
    func shutdown(keepingLogs: Bool) {
      processes?.shutdown()
      for plugin in plugins { _ = plugin.process.terminate() }
      if !keepingLogs { for plugin in plugins { unlink(directory + "/\(plugin.label).log") } }
    }
    var results: [RestoreResult] = []
    do {
      if !lazy.isEmpty {
        let started = try BenchProcesses(plugins: [])
        processes = started
        for strategy in lazy {
          guard case .lazy(let prefetch, let delegated, let stream, let replay) = strategy.kind, let name = strategy.pluginName else { continue }
          let process: ChildProcess
          let options = (delegated ? ["--delegate"] : []) + (stream ? ["--stream"] : []) + (replay ? ["--record", record(name), "--replay", record(name)] : [])
          do {
            process = try ChildProcess(pluginExecutable, [name, "--root", directory, "--prefetch", "\(prefetch)"] + options,
                                       environment: ["UFFD_BROKER_PLUGIN_SOCKET": started.pluginSocket], stderr: directory + "/\(name).log")
          } catch {
            throw BenchError("cannot start the snapshot plugin \(name): \(error)")
          }
          plugins.append((name, process))
        }
        print("# waiting for the snapshot plugins to connect (the broker logs each early registration it refuses)")
        fflush(nil)
        for strategy in lazy { try waitUntilServing(strategy, image: image, processes: started) }
      }
      let watchdog = Watchdog(processes: processes, others: plugins, signals: signals)
      defer { watchdog.stop() }
      // Replay strategies record their working set first: a restore of their own, not timed.
      for strategy in options.strategies {
        guard case .lazy(_, _, _, true) = strategy.kind, let name = strategy.pluginName else { continue }
        _ = try restore(strategy, round: 0, warmCache: options.warmCache, image: image, touched: touched, expected: expected, processes: processes, watchdog: watchdog)
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while access(record(name), R_OK) != 0 {
          guard monotonicNanoseconds() < deadline else { throw BenchError("\(strategy.name): the warm-up restore wrote no working-set record") }
          usleep(10_000)  // written when the plugin hears the region closed
        }
        print("# \(strategy.name): working set recorded by a warm-up restore (not timed)")
      }
      for round in 1...options.rounds {
        // Rotated each round, so no strategy always follows the same one.
        let count = options.strategies.count
        for position in 0..<count {
          let strategy = options.strategies[(position + round - 1) % count]
          let result = try restore(strategy, round: round, warmCache: options.warmCache, image: image, touched: touched, expected: expected, processes: processes, watchdog: watchdog)
          results.append(result)
          print("round \(round)/\(options.rounds) \(Format.left(strategy.name, 9)) total ms \(Format.right(Format.fixed(Double(result.totalNs) / 1e6, 1), 9))"
            + "  restore ms \(Format.right(Format.fixed(Double(result.restoreNs) / 1e6, 1), 8))  touch ms \(Format.right(Format.fixed(Double(result.touchNs) / 1e6, 1), 9))"
            + "  cached \(Format.fixed(result.cached * 100, 0))%")
          fflush(nil)
        }
      }
    } catch {
      fflush(nil)
      shutdown(keepingLogs: !plugins.isEmpty)
      Console.error("FAILED: \(error)" + (plugins.isEmpty ? "" : " (the snapshot plugins' logs are in \(directory))"))
      return 1
    }
    shutdown(keepingLogs: false)
    for strategy in lazy { if let name = strategy.pluginName { unlink(record(name)) } }
    var termination = sigset_t()
    sigemptyset(&termination)
    sigaddset(&termination, SIGINT)
    sigaddset(&termination, SIGTERM)
    pthread_sigmask(SIG_UNBLOCK, &termination, nil)

    summary(results, options: options)
    Report.machine(loadBefore: loadBefore)
    print("every round's checksum matched the file")
    return 0
  }

  /// Registers a one-page probe region with the strategy's plugin until the
  /// broker accepts it: the plugin has connected and opened the file.
  private static func waitUntilServing(_ strategy: RestoreStrategy, image: SnapshotImage, processes: BenchProcesses) throws(BenchError) {
    guard let name = strategy.pluginName else { return }
    let probe = try Mapping(length: systemPageSize)
    defer { probe.unmap() }
    let deadline = monotonicNanoseconds() + 15_000_000_000
    while true {
      do throws(ClientError) {
        let client = try BrokerClient(regions: [RegionSpec(id: 1, base: probe.address, length: systemPageSize, plugin: name, argument: image.path)],
                                      socketPath: processes.clientSocket, name: "restore-probe")
        withExtendedLifetime(client) {}
        return
      } catch {
        guard error.broker?.code == .unknownPlugin, monotonicNanoseconds() < deadline else {
          throw BenchError("the snapshot plugin \(name) does not serve: \(error)")
        }
        usleep(10_000)  // it has not connected yet
      }
    }
  }

  /// One strategy's round: fresh memory, the restore, the worker's reads, the checksum, teardown.
  private static func restore(_ strategy: RestoreStrategy, round: Int, warmCache: Bool, image: SnapshotImage, touched: TouchSet, expected: UInt64,
                              processes: BenchProcesses?, watchdog: Watchdog) throws(BenchError) -> RestoreResult {
    if strategy.pluginName != nil { try processes?.settle() }
    let cached = warmCache ? try image.warmCache() : image.dropFromCache()
    let mapping = try Mapping(length: image.bytes)
    let address = mapping.address
    let outcome = WorkerOutcome()
    let start = Gate(parties: 2)
    let end = Gate(parties: 2)
    let worker = spawnThread {
      start.pass()
      outcome.checksum = touched.touch(base: UnsafeRawPointer(bitPattern: address)!)
      end.pass()
    }
    watchdog.arm(seconds: 120 + UInt64(image.pages / 1_000))
    var client: BrokerClient?
    let began = monotonicNanoseconds()
    do throws(BenchError) {
      switch strategy.kind {
      case .eager:
        try read(image, into: mapping)
      case .lazy:
        guard let processes, let name = strategy.pluginName else { throw BenchError("no broker was started") }
        do {
          client = try BrokerClient(regions: [RegionSpec(id: 1, base: address, length: mapping.length, plugin: name, argument: image.path)],
                                    socketPath: processes.clientSocket, name: "restore-\(strategy.name)")
        } catch {
          throw BenchError("\(strategy.name): cannot register the mapping: \(error)")
        }
      }
    } catch {
      // The worker waits at the start gate: let it read (whatever is there) and finish.
      start.pass()
      end.pass()
      pthread_join(worker, nil)
      watchdog.disarm()
      mapping.unmap()
      throw error
    }
    let restored = monotonicNanoseconds()
    start.pass()
    end.pass()
    let finished = monotonicNanoseconds()
    pthread_join(worker, nil)

    if outcome.checksum != expected {
      // Name the wrong pages while the restore still serves (a missing page is faulted in, not hung on).
      var wrong = 0
      for index in 0..<touched.count {
        let page = touched.page(index)
        guard !image.holds(page: page, at: mapping.base + page * systemPageSize) else { continue }
        wrong += 1
        if wrong <= 5 { print("WRONG PAGE: \(strategy.name) round \(round) page \(page) does not hold the file's page \(page)") }
      }
      watchdog.disarm()
      mapping.unmap()
      throw BenchError("\(strategy.name) round \(round): the worker's checksum does not match the file (\(wrong) pages wrong)")
    }
    watchdog.disarm()
    // Brokered: munmap before dropping the client (the broker reads the unmap event), as the fault rounds do.
    mapping.unmap()
    withExtendedLifetime(client) {}
    client = nil
    return RestoreResult(strategy: strategy.name, round: round, restoreNs: restored - began, touchNs: finished - restored, cached: cached)
  }

  /// Eager restore: the whole file into the mapping.
  private static func read(_ image: SnapshotImage, into mapping: Mapping) throws(BenchError) {
    let fd = open(image.path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("cannot open \(image.path): errno \(errno)") }
    defer { close(fd) }
    var done = 0
    while done < image.bytes {
      let n = pread(fd, mapping.base + done, image.bytes - done, off_t(done))
      if n < 0 && errno == EINTR { continue }
      guard n > 0 else { throw BenchError("cannot read \(image.path) at \(done): \(n == 0 ? "end of file" : "errno \(errno)")") }
      done += n
    }
  }

  private static func summary(_ results: [RestoreResult], options: RestoreOptions) {
    func rounds(_ name: String) -> [RestoreResult] { results.filter { $0.strategy == name } }
    let eager = Dictionary(rounds(RestoreStrategy.eager.name).map { ($0.round, Double($0.totalNs)) }, uniquingKeysWith: { a, _ in a })
    let widths = [9, 9, 11, 9, 9, 10]
    print("")
    print("restore \(options.mib) MiB, \(options.percent)% read, \(options.warmCache ? "warm" : "cold") page cache, medians over \(options.rounds) rounds; ratio = eager's time / this one's, per round, then medianed (> 1: faster than eager)")
    print(Format.row(["strategy", "total s", "restore s", "touch s", "vs eager", "cached %"], widths: widths))
    for strategy in options.strategies {
      let mine = rounds(strategy.name)
      let median = { (value: (RestoreResult) -> Double) in Statistics.median(mine.map(value)) }
      let ratio = Statistics.median(mine.compactMap { r in eager[r.round].map { $0 / Double(r.totalNs) } })
      print(Format.row([strategy.name, Format.fixed(median { Double($0.totalNs) / 1e9 }, 3), Format.fixed(median { Double($0.restoreNs) / 1e9 }, 3),
                        Format.fixed(median { Double($0.touchNs) / 1e9 }, 3), Format.fixed(ratio, 2) + "x", Format.fixed(median { $0.cached * 100 }, 0)],
                       widths: widths))
    }
  }
}

/// The worker's checksum: written before the end gate, read after it.
private final class WorkerOutcome: @unchecked Sendable {
  var checksum: UInt64 = 0
}
