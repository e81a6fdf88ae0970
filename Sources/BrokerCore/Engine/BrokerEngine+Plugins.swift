import BrokerProtocol
import Logging

/// A file a plugin delegated, as the runtime found it.
public struct DelegatedFile: Sendable {
  public var handle: FileHandle
  /// Whether it is a regular file or memfd (a socket or pipe is refused).
  public var isRegular: Bool
  public init(handle: FileHandle, isRegular: Bool) {
    self.handle = handle
    self.isRegular = isRegular
  }
}

extension BrokerEngine {
  // MARK: - Inputs

  /// A plugin connected with `peer`'s credentials. Returns its id, or the error to refuse it with.
  /// `spawnedAs`: the broker spawned it as the configured plugin of that name
  /// and handed it its end of a socket pair; it is allowed whatever its uid
  /// (the broker chose it), but may serve that name only.
  public func pluginConnected(_ peer: PeerCredentials, spawnedAs: String? = nil, now: UInt64) -> Result<PluginID, BrokerError> {
    self.now = now
    guard spawnedAs != nil || Self.allows(peer, uids: configuration.pluginUIDs, gids: configuration.pluginGIDs) else {
      report(.warning, "refused a plugin", .pluginRefused, cause: BrokerError.Code.notAuthorized.name, uid: peer.uid, ["peer.uid": "\(peer.uid)", "peer.pid": "\(peer.pid)", "reason": "uid not allowed"])
      return .failure(BrokerError(.notAuthorized, "uid \(peer.uid) may not serve as a plugin of this broker"))
    }
    guard plugins.count < configuration.maxPluginConnections else {
      report(.warning, "refused a plugin", .pluginRefused, cause: BrokerError.Code.limit.name, uid: peer.uid, ["peer.uid": "\(peer.uid)", "reason": "maxPluginConnections"])
      return .failure(BrokerError(.limit, "the broker has its maximum of \(configuration.maxPluginConnections) plugin connections"))
    }
    let plugin = Plugin(id: takeID(), peer: peer, connectedAt: now, spawnedAs: spawnedAs)
    plugins[plugin.id] = plugin
    log(.debug, "plugin connection accepted", ["peer.pid": "\(peer.pid)", "peer.uid": "\(peer.uid)", "spawned": "\(spawnedAs ?? "no")"])
    return .success(plugin.id)
  }

  /// A plugin's first packet. `sharedAreaSize`: the size of the shared area it
  /// attached, as mapped (0: none). Throws what to disconnect it with.
  public func pluginHello(_ id: PluginID, _ hello: Hello?, sharedAreaSize: Int, now: UInt64) throws(BrokerError) {
    self.now = now
    guard let plugin = plugins[id], !plugin.isClosed else { return }
    guard let hello else { throw BrokerError(.malformed, "a plugin must start with Hello") }
    guard hello.version == brokerProtocolVersion, hello.role == .plugin else {
      throw BrokerError(.version, "this broker speaks protocol \(brokerProtocolVersion) to plugins; got version \(hello.version) role \(hello.role)")
    }
    guard !hello.name.isEmpty, hello.name.utf8.count <= RegionSpec.maxPluginNameBytes else {
      throw BrokerError(.malformed, "a plugin's Hello must name the plugin, in at most \(RegionSpec.maxPluginNameBytes) bytes")
    }
    if let spawnedAs = plugin.spawnedAs, hello.name != spawnedAs {
      throw BrokerError(.notAuthorized, "this plugin was spawned as \"\(spawnedAs)\" and may serve no other name")
    }
    // Each name keeps a route (what its regions and missed events are kept under): bounded,
    // and a name no one needs any more makes room for a new one.
    if routes[hello.name] == nil, routes.count >= configuration.maxPluginNames {
      guard let idle = idleRoute() else {
        throw BrokerError(.limit, "the broker knows its maximum of \(configuration.maxPluginNames) plugin names, all in use")
      }
      routes[idle.name] = nil
      actions.append(.forgetPlugin(name: idle.name))
    }
    let route = route(named: hello.name)
    if route.connection != nil { throw BrokerError(.nameTaken, "plugin \"\(hello.name)\" is already connected") }
    plugin.sharedAreaSize = sharedAreaSize
    route.connection = plugin
    route.lostAt = nil
    plugin.route = route
    report(.info, "plugin connected", .pluginConnected, plugin: route, ["plugin": "\(hello.name)", "plugin.pid": "\(plugin.peer.pid)"])
    // The first packet to the plugin: nothing can be queued before it.
    actions.append(.welcome(plugin.id, name: hello.name))
    announceRegions(to: plugin)
  }

