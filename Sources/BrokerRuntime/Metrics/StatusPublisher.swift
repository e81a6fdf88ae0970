import BrokerProtocol

/// Takes the loop's status snapshots: the metrics exporter.
///
/// 1. `publish` is called on the loop thread, once per `interval` (from the
///    loop's housekeeping, never per fault) and once more as the broker stops;
///    with no publisher the loop does nothing at all for metrics.
/// 2. It must not block: hand the snapshot over (under a lock of its own) and
///    return; rendering, serving and writing happen on the publisher's threads.
/// 3. `listenAddress` is read on the loop thread for the status.
public protocol StatusPublisher: AnyObject, Sendable {
  /// How often the loop publishes.
  var interval: Duration { get }
  /// Where the publisher serves (`HOST:PORT`), for the status; nil: nowhere.
  var listenAddress: String? { get }
  func publish(_ status: BrokerStatus)
}
