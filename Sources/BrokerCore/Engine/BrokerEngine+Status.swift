import BrokerProtocol
import Logging

extension BrokerEngine {
  /// What the broker is doing now: its clients, plugins and counters (the
  /// runtime adds what only it knows: its pid, uptime, spawned processes).
  public func status() -> BrokerStatus {
    var status = BrokerStatus()
    status.faults = statistics
    status.faultsInFlight = ledger.ids { if case .inFlight = $0.state { true } else { false } }.count
    // Parked faults, in total and by the plugin that serves their region now.
    var parkedByPlugin: [String: Int] = [:]
    for id in ledger.ids(where: { if case .parked = $0.state { true } else { false } }) {
      guard let fault = ledger[id] else { continue }
      status.faultsParked += 1
      if let piece = fault.client.regions.piece(containing: fault.page), !piece.isNewMemory { parkedByPlugin[piece.route.effective.name, default: 0] += 1 }
    }
    status.faultLatencyMicroseconds = faultLatency.summary
    status.tally = tally
    status.clients = clients.values.sorted { $0.id < $1.id }.map { client in
      var entry = BrokerStatus.ClientStatus()
      entry.id = client.id
      entry.pid = client.pid
      entry.parent = client.parentID
      entry.phase = "\(client.phase)"
      entry.regions = client.regions.pieces.count
      entry.faultsOut = client.faultsOut
      return entry
    }
    status.plugins = routes.values.sorted { $0.name < $1.name }.map { route in
      var entry = BrokerStatus.PluginStatus()
      entry.name = route.name
      entry.state = route.failover != nil ? "failedOver" : route.failed ? "failed" : route.connection != nil ? "connected" : "away"
      entry.fallback = route.failover?.name
      entry.connectedPID = route.connection?.peer.pid ?? 0
      entry.connection = route.connection?.id ?? 0
      entry.faultsSent = route.faultsSent
      entry.decisionsApplied = route.decisionsApplied
      entry.faultsInFlight = route.connection?.inFlight ?? 0
      entry.missedEvents = route.missedEvents.count
      entry.faultsRequeued = route.faultsRequeued
      entry.decisionsAppliedByKind = route.decisionsAppliedByKind
      entry.invalidDecisions = route.invalidDecisions
      entry.staleDecisionsDropped = route.staleDecisionsDropped
      entry.retries = route.retries
      entry.redeliveries = route.redeliveries
      entry.swapStoredBytes = route.swapStoredBytes
      entry.faultsParked = parkedByPlugin[route.name] ?? 0
      entry.tally = route.tally
      return entry
    }
    return status
  }

  /// Counts an incident, in total and for the plugin it concerns, and logs it:
  /// up to `logLinesPerSecond` lines of a kind a second, then a summary line
  /// (a hostile peer must not flood the log; the counts stay exact).
  func report(_ level: Logger.Level, _ message: @autoclosure () -> Logger.Message, _ kind: Tally.Kind, cause: String? = nil, plugin route: PluginRoute? = nil,
              _ metadata: @autoclosure () -> Logger.Metadata = [:]) {
    tally.count(kind, cause)
    route?.tally.count(kind, cause)
    var window = logWindows[kind] ?? LogWindow(start: now)
    if now >= window.start + 1_000_000_000 {
      summarize(kind, window)
      window = LogWindow(start: now)
    }
    if window.lines < Self.logLinesPerSecond {
      window.lines += 1
      log(level, message(), metadata())
    } else {
      window.suppressed += 1
      nextLogSummary = min(nextLogSummary ?? .max, window.start + 1_000_000_000)
    }
    logWindows[kind] = window
  }

  /// Sums up the lines a past second held back (on the sweep, so the last
  /// burst is told too). The sweep's usual case, nothing held back, is one comparison.
  func summarizeSuppressedLogs() {
    guard let due = nextLogSummary, now >= due else { return }
    nextLogSummary = nil
    for (kind, window) in logWindows.sorted(by: { $0.key.rawValue < $1.key.rawValue }) where window.suppressed > 0 {
      if now >= window.start + 1_000_000_000 {
        summarize(kind, window)
        logWindows[kind] = nil
      } else {
        nextLogSummary = min(nextLogSummary ?? .max, window.start + 1_000_000_000)
      }
    }
  }

  private func summarize(_ kind: Tally.Kind, _ window: LogWindow) {
    guard window.suppressed > 0 else { return }
    log(.warning, "more incidents than the log shows", ["kind": "\(kind.rawValue)", "suppressed": "\(window.suppressed)", "total": "\(tally[kind])"])
  }

  /// Lines logged and held back of one kind in the current second.
  struct LogWindow {
    var start: UInt64
    var lines = 0
    var suppressed = 0
  }
}
