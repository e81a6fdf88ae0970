import Dispatch
import Hummingbird
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// `GET /metrics` over HTTP/1.1 (Hummingbird), on an event loop thread of its
/// own; the handlers run on Swift's concurrency pool, never on the broker's loop.
///
/// 1. `start` returns once the socket is bound (the address it bound: port 0
///    picks a free one), or throws why it could not bind.
/// 2. `stop` shuts the server down gracefully, waits for it to finish, then
///    shuts its thread down: nothing is left running.
/// 3. `render` is called on each scrape, on a concurrency thread.
final class MetricsServer: Sendable {
  private let group: MultiThreadedEventLoopGroup
  private let task: Task<Void, Never>
  private let services: ServiceGroup
  private let finished: DispatchSemaphore
  /// `HOST:PORT` as bound.
  let address: String

  static let contentType = "text/plain; version=0.0.4; charset=utf-8"

  private enum Start: Sendable {
    case waiting
    case bound(String)
    case failed(String)
  }

  init(host: String, port: Int, logger: Logger, render: @escaping @Sendable () -> [UInt8]) throws(MetricsError) {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let router = Router()
    router.get("/metrics") { _, _ in
      Response(status: .ok, headers: [.contentType: Self.contentType], body: .init(byteBuffer: ByteBuffer(bytes: render())))
    }
    let started = DispatchSemaphore(value: 0)
    let finished = DispatchSemaphore(value: 0)
    let start = Mutex(Start.waiting)
    let app = Application(
      router: router, configuration: .init(address: .hostname(host, port: port), serverName: nil),
      onServerRunning: { channel in
        let bound = channel.localAddress.map { address in address.port.map { "\(host.contains(":") ? "[\(host)]" : host):\($0)" } ?? "\(address)" }
        start.withLock { $0 = .bound(bound ?? "\(host):\(port)") }
        started.signal()
      },
      eventLoopGroupProvider: .shared(group), logger: logger)
    // No signals of its own: the broker's loop takes them (signalfd).
    let services = ServiceGroup(configuration: .init(services: [app], logger: logger))
    self.services = services
    task = Task {
      do {
        try await services.run()
      } catch {
        start.withLock { if case .waiting = $0 { $0 = .failed("\(error)") } }
      }
      start.withLock { if case .waiting = $0 { $0 = .failed("the server stopped before it served") } }
      started.signal()
      finished.signal()
    }
    self.group = group
    self.finished = finished
    _ = started.wait(timeout: .now() + .seconds(10))
    switch start.withLock({ $0 }) {
    case .bound(let address):
      self.address = address
    case .failed(let reason):
      finished.wait()
      try? group.syncShutdownGracefully()
      throw MetricsError("cannot serve metrics on \(host):\(port): \(reason)")
    case .waiting:
      task.cancel()
      finished.wait()
      try? group.syncShutdownGracefully()
      throw MetricsError("cannot serve metrics on \(host):\(port): the server did not start within 10 s")
    }
  }

  func stop() {
    let services = services
    Task { await services.triggerGracefulShutdown() }
    finished.wait()
    try? group.syncShutdownGracefully()
  }
}

/// Why the metrics could not be served or written.
public struct MetricsError: Error, CustomStringConvertible {
  public var description: String
  init(_ description: String) { self.description = description }
}
