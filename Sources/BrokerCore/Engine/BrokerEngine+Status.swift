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
  /// up to `logLinesPerSecondPerPeer` lines of a kind a second from one uid
  /// (`uid`, else the plugin connection's) and `logLinesPerSecond` from all,
  /// then a summary line per peer (a hostile peer must not flood the log nor
  /// hide another's lines; the counts stay exact).
  func report(_ level: Logger.Level, _ message: @autoclosure () -> Logger.Message, _ kind: Tally.Kind, cause: String? = nil, plugin route: PluginRoute? = nil,
              uid: UInt32? = nil, _ metadata: @autoclosure () -> Logger.Metadata = [:]) {
    tally.count(kind, cause)
    route?.tally.count(kind, cause)
    let kindKey = LogKey(kind: kind, uid: nil)
    let peerKey = (uid ?? route?.connection?.peer.uid).map { LogKey(kind: kind, uid: $0) }
    var all = currentWindow(kindKey)
    var peer = peerKey.map(currentWindow)
    if all.lines < Self.logLinesPerSecond, peer.map({ $0.lines < Self.logLinesPerSecondPerPeer }) ?? true {
      all.lines += 1
      peer?.lines += 1
      log(level, message(), metadata())
    } else if peer != nil {
      peer?.suppressed += 1
    } else {
      all.suppressed += 1
    }
    logWindows[kindKey] = all
    if let peerKey { logWindows[peerKey] = peer }
  }

  /// The window of `key` for this second: a new one if its second is over.
  private func currentWindow(_ key: LogKey) -> LogWindow {
    if let window = logWindows[key], now < window.start + 1_000_000_000 { return window }
    if let past = logWindows[key] { summarize(key, past) }
    nextLogSummary = min(nextLogSummary ?? .max, now + 1_000_000_000)
    return LogWindow(start: now)
  }

  /// Sums up the lines past seconds held back and lets their windows go (on
  /// the sweep, so the last burst is told too). The sweep's usual case,
  /// nothing due, is one comparison.
  func summarizeSuppressedLogs() {
    guard let due = nextLogSummary, now >= due else { return }
    nextLogSummary = nil
    for (key, window) in logWindows.sorted(by: { ($0.key.kind.rawValue, $0.key.uid ?? 0) < ($1.key.kind.rawValue, $1.key.uid ?? 0) }) {
      if now >= window.start + 1_000_000_000 {
        summarize(key, window)
        logWindows[key] = nil
      } else {
        nextLogSummary = min(nextLogSummary ?? .max, window.start + 1_000_000_000)
      }
    }
  }

  private func summarize(_ key: LogKey, _ window: LogWindow) {
    guard window.suppressed > 0 else { return }
    var metadata: Logger.Metadata = ["kind": "\(key.kind.rawValue)", "suppressed": "\(window.suppressed)", "total": "\(tally[key.kind])"]
    if let uid = key.uid { metadata["peer.uid"] = "\(uid)" }
    log(.warning, "more incidents than the log shows", metadata)
  }

  /// A log budget's owner: a kind of incident, from one uid or (nil) from all.
  struct LogKey: Hashable {
    var kind: Tally.Kind
    var uid: UInt32?
  }

  /// Lines logged and held back in one second.
  struct LogWindow {
    var start: UInt64
    var lines = 0
    var suppressed = 0
  }
}