  /// The route longest unused that nothing needs: not connected, not configured
  /// (spawned, or named by a policy), no one's fallback nor failed over, nothing
  /// kept for it, and no client region routed or announced to it.
  private func idleRoute() -> PluginRoute? {
    let configured = Set(configuration.plugins.map(\.name) + configuration.policies.keys + configuration.policies.values.compactMap(\.fallback))
    let fallbacks = routes.values.compactMap { $0.failover.map(ObjectIdentifier.init) }
    let inUse = Set(clients.values.flatMap { client in
      client.regions.pieces.map(\.route.name) + client.announcedRegions.values + client.servedBy
        + (client.pendingOpen?.regions.map(\.plugin) ?? [])
    })
    return routes.values.filter { route in
      route.connection == nil && route.failover == nil && !configured.contains(route.name)
        && route.missedEvents.allSatisfy { clients[$0.clientID] == nil }  // at most the Closed of clients gone
        && !fallbacks.contains(ObjectIdentifier(route)) && !inUse.contains(route.name)
    }.min { ($0.lostAt ?? 0, $0.name) < ($1.lostAt ?? 0, $1.name) }
  }

  /// Whether the plugin's Hello was accepted (its packets then carry decisions).
  public func isWelcomed(_ id: PluginID) -> Bool { plugins[id]?.route != nil }

  /// The name a plugin connected as, if its Hello was accepted.
  public func name(ofPlugin id: PluginID) -> String? { plugins[id]?.route?.name }

  /// A plugin's delegation (or revocation) of a range: recorded after checking
  /// that the plugin serves the region, the range is page aligned inside it,
  /// and a file is a regular file at a page-aligned offset below 2^63. A file
  /// not taken is released. Pages the client dropped, and pages no one can
  /// vouch for (`lostPages`), are left out; a stream
  /// asked for starts (`BrokerEngine+Stream`).
  public func delegation(_ pluginID: PluginID, _ delegation: Delegation, file: DelegatedFile?, now: UInt64) {
    self.now = now
    var taken = false
    defer { if let file, !taken { actions.append(.releaseFile(file.handle)) } }
    guard let plugin = plugins[pluginID], !plugin.isClosed,
          let client = clients[delegation.clientID], client.phase == .active || client.phase == .opening
    else { return }
    let spec = client.regions.pieces.first { $0.spec.id == delegation.regionID }?.spec
      ?? client.pendingOpen?.regions.first { $0.id == delegation.regionID }
    guard let spec, spec.plugin == plugin.name else {
      return refuseDelegation(plugin, .notServed, "region \(delegation.regionID) of client \(delegation.clientID) is not served by it")
    }
    let mask = UInt64(spec.pageSize - 1)
    guard delegation.offsets.lowerBound & mask == 0, UInt64(delegation.offsets.count) & mask == 0,
          delegation.offsets.upperBound <= UInt64(spec.length), !delegation.offsets.isEmpty
    else {
      return refuseDelegation(plugin, .badOffsets, "offsets \(delegation.offsets) are not a page-aligned part of region \(spec.id)")
    }
    if delegation.revoke {
      return changeDelegations(of: client) { $0.cut(regionID: spec.id, delegation.offsets) }
    }
    let source: DelegatedRanges.Source
    switch delegation.source {
    case .zero:
      source = .zero
    case .file(let offset):
      // pread takes an off_t: the whole range must lie below 2^63 in the file.
      guard let file, file.isRegular, offset & mask == 0, offset <= UInt64(Int64.max) - UInt64(delegation.offsets.count) else {
        return refuseDelegation(plugin, .badFile, "a delegated file must be a regular file or memfd at a page-aligned offset below 2^63")
      }
      taken = true
      source = .file(file.handle, offset: offset)
    }
    let range = DelegatedRanges.Range(regionID: spec.id, offsets: delegation.offsets, source: source,
                                      prefetchPages: min(max(delegation.prefetchPages, 1), Self.maxLocalFillPages))
    changeDelegations(of: client) { delegated in
      delegated.add(range)
      // Pages the client dropped read zeros: their faults go to the plugin, which is
      // told of them (a plugin that restarted delegates before it reads those records).
      // Pages no one can vouch for fail closed: no local fill (nor its block) reaches them.
      for excluded in [client.droppedPages[spec.id], client.lostPages[spec.id]] {
        for part in excluded?.clamped(to: delegation.offsets) ?? [] { delegated.cut(regionID: spec.id, part) }
      }
    }
    if delegation.stream || !delegation.streamFirst.isEmpty {
      let first = delegation.streamFirst.filter { delegation.offsets.contains($0) }
      startStream(DelegatedStream(regionID: spec.id, first: first, sweep: delegation.stream ? delegation.offsets : 0..<0), of: client)
    }
  }

