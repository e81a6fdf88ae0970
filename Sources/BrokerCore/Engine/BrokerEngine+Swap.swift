import BrokerProtocol
import SystemPackage

/// A swap-out: the client write-protects a range (`SwapOut`), sends its pages
/// to the plugin to store (`SwapOutData`, each acknowledged once the plugin
/// stored it), drops them (`MADV_DONTNEED`, read as a REMOVE that records them
/// as swapped out) and ends it (`SwapOutDone`). Writers to the range are held
/// meanwhile, and every fill reaching into it is write-protected.
extension BrokerEngine {
  func swapRequest(_ request: ClientRequest, client: Client) throws(BrokerError) {
    switch request.body {
    case .swapOut(let regionID, let offset, let length):
      let (range, piece) = try client.liveRange(regionID: regionID, offset: offset, length: length, pageSize: pageSize)
      // Its pages live in the file, which a swap-out would not release.
      guard !piece.spec.isSharedMemory else { throw BrokerError(.badRegion, "region \(regionID) is shared memory, which is not swapped out") }
      guard !client.isSwapping(range) else { throw BrokerError(.badRegion, "a swap-out of this range is in progress") }
      client.swapping.append(range)  // first: fills from now on are write-protected
      log(.debug, "swap-out started", ["client.id": "\(client.id)", "region.id": "\(regionID)", "offset": "\(offset)", "length": "\(length)"])
      actions.append(.writeProtect(client.id, range, protect: true, swapOut: SwapOutStart(requestID: request.requestID, regionID: regionID)))
    case .swapOutData(let regionID, let offset, let data):
      let (range, piece) = try client.liveRange(regionID: regionID, offset: offset, length: data.count, pageSize: pageSize)
      guard client.isSwappingAll(of: range) else { throw BrokerError(.badRegion, "SwapOutData outside a swap-out in progress") }
      guard let plugin = piece.route.effective.connection, !plugin.isClosed else {
        throw BrokerError(.unknownPlugin, "plugin \(piece.route.effective.name) is not connected")
      }
      let storeID = takeID()
      pendingStores[storeID] = PendingStore(client: client, requestID: request.requestID, range: range, piece: piece, plugin: plugin)
      sendEvent(.store(StoreEvent(storeID: storeID, clientID: client.id, regionID: regionID, offset: offset, data: data)), to: piece.route)
    case .swapOutDone(let regionID, let offset, let length):
      let (range, _) = try client.liveRange(regionID: regionID, offset: offset, length: length, pageSize: pageSize)
      guard let index = client.swapping.firstIndex(of: range) else { throw BrokerError(.badRegion, "no swap-out of this range is in progress") }
      client.swapping.remove(at: index)
      log(.debug, "swap-out done", ["client.id": "\(client.id)", "region.id": "\(regionID)", "offset": "\(offset)", "length": "\(length)"])
      // Unprotecting wakes the held writers: a kept page is now writable; a
      // dropped one faults again and is filled from the plugin's copy.
      actions.append(.writeProtect(client.id, range, protect: false, swapOut: nil))
      for id in heldWrites(of: client, in: range) { ledger.settle(id) }
      reply(client, BrokerReply(requestID: request.requestID, .ack(clientID: client.id)))
    default:
      break
    }
  }

  /// The write-protection a swap-out begins with took effect, or failed with `errno`.
  public func swapOutProtected(_ id: ClientID, _ start: SwapOutStart, range: Range<UInt>, errno: Errno?, now: UInt64) {
    self.now = now
    guard let client = clients[id], client.phase == .active else { return }
    guard let errno else { return reply(client, BrokerReply(requestID: start.requestID, .ack(clientID: client.id))) }
    client.swapping.removeAll { $0 == range }
    let error = BrokerError(.badRegion, "cannot write-protect region \(start.regionID) (register it with write-protect mode)", errno: errno)
    refuse(start.requestID, of: client, error)
  }

  /// A plugin's answer to a store: the client may drop the pages, except those
  /// a writer is held on (busy: it keeps them).
  public func storeReply(_ pluginID: PluginID, _ storeReply: StoreReply, now: UInt64) {
    self.now = now
    guard let plugin = plugins[pluginID], !plugin.isClosed, let pending = pendingStores[storeReply.storeID] else { return }
    guard pending.plugin === plugin else {
      // Acknowledging another plugin's store would let the client drop pages nobody kept.
      report(.warning, "refused a store reply", .storeReplyRefused, plugin: plugin.route, ["plugin": "\(plugin.name)", "store.id": "\(storeReply.storeID)", "reason": "the store was not sent to it"])
      return countInvalid(from: plugin)
    }
    pendingStores[storeReply.storeID] = nil
    guard pending.client.phase == .active else { return }
    if let error = storeReply.error {
      return reply(pending.client, BrokerReply(requestID: pending.requestID, .error(BrokerError(.pluginRefused, "the plugin did not store the pages: \(error.message)"))))
    }
    statistics.swapStoredBytes += UInt64(pending.range.count)
    plugin.route?.swapStoredBytes += UInt64(pending.range.count)
    let busy = heldWrites(of: pending.client, in: pending.range).compactMap { ledger[$0]?.page }.sorted().map { pending.piece.offset(of: $0) }
    reply(pending.client, BrokerReply(requestID: pending.requestID, .ack(clientID: pending.client.id, busyOffsets: busy)))
  }

  private func heldWrites(of client: Client, in range: Range<UInt>) -> [FaultLedger.ID] {
    ledger.ids { fault in
      guard fault.client === client, case .held = fault.state else { return false }
      return range.contains(fault.page)
    }
  }
}

/// What a swap-out's first write-protection answers to.
public struct SwapOutStart: Sendable, Equatable {
  public var requestID: UInt64
  public var regionID: UInt64
}
