import BrokerCore
import BrokerProtocol
import BrokerRuntime
import Logging
import NIOCore
import NIOPosix
import Prometheus
import Synchronization

/// The broker's live metrics: the loop publishes a status snapshot each
/// interval; the exporter turns the latest into swift-metrics counters and
/// gauges (`StatusMetrics`) in a Prometheus registry of its own, and emits the
/// registry on each scrape of `/metrics` and into the textfile each interval.
///
/// 1. The loop thread only stores the snapshot (`publish`, under a lock no
///    other thread holds for long): the fault path takes no lock and never
///    waits for a scrape.
/// 2. Its registry is passed explicitly, not bootstrapped globally: several
///    brokers (the tests) may run in one process.
/// 3. `start` binds the listen address (or throws); `stop` stops the server
///    and the textfile timer, waits for them, and writes the textfile once more.
public final class MetricsExporter: StatusPublisher {
  public let interval: Duration
  public var listenAddress: String? { server.withLock { $0?.address } }
  private let configuration: BrokerConfiguration.Metrics
  private let logger: Logger
  private let latest = Mutex<BrokerStatus?>(nil)
  private let registry = PrometheusCollectorRegistry()
  private let metrics: Mutex<StatusMetrics>
  private let server = Mutex<MetricsServer?>(nil)
  /// The textfile's timer thread.
  private let group = Mutex<MultiThreadedEventLoopGroup?>(nil)
  private let textfileTask = Mutex<RepeatedTask?>(nil)
  /// The textfile could not be written last time (logged once, until it can again).
  private let textfileFailing = Mutex(false)

  public init(_ configuration: BrokerConfiguration.Metrics, logger: Logger) {
    self.configuration = configuration
    self.interval = configuration.interval
    self.logger = logger
    metrics = Mutex(StatusMetrics(registry: registry))
  }

  /// Serves `/metrics` and starts the textfile's timer, as configured.
  public func start() throws {
    if let listen = configuration.listen {
      let (host, port) = try BrokerConfiguration.Metrics.loopbackAddress(listen)
      var quiet = logger
      quiet.logLevel = max(logger.logLevel, .warning)  // not its "server started" line: the broker says where
      let server = try MetricsServer(host: host, port: port, logger: quiet) { [unowned self] in render() }
      self.server.withLock { $0 = server }
      logger.info("metrics served", metadata: ["metrics.listen": "\(server.address)", "metrics.path": "/metrics"])
    }
    if let path = configuration.textfile {
      let writer = TextfileWriter(path: path)
      let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
      self.group.withLock { $0 = group }
      let every = TimeAmount.nanoseconds(Int64(configuration.interval.components.seconds) * 1_000_000_000 + configuration.interval.components.attoseconds / 1_000_000_000)
      let task = group.next().scheduleRepeatedTask(initialDelay: every, delay: every) { [unowned self] _ in writeTextfile(writer) }
      textfileTask.withLock { $0 = task }
      logger.info("metrics written", metadata: ["metrics.textfile": "\(path)"])
    }
  }

  /// Stops serving and writing (the textfile gets the last snapshot).
  public func stop() {
    server.withLock { $0 }?.stop()
    server.withLock { $0 = nil }
    if let task = textfileTask.withLock({ $0 }) {
      let done = group.withLock { $0 }!.next().makePromise(of: Void.self)
      task.cancel(promise: done)
      try? done.futureResult.wait()
    }
    try? group.withLock { $0 }?.syncShutdownGracefully()
    group.withLock { $0 = nil }
    if let path = configuration.textfile { writeTextfile(TextfileWriter(path: path)) }
  }

  public func publish(_ status: BrokerStatus) {
    latest.withLock { $0 = status }
  }

  /// The registry in the Prometheus text format, updated from the latest snapshot.
  public func render() -> [UInt8] {
    guard let status = latest.withLock({ $0 }) else { return [] }
    return metrics.withLock { metrics in
      metrics.update(from: status)
      return registry.emitToBuffer()
    }
  }

  private func writeTextfile(_ writer: TextfileWriter) {
    let bytes = render()
    guard !bytes.isEmpty else { return }
    do throws(MetricsError) {
      try writer.write(bytes)
      if textfileFailing.withLock({ $0 }) {
        textfileFailing.withLock { $0 = false }
        logger.notice("the metrics textfile is written again", metadata: ["metrics.textfile": "\(writer.path)"])
      }
    } catch {
      // Once, not each interval: the figures stay on /metrics and in the status.
      guard !textfileFailing.withLock({ $0 }) else { return }
      textfileFailing.withLock { $0 = true }
      logger.warning("cannot write the metrics textfile", metadata: ["reason": "\(error)"])
    }
  }
}