  /// A plugin's reply to RegionOpened.
  public func regionReply(_ pluginID: PluginID, _ reply: RegionReply, now: UInt64) {
    self.now = now
    guard let plugin = plugins[pluginID], !plugin.isClosed else { return }
    if !reply.lost.isEmpty { recordLost(reply, from: plugin) }
    guard let client = clients[reply.clientID], var pending = client.pendingOpen,
          pending.awaiting.contains(reply.regionID),
          pending.regions.contains(where: { $0.id == reply.regionID && route(named: $0.plugin).effective === plugin.route })
    else {
      if let error = reply.error {
        log(.error, "plugin refused a region it serves", ["plugin": "\(plugin.name)", "client.id": "\(reply.clientID)", "region.id": "\(reply.regionID)", "error": "\(error)"])
      }
      return
    }
    if let error = reply.error {
      let refusal = BrokerError(.pluginRefused, "plugin \(plugin.name) refused region \(reply.regionID): \(error.message)")
      guard client.isForkedChild else { return failOpen(client, refusal) }
      refuseForChild([reply.regionID], of: client, refusal)
    }
    pending.awaiting.remove(reply.regionID)
    client.pendingOpen = pending
    log(.debug, "plugin accepted a region", ["plugin": "\(plugin.name)", "client.id": "\(client.id)", "region.id": "\(reply.regionID)", "waiting": "\(pending.awaiting.count)"])
    guard pending.awaiting.isEmpty else { return }
    client.pendingOpen = nil
    // A forked child's table is its parent's copy already.
    if !client.isForkedChild { for spec in pending.regions { client.regions.add(spec, route: route(named: spec.plugin)) } }
    if client.phase == .opening {
      activate(client, requestID: pending.requestID)
    } else {
      self.reply(client, BrokerReply(requestID: pending.requestID, .ack(clientID: client.id)))
    }
  }

  /// The plugin connection is gone (it closed, a send failed, it sent garbage:
  /// with `tell`, it is told `why`). Its faults in flight are parked for its
  /// return (or a restart); swap-out chunks it had not stored fail.
  public func pluginGone(_ id: PluginID, _ why: BrokerError, tell: Bool = false, now: UInt64) {
    self.now = now
    guard let plugin = plugins[id] else { return }
    closePlugin(plugin, why, tell: tell)
  }

  // MARK: - Internals

  /// A plugin (re)opened a region without some of the swapped-out pages it was
  /// to hold: from now on their faults fail closed (SIGBUS), never zeros.
  private func recordLost(_ reply: RegionReply, from plugin: Plugin) {
    guard let client = clients[reply.clientID], let record = client.swappedOutPages[reply.regionID],
          client.announcedRegions[reply.regionID].map({ route(named: $0).effective === plugin.route }) == true
    else { return }
    var lost = OffsetRanges()
    for range in reply.lost { for part in record.clamped(to: range) { lost.insert(part) } }
    guard !lost.isEmpty else { return }
    for range in lost.ranges {
      client.swappedOutPages[reply.regionID]?.subtract(range)
      client.lostPages[reply.regionID, default: OffsetRanges()].insert(range)
      changeDelegations(of: client) { $0.cut(regionID: reply.regionID, range) }  // no local fill reaches them either
    }
    statistics.swappedBytesLost += lost.count
    notify(client, [.dropped(reply.regionID)])
    report(.error, "a plugin lost swapped-out pages: they fail closed", .swappedPagesLost, plugin: plugin.route, [
      "plugin": "\(plugin.name)", "client.id": "\(client.id)", "region.id": "\(reply.regionID)", "bytes": "\(lost.count)",
    ])
  }

