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
    // Each scan picks out what is due, in id order (deterministic), and builds
    // nothing when nothing is: the sweep runs 50 times a second on the fault path.
    for client in due(clients.values, by: \.id, where: { $0.pendingOpen.map { $0.deadline <= now } ?? false }) {
      guard let pending = client.pendingOpen else { continue }
      let names = Set(pending.regions.filter { pending.awaiting.contains($0.id) }.map(\.plugin)).sorted().joined(separator: ", ")
      failOpen(client, BrokerError(.timedOut, "plugin \(names) did not accept the regions in time"))
    }
    // A forked child has no pidfd: its exit is seen as ESRCH from a zero-page
    // request at an address it has not registered, which fills nothing while its memory lives.
    let probed = { (client: Client) in client.isForkedChild && client.regions.piece(containing: Self.probeAddress) == nil }
    for client in due(clients.values, by: \.id, where: { $0.phase != .closed && (!$0.unsent.isEmpty || probed($0)) }) {
      if !client.unsent.isEmpty { sendNotices(client) }
      if probed(client) { actions.append(.probe(client.id)) }
    }
    expireHungPlugins()
    expireSilentPeers()
    summarizeSuppressedLogs()
    for route in due(routes.values, by: \.name, where: { $0.connection == nil && $0.failover == nil && !$0.failed }) {
      guard let policy = configuration.policies[route.name], policy.fallback != nil || policy.onFailure != .wait, let lostAt = route.lostAt else { continue }
      if now >= lostAt + policy.failAfter.nanoseconds || route.givenUp { fail(route, policy) }
    }
  }

  /// Closes connections that did not say Hello (a client: did not Register)
  /// within `helloTimeout`: idle connections must not hold the broker's slots.
  private func expireSilentPeers() {
    let timeout = configuration.helloTimeout.nanoseconds
    for client in due(clients.values, by: \.id, where: { $0.hasSocket && $0.phase.isBeforeRegister && now > $0.connectedAt + timeout }) {
      refuse(0, of: client, BrokerError(.timedOut, "no Register within \(configuration.helloTimeout.wholeMilliseconds) ms of connecting"))
    }
    for plugin in due(plugins.values, by: \.id, where: { $0.route == nil && !$0.isClosed && now > $0.connectedAt + timeout }) {
      closePlugin(plugin, BrokerError(.timedOut, "no Hello within \(configuration.helloTimeout.wholeMilliseconds) ms of connecting"), tell: true)
    }
  }

  /// The elements for which `isDue` holds, ordered by `key`; no allocation when none is.
  private func due<Element, Key: Comparable>(_ elements: some Collection<Element>, by key: (Element) -> Key, where isDue: (Element) -> Bool) -> [Element] {
    guard elements.contains(where: isDue) else { return [] }
    return elements.filter(isDue).sorted { key($0) < key($1) }
  }

  /// The supervisor stopped restarting the plugin `name`: its policy applies at the next sweep.
  public func pluginGivenUp(_ name: String) {
    route(named: name).givenUp = true
  }

  /// A connected plugin that has not answered a fault, or a region announced
  /// to it, within its deadline is hung: disconnected, and (if the broker spawned it) killed.
  private func expireHungPlugins() {
    let deadline = configuration.pluginDeadline.nanoseconds
    var hung: [Plugin] = []
    for id in ledger.ids(where: { fault in
      if case .inFlight(_, _, let sentAt) = fault.state { now > sentAt + deadline } else { false }
    }) {
      if case .inFlight(let plugin, _, _)? = ledger[id]?.state { hung.append(plugin) }
    }
    for client in due(clients.values, by: \.id, where: { $0.pendingOpen.map { now > $0.sentAt + deadline } ?? false }) {
      guard let pending = client.pendingOpen else { continue }
      for spec in pending.regions where pending.awaiting.contains(spec.id) {
        // A plugin that connected since got the regions then.
        if let plugin = route(named: spec.plugin).effective.connection, !plugin.isClosed, now > plugin.connectedAt + deadline { hung.append(plugin) }
      }
    }
    for plugin in hung where !plugin.isClosed {
      let reason = "it did not answer a fault within \(configuration.pluginDeadline.wholeMilliseconds) ms"
      closePlugin(plugin, BrokerError(.timedOut, reason))
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
      "faults.newMemory": "\(statistics.newMemoryFills)", "faults.minor": "\(statistics.minorFaultsResolved)", "faults.failedClosed": "\(statistics.failedClosed)",
      "swapped.lostBytes": "\(statistics.swappedBytesLost)",
      "decisions.invalid": "\(statistics.invalidDecisions)", "decisions.retry": "\(statistics.retries)",
    ])
    for client in clients.values.sorted(by: { $0.id < $1.id }) {
      if client.isForkedChild { for piece in client.regions.pieces { actions.append(.poisonMissing(client.id, piece.live)) } }
      closeClient(client, BrokerError(.stopping, "the broker is stopping"))
    }
    for plugin in plugins.values.sorted(by: { $0.id < $1.id }) { closePlugin(plugin, BrokerError(.stopping, "the broker is stopping")) }
  }
}

extension BrokerEngine {
  /// A reloaded configuration: who may connect, limits, deadlines, policies
  /// and the spawned plugins apply from now on (to connections already made
  /// too; a peer already in is not thrown out). A spawned plugin may be removed
  /// only while no client's region is routed to it: its regions would wait
  /// for it for good. One added or changed is no longer given up.
  public func reconfigure(_ next: BrokerConfiguration) throws(BrokerError) {
    try next.validate()
    for plugin in configuration.plugins where !next.plugins.contains(where: { $0.name == plugin.name }) {
      let regions = clients.values.reduce(0) { $0 + $1.regions.pieces.count { $0.route.name == plugin.name } }
      guard regions == 0 else {
        throw BrokerError(.malformed, "plugins: \(plugin.name) serves \(regions) regions of running clients; it can be removed once no client uses it")
      }
    }
    for plugin in next.plugins where !configuration.plugins.contains(plugin) { route(named: plugin.name).givenUp = false }
    configuration = next
  }
}
