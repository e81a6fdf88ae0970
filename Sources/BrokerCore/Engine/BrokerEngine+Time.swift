import BrokerProtocol

extension BrokerEngine {
  /// The earliest time a parked fault is due, if one is parked: `tick` should
  /// come then (and at least every 100 ms for the rest).
  public var nextDeadline: UInt64? { ledger.nextParkedDeadline }

  /// Time passed: redelivers the parked faults that are due; at most every
  /// 20 ms, expires registrations and hung plugins, retries layouts, probes
  /// forked children and fails plugins gone for good.
  public func tick(now: UInt64) {
    self.now = now
    if !ledger.parked.isEmpty { redeliverDue() }
    guard now >= nextSweep else { return }
    nextSweep = now + 20_000_000
    let ordered = clients.values.sorted { $0.id < $1.id }
    for client in ordered {
      if let pending = client.pendingOpen, pending.deadline <= now {
        let names = Set(pending.regions.filter { pending.awaiting.contains($0.id) }.map(\.plugin)).sorted().joined(separator: ", ")
        failOpen(client, BrokerError(.timedOut, "plugin \(names) did not accept the regions in time"))
      }
    }
    for client in ordered where client.phase != .closed {
      if !client.unsent.isEmpty { sendNotices(client) }
      // A forked child has no pidfd: its exit is seen as ESRCH from a zero-page
      // request at an address it has not registered, which fills nothing while its memory lives.
      if client.isForkedChild && client.regions.piece(containing: Self.probeAddress) == nil { actions.append(.probe(client.id)) }
    }
    expireHungPlugins()
    for route in routes.values.sorted(by: { $0.name < $1.name }) where route.connection == nil && route.failover == nil && !route.failed {
      guard let policy = configuration.policies[route.name], policy.fallback != nil || policy.onFailure != .wait, let lostAt = route.lostAt else { continue }
      if now >= lostAt + UInt64(policy.failAfterMilliseconds) * 1_000_000 || route.givenUp { fail(route, policy) }
    }
  }

  /// The supervisor stopped restarting the plugin `name`: its policy applies at the next sweep.
  public func pluginGivenUp(_ name: String) {
    route(named: name).givenUp = true
  }

  /// A connected plugin that has not answered a fault, or a region announced
  /// to it, within its deadline is hung: disconnected, and (if the broker spawned it) killed.
  private func expireHungPlugins() {
    let deadline = UInt64(configuration.pluginDeadlineMilliseconds) * 1_000_000
    var hung: [Plugin] = []
    for id in ledger.ids(where: { fault in
      if case .inFlight(_, _, let sentAt) = fault.state { now > sentAt + deadline } else { false }
    }) {
      if case .inFlight(let plugin, _, _)? = ledger[id]?.state { hung.append(plugin) }
    }
    for client in clients.values.sorted(by: { $0.id < $1.id }) {
      guard let pending = client.pendingOpen, now > pending.sentAt + deadline else { continue }
      for spec in pending.regions where pending.awaiting.contains(spec.id) {
        // A plugin that connected since got the regions then.
        if let plugin = route(named: spec.plugin).effective.connection, !plugin.isClosed, now > plugin.connectedAt + deadline { hung.append(plugin) }
      }
    }
    for plugin in hung where !plugin.isClosed {
      let reason = "it did not answer a fault within \(configuration.pluginDeadlineMilliseconds) ms"
      closePlugin(plugin, reason: reason)
      actions.append(.killPluginProcess(pid: plugin.peer.pid, reason: reason))
    }
  }

  /// The broker stops: every client is closed (a forked child, which cannot
  /// re-attach, has what was never filled poisoned first), then every plugin.
  public func shutdown(now: UInt64) {
    self.now = now
    log(.info, "broker stopping", [
      "clients": "\(clients.count)", "plugins": "\(plugins.count)",
      "faults.sent": "\(statistics.faultsSent)", "decisions.applied": "\(statistics.decisionsApplied)",
      "faults.local": "\(statistics.resolvedLocally)", "decisions.stale": "\(statistics.staleDecisionsDropped)",
      "faults.newMemory": "\(statistics.newMemoryFills)", "faults.failedClosed": "\(statistics.failedClosed)",
      "swapped.lostBytes": "\(statistics.swappedBytesLost)",
      "decisions.invalid": "\(statistics.invalidDecisions)", "decisions.retry": "\(statistics.retries)",
    ])
    for client in clients.values.sorted(by: { $0.id < $1.id }) {
      if client.isForkedChild { for piece in client.regions.pieces { actions.append(.poisonMissing(client.id, piece.live)) } }
      closeClient(client, reason: "the broker is stopping")
    }
    for plugin in plugins.values.sorted(by: { $0.id < $1.id }) { closePlugin(plugin, reason: "the broker is stopping") }
  }
}
