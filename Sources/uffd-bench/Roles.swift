import BrokerCore
import BrokerProtocol
import BrokerRuntime
import CLinux
import Glibc
import Logging
import PluginSDK
import Synchronization

// The child roles of the benchmark: the same executable, so both link the
// malloc counter and report their own allocations per fault.

/// `--role broker`: a real `BrokerRuntime` on this process's main thread.
enum BrokerRole {
  static func run(_ options: BrokerRoleOptions) -> Int32 {
    Console.nameProcess("bench-broker")
    // Warnings only: a registration per round per client would flood the output at info.
    LoggingSystem.bootstrap { label in
      var handler = StreamLogHandler.standardError(label: label)
      handler.logLevel = .warning
      return handler
    }
    let configuration = BrokerConfiguration(clientSocketPath: options.clientSocket, pluginSocketPath: options.pluginSocket)
    let broker: BrokerRuntime
    do {
      // UFFD_BENCH_PUBLISH_MS=N: the loop hands a status snapshot to a publisher
      // every N ms, as with metrics on (the exporter's own threads aside).
      let publisher = getenv("UFFD_BENCH_PUBLISH_MS").flatMap { Int(String(cString: $0)) }.map { SnapshotSink(interval: .milliseconds($0)) }
      broker = try BrokerRuntime(configuration: configuration, logger: Logger(label: "uffd-bench.broker"), handleSignals: true, publisher: publisher)
    } catch {
      Console.error("broker role: \(error)")
      return 1
    }
    let control = ControlResponder(fd: options.controlFD)
    // The listeners are bound in init: clients and plugins may connect from now on.
    control.sendReady()
    control.start(faults: { broker.faultsResolved }, onClose: { broker.stop() })
    do {
      try broker.run()
    } catch {
      Console.error("broker role: \(error)")
      return 1
    }
    return 0
  }
}

/// Keeps the latest status snapshot: the loop's side of the metrics, without an exporter.
final class SnapshotSink: StatusPublisher {
  let interval: Duration
  var listenAddress: String? { nil }
  let published = Atomic<Int>(0)
  private let latest = Mutex<BrokerStatus?>(nil)

  init(interval: Duration) { self.interval = interval }

  func publish(_ status: BrokerStatus) {
    latest.withLock { $0 = status }
    published.add(1, ordering: .relaxed)
  }
}

/// `--role plugin`: a PluginSDK plugin serving the pattern, a page or a 64 KiB block per fault.
enum PluginRole {
  static func run(_ options: PluginRoleOptions) -> Int32 {
    Console.nameProcess(options.name)
    let counters = PluginCounters()
    let plugin = BenchPlugin(kind: options.kind, counters: counters)
    let runner: PluginRunner
    do {
      runner = try PluginRunner(plugin: plugin, name: options.name, socketPath: options.pluginSocket, sharedMemory: options.kind != .bytes)
    } catch {
      Console.error("plugin role \(options.name): \(error)")
      return 1
    }
    let control = ControlResponder(fd: options.controlFD)
    control.sendReady()
    control.start(faults: { counters.faults.load(ordering: .relaxed) }, onClose: { _exit(0) })
    do {
      try runner.serve()
    } catch {
      Console.error("plugin role \(options.name): \(error)")
      return 1
    }
    return 0
  }
}

/// Read by the control thread while the plugin's loop counts.
final class PluginCounters: Sendable {
  let faults = Atomic<UInt64>(0)
}

/// Serves the benchmark's pattern (a function of the backing offset).
final class BenchPlugin: PagePlugin {
  private let kind: PluginKind
  private let counters: PluginCounters
  private static let block = UInt64(64 << 10)

  init(kind: PluginKind, counters: PluginCounters) {
    self.kind = kind
    self.counters = counters
  }

  /// `delegate`: hands the region to the broker, backed by a memfd holding its pattern.
  func regionOpened(_ region: PluginRegion) throws {
    guard kind == .delegate else { return }
    let fd = clinux_sealed_memfd("bench-delegate", UInt64(region.length))
    guard fd >= 0, let pointer = mmap(nil, region.length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), pointer != MAP_FAILED else {
      throw BrokerError(.pluginRefused, "cannot make the delegated memfd")
    }
    Pattern.fill(pointer, bytes: region.length, backingOffset: region.spec.backingOffset)
    munmap(pointer, region.length)
    region.delegate(file: fd, fileOffset: 0)
    close(fd)
  }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    counters.faults.add(1, ordering: .relaxed)
    switch kind {
    case .zeroPage:
      return .zero
    case .zeroCopy:
      guard fault.isWrite else { return .zero }
      buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: region.pageSize)
      return .copy
    case .copy, .bytes, .delegate:
      Pattern.fill(buffer.baseAddress!, bytes: region.pageSize, backingOffset: region.spec.backingOffset &+ fault.offset)
      return .copy
    case .prefetch:
      // The aligned block (in region offsets) around the fault, clamped to the region's end.
      let start = fault.offset / Self.block * Self.block
      let length = Int(min(Self.block, UInt64(region.length) - start))
      Pattern.fill(buffer.baseAddress!, bytes: length, backingOffset: region.spec.backingOffset &+ start)
      return .copyRange(offset: start, length: length)
    }
  }
}

/// Process naming and stderr without touching the C `stderr` global (not concurrency-safe in Swift 6).
enum Console {
  /// Sets the process's comm (the main thread's name, 15 bytes at most), so
  /// the roles are told apart in ps, top and perf. (pthread_setname_np needs
  /// _GNU_SOURCE, which the Glibc module does not expose.)
  static func nameProcess(_ name: String) {
    let fd = open("/proc/self/comm", O_WRONLY)
    guard fd >= 0 else { return }
    let bytes = Array(name.utf8.prefix(15))
    _ = write(fd, bytes, bytes.count)
    close(fd)
  }

  static func error(_ message: String) {
    let line = "uffd-bench: " + message + "\n"
    _ = line.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
  }
}
