import Userfaultfd

/// Delegation streams: the broker fills delegated ranges in the background,
/// one block per call, between the inputs that carry faults. A block is filled
/// with what a fault there would get at that moment, through the same fill
/// orders, so the races are the fault path's: a fill while a remove, unmap,
/// remap or fork is unread gets EAGAIN (retried after the event is read, which
/// takes the removed or unmapped part out of the delegation); a page already
/// present (EEXIST) is never overwritten.
extension BrokerEngine {
  /// When the next stream block is due; nil when no stream can go on.
  public var nextStreamDeadline: UInt64? {
    var due: UInt64?
    for id in streaming {
      guard let client = clients[id], client.phase == .active, !client.delegated.streams.isEmpty else { continue }
      due = min(due ?? .max, client.streamNotBefore)
    }
    return due
  }

  /// Orders the next block of some client's stream (clients take turns).
  public func stream(now: UInt64) {
    self.now = now
    for _ in 0..<streaming.count {
      let id = streaming.removeFirst()
      guard let client = clients[id], client.phase != .closed, !client.delegated.streams.isEmpty else { continue }
      streaming.append(id)
      if client.phase == .active, client.streamNotBefore <= now, orderStreamFill(client) { return }
    }
  }

  /// Starts a stream of a delegation just recorded.
  func startStream(_ stream: DelegatedStream, of client: Client) {
    streaming.removeAll { clients[$0]?.delegated.streams.isEmpty ?? true }
    client.delegated.streams.append(stream)
    if !streaming.contains(client.id) { streaming.append(client.id) }
  }

  /// Orders a fill of the client's first stream's next block; false when its streams are done.
  private func orderStreamFill(_ client: Client) -> Bool {
    while let regionID = client.delegated.streams.first?.regionID {
      guard let piece = client.regions.pieces.first(where: { $0.spec.id == regionID && !$0.isNewMemory }) else {
        client.delegated.streams.removeFirst()  // the region is gone
        continue
      }
      let block = UInt64(Self.localFillBytes(pageSize: piece.spec.pageSize, systemPageSize: pageSize))
      // Advanced on a copy: mutating it in place while the table is read would copy the streams.
      var stream = client.delegated.streams[0]
      let next = stream.next(block: block, pageSize: piece.spec.pageSize, systemPageSize: pageSize, in: client.delegated)
      client.delegated.streams[0] = stream
      guard let (chunk, range) = next else {
        client.delegated.streams.removeFirst()
        continue
      }
      // The live piece holding the chunk's start (a moved part lies elsewhere); the rest of the chunk comes next.
      guard let live = client.regions.pieces.first(where: { $0.spec.id == regionID && !$0.isNewMemory && $0.address(ofOffset: chunk.lowerBound) != nil }),
            let address = live.address(ofOffset: chunk.lowerBound)
      else { continue }
      let end = min(chunk.upperBound, live.offset + UInt64(live.live.count))
      if end < chunk.upperBound { client.delegated.streams[0].retry = end..<chunk.upperBound }
      // Pages no one can vouch for fail closed when they fault: never filled here.
      if let lost = client.lostPages[regionID], !lost.clamped(to: chunk.lowerBound..<end).isEmpty { continue }
      let addresses = address..<address + UInt(end - chunk.lowerBound)
      let purpose = FillOrder.Purpose.stream(regionID: regionID, offset: chunk.lowerBound)
      switch range.source {
      case .zero:
        fill(.zero, addresses, source: .none, client: client, page: address, pageSize: live.spec.pageSize, fault: 0, purpose: purpose)
      case .file(let file, _):
        fill(.copy, addresses, source: .file(file, offset: range.fileOffset(of: chunk.lowerBound)!), client: client, page: address,
             pageSize: live.spec.pageSize, fault: 0, purpose: purpose)
      }
      return true
    }
    return false
  }

  /// The outcome of a stream block: what was not filled, and why, decides what comes next.
  func streamFilled(_ order: FillOrder, outcome: IoctlOutcome) {
    guard case .stream(let regionID, let offset) = order.purpose, let client = clients[order.client],
          client.delegated.streams.first?.regionID == regionID
    else { return }
    let end = offset + UInt64(order.range.count)
    switch outcome {
    case .done:
      streamedBytes += UInt64(order.range.count)
    case .partial(let bytes):
      // Stopped at a present page (or a map change): past that page, the rest of the block next.
      streamedBytes += UInt64(bytes)
      let resume = offset + UInt64(bytes) + UInt64(order.pageSize)
      if resume < end { client.delegated.streams[0].retry = resume..<end }
    case .notNow:
      // A map event is unread: read it first (it may take the block out of the delegation).
      client.delegated.streams[0].retry = offset..<end
      client.streamNotBefore = now + Self.backoffBase
    case .alreadyPresent, .rangeGone:
      break  // filled by a fault meanwhile, or gone: a fault there is served as ever
    case .targetExited:
      client.delegated.streams.removeAll()
    case .failed(let errno):
      log(.warning, "a delegation stream stopped: its fill failed", ["client.id": "\(client.id)", "region.id": "\(regionID)", "errno": "\(errno)"])
      client.delegated.streams.removeFirst()
    }
  }
}