  /// A plugin (re)connected: it learns every region it serves, then what was
  /// dropped of them, then the events it missed. With `origin` (a failed plugin
  /// whose regions it takes over): only that plugin's regions; its own are open
  /// already, and opening them again would reset whatever it keeps for them.
  func announceRegions(to plugin: Plugin, of origin: PluginRoute? = nil) {
    guard let route = plugin.route else { return }
    let announces = { (candidate: PluginRoute) in
      candidate.effective === route && (origin.map { candidate.passes(through: $0) } ?? true)
    }
    // Every region is opened before anything dropped is told: a forked child's
    // region still offered as a copy of its parent's (a lower id, so opened
    // before it) copies it as registered, and the child's own record follows.
    var dropped: [BrokerEvent] = []
    for client in clients.values.sorted(by: { $0.id < $1.id }) {
      // A forked child's regions are in its table and, while being opened, pending too: once each.
      var announced = Set<UInt64>()
      let live = client.regions.pieces.filter { !$0.isNewMemory && announces($0.route) }.map(\.spec)
      let pending = (client.pendingOpen?.regions ?? []).filter { announces(self.route(named: $0.plugin)) }
      for spec in live + pending where announced.insert(spec.id).inserted {
        actions.append(.send(plugin.id, regionOpened(spec, of: client)))
        dropped += droppedEvents(of: spec, client: client)
      }
    }
    for event in dropped { actions.append(.send(plugin.id, event)) }
    if origin == nil { for event in route.takeMissedEvents() { actions.append(.send(plugin.id, event)) } }
  }

  /// What the client dropped of a region, as `removed` events where it lies now
  /// (in the table, or for a region being opened, where its spec says).
  func droppedEvents(of spec: RegionSpec, client: Client) -> [BrokerEvent] {
    guard let dropped = client.droppedPages[spec.id] else { return [] }
    var pieces = client.regions.pieces.filter { $0.spec.id == spec.id && !$0.isNewMemory }.map { RegionPiece(address: $0.live.lowerBound, offset: $0.offset, length: $0.live.count) }
    if pieces.isEmpty { pieces = spec.pieces.isEmpty ? [RegionPiece(address: spec.base, offset: 0, length: spec.length)] : spec.pieces }
    var events: [BrokerEvent] = []
    for piece in pieces {
      for offsets in dropped.clamped(to: piece.offset..<piece.offset + UInt64(piece.length)) {
        let address = piece.address + UInt(offsets.lowerBound - piece.offset)
        let range = address..<address + UInt(offsets.upperBound - offsets.lowerBound)
        events.append(.removed(RangeEvent(clientID: client.id, regionID: spec.id, range: range, startOffset: offsets.lowerBound)))
      }
    }
    return events
  }

  func closePlugin(_ plugin: Plugin, _ why: BrokerError, tell: Bool = false) {
    guard !plugin.isClosed else { return }
    plugin.isClosed = true
    plugins[plugin.id] = nil
    actions.append(.closePlugin(plugin.id, tell: tell ? why : nil))
    if plugin.route?.connection === plugin {
      plugin.route?.connection = nil
      plugin.route?.lostAt = now
    }
    let orphaned = ledger.ids { fault in
      if case .inFlight(let sentTo, _, _) = fault.state { sentTo === plugin } else { false }
    }
    for id in orphaned { park(id) }
    plugin.route?.faultsRequeued += UInt64(orphaned.count)
    // A swap-out chunk it had not stored yet fails: the client keeps those pages.
    for (storeID, pending) in pendingStores.sorted(by: { $0.key < $1.key }) where pending.plugin === plugin {
      pendingStores[storeID] = nil
      if pending.client.phase == .active {
        reply(pending.client, BrokerReply(requestID: pending.requestID, .error(BrokerError(.pluginRefused, "the plugin went away before it stored the pages"))))
      }
    }
    let level: Logger.Level = !tell && plugin.route != nil ? .notice : .warning
    report(level, "plugin disconnected", .pluginDisconnected, cause: why.code.name, plugin: plugin.route,
           ["plugin": "\(plugin.name)", "plugin.pid": "\(plugin.peer.pid)", "reason": "\(why)", "faults.parked": "\(orphaned.count)"])
  }

  /// A plugin is gone for good: its regions fail over to the fallback, or fail closed.
  func fail(_ route: PluginRoute, _ policy: BrokerConfiguration.PluginPolicy) {
    if let name = policy.fallback, name != route.name {
      let fallback = self.route(named: name)
      route.failover = fallback
      report(.error, "plugin failed over", .pluginFailedOver, plugin: route, ["plugin": "\(route.name)", "fallback": "\(name)"])
      // The fallback learns the regions, then what the failed plugin missed.
      if let connection = fallback.connection { announceRegions(to: connection, of: route) }
      for event in route.takeMissedEvents() { sendEvent(event, to: fallback) }
      return
    }
    route.failed = true
    report(.error, "plugin failed: its regions fail closed", .pluginFailedClosed, cause: policy.onFailure.rawValue, plugin: route, ["plugin": "\(route.name)", "policy": "\(policy.onFailure.rawValue)"])
    guard policy.onFailure == .kill else { return }  // poison: each fault is poisoned as it comes
    for client in clients.values.sorted(by: { $0.id < $1.id }) where client.regions.pieces.contains(where: { $0.route.effective === route }) {
      kill(client, "killing a client whose plugin failed", plugin: route)
    }
  }

  /// Sends a non-fault event, in order; kept for the plugin's return if it is away.
  func sendEvent(_ event: BrokerEvent, to primary: PluginRoute) {
    let route = primary.effective
    if let plugin = route.connection, !plugin.isClosed {
      actions.append(.send(plugin.id, event))
      return
    }
    if case .closed(let gone, _) = event {
      // A closed client's earlier events are moot to its plugin: its Closed stands for them all.
      route.missedEvents.removeAll { $0.clientID == gone }
    }
    guard route.missedEvents.count < maxMissedEvents else {
      // A client's end is no change of its memory: past the cap it is not kept (the
      // plugin, when it comes back, keeps state for a client that is gone: no page is wrong).
      if case .closed = event { return }
      if case .regionClosed = event { return }
      // Dropping an event could make the plugin serve stale memory later: instead the
      // client that keeps changing its mappings while its plugin is away is failed closed.
      if let client = clients[event.clientID] { kill(client, "killing a client: too many events for an absent plugin", plugin: route) }
      return
    }
    route.missedEvents.append(event)
  }

  /// Fails a client closed: SIGKILL through its pidfd (never a recycled pid), with the reason logged.
  func kill(_ client: Client, _ message: Logger.Message, plugin route: PluginRoute) {
    report(.error, message, .clientKilled, plugin: route, ["client.id": "\(client.id)", "client.pid": "\(client.pid)", "plugin": "\(route.name)"])
    actions.append(.kill(client.id))
  }

  private func refuseDelegation(_ plugin: Plugin, _ refusal: Refusal, _ reason: String) {
    report(.warning, "refused a delegation", .delegationRefused, cause: refusal.rawValue, plugin: plugin.route, ["plugin": "\(plugin.name)", "reason": "\(reason)"])
    actions.append(.send(plugin.id, .decisionRefused(faultID: 0, cause: refusal.rawValue, reason: reason)))
    countInvalid(from: plugin)
  }

  func refuse(_ decision: DecodedDecision, from plugin: Plugin, _ refusal: Refusal, _ reason: String) {
    refuse(decision.faultID, from: plugin, refusal, reason)
  }

  func refuse(_ faultID: UInt64, from plugin: Plugin, _ refusal: Refusal, _ reason: String) {
    report(.warning, "refused a plugin decision", .decisionRefused, cause: refusal.rawValue, plugin: plugin.route,
           ["plugin": "\(plugin.name)", "fault.id": "\(faultID)", "reason": "\(reason)"])
    // The plugin is told (it could not know otherwise), then counted.
    actions.append(.send(plugin.id, .decisionRefused(faultID: faultID, cause: refusal.rawValue, reason: reason)))
    countInvalid(from: plugin)
  }

  /// Counts an invalid decision or delegation; a plugin that keeps sending them is dropped.
  func countInvalid(from plugin: Plugin) {
    statistics.invalidDecisions += 1
    plugin.invalidDecisions += 1
    plugin.route?.invalidDecisions += 1
    if plugin.invalidDecisions > configuration.maxInvalidDecisions {
      closePlugin(plugin, BrokerError(.invalidDecisions, "it sent \(plugin.invalidDecisions) invalid decisions"), tell: true)
    }
  }
}
