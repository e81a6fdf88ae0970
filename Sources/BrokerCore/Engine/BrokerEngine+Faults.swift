import BrokerProtocol
import Userfaultfd

extension BrokerEngine {
  // MARK: - Inputs

  /// Events read from a client's uffd until EAGAIN, in read order. The map
  /// events are applied first, then the parked faults are tried again (all of
  /// them if a map event was read), then the new faults routed, a second
  /// fault of a page merged into the first.
  public func uffdEvents(_ id: ClientID, _ events: [KernelEvent], now: UInt64) {
    self.now = now
    guard let client = clients[id] else {
      for case .fork(let ticket, _) in events { actions.append(.dropChild(ticket)) }
      return
    }
    var mapEvents = false
    var notices: [Client.Notice] = []
    for event in events {
      switch event {
      case .pagefault: continue
      case .remove(let range): removed(range, client: client, notices: &notices)
      case .unmap(let range): unmapped(range, client: client, notices: &notices)
      case .remap(let from, let to, let length): remapped(from: from, to: to, length: length, client: client, notices: &notices)
      case .fork(let ticket, let wiped):
        client.invalidations.record(faultsOut: false)
        adoptFork(ticket, wipedOnFork: wiped, of: client)
      }
      mapEvents = true
    }
    guard client.phase != .closed else { return }
    if !notices.isEmpty { notify(client, notices) }
    // Parked faults first (they are older), all of them if a map event may have
    // unblocked them; the others wait for their deadline (`tick`).
    if mapEvents { redeliverParked(of: client) }
    for case .pagefault(let fault) in events {
      // A huge page's fault is one fault wherever in the huge page it hit.
      let size = client.regions.pageSize(at: fault.address, system: pageSize)
      let page = fault.address & ~UInt(size - 1)
      guard ledger.id(client: client.id, page: page) == nil else { continue }  // outstanding: the fill wakes every waiter
      routeFault(ledger.enter(fault, page: page, pageSize: size, client: client, now: now))
    }
  }

  /// A plugin's decision for a fault: checked against the fault's client as it
  /// is now, and applied (or refused, or dropped as stale).
  public func decision(_ pluginID: PluginID, _ decision: DecodedDecision, now: UInt64) {
    self.now = now
    guard let plugin = plugins[pluginID], !plugin.isClosed else { return }
    guard let entry = ledger[decision.faultID] else { return }  // answered already, or its client is gone
    guard case .inFlight(let sentTo, let sequence, _) = entry.state, sentTo === plugin else {
      refuse(decision, from: plugin, .notSentToPlugin, "it answers fault \(decision.faultID), which was not sent to it")
      return
    }
    let id = decision.faultID
    let client = entry.client
    let page = entry.page
    let pageSize = entry.pageSize
    ledger.move(id, to: .handling)
    guard let kind = decision.kind else {
      refuse(decision, from: plugin, .unknownKind, "unknown decision kind")
      return park(id)
    }
    if kind == .retry {
      statistics.retries += 1
      plugin.route?.retries += 1
      return park(id)
    }
    // The range went away (or changed) while the plugin decided: the
    // redelivery finds out what the page is now.
    guard let piece = client.regions.piece(containing: page), !piece.isNewMemory, piece.spec.pageSize == pageSize else { return park(id) }
    let start = decision.length == 0 ? page : decision.address
    let length = decision.length == 0 ? pageSize : decision.length
    let mask = UInt(pageSize - 1)
    // In region offsets (stable across munmap and mremap), the range must lie inside the region as registered.
    let startOffset = Int(bitPattern: UInt(truncatingIfNeeded: piece.offset) &+ (start &- piece.live.lowerBound))
    guard start & mask == 0, UInt(length) & mask == 0, page >= start, page - start < UInt(length),
          startOffset >= 0, length <= piece.spec.length - startOffset
    else {
      refuse(decision, from: plugin, .badRange, "range 0x\(String(start, radix: 16)) + \(length) is not whole \(pageSize)-byte pages of region \(piece.spec.id), or misses the faulting page")
      return park(id)
    }
    // A prefetch may reach parts of the region that were unmapped or moved
    // away since: fill only what is live here, around the faulting page.
    var range = (start..<start + UInt(length)).clamped(to: piece.live)
    // Nor pages no one can vouch for (lost with a plugin, or in the cover of a
    // drop record too fragmented to list): they fail closed when they fault, and
    // the plugin does not know what they must read. A prefetch over them fills
    // the faulting page alone; a fault whose own page became one is routed again.
    if !client.lostPages.isEmpty, let lost = client.lostPages[piece.spec.id],
       !lost.clamped(to: piece.offset(of: range.lowerBound)..<piece.offset(of: range.lowerBound) + UInt64(range.count)).isEmpty {
      if lost.contains(piece.offset(of: page)) { return park(id) }
      range = page..<page + UInt(pageSize)
    }
    let skip = Int(range.lowerBound - start)
    var source = FillOrder.Source.none
    if kind == .copy, let offset = decision.sharedOffset {
      // UFFDIO_COPY reads its source in small pages, whatever the target's page.
      guard offset & UInt64(self.pageSize - 1) == 0, offset <= UInt64(plugin.sharedAreaSize), UInt64(length) <= UInt64(plugin.sharedAreaSize) - offset else {
        refuse(decision, from: plugin, .outsideSharedArea, "shared bytes at \(offset) + \(length) are outside its shared area")
        return park(id)
      }
      source = .sharedArea(plugin.id, offset: offset + UInt64(skip))
    } else if kind == .copy {
      guard decision.data.count == length else {
        refuse(decision, from: plugin, .wrongLength, "copy of \(length) bytes carries \(decision.data.count)")
        return park(id)
      }
      source = .bytes(UnsafeRawBufferPointer(rebasing: decision.data[skip..<skip + range.count]))
    }
    if client.invalidations.isStale(range, since: sequence) {
      // A remove/unmap/remap of this range was read after the fault was sent:
      // the plugin decided on old state. It has seen the event by now; ask again.
      statistics.staleDecisionsDropped += 1
      plugin.route?.staleDecisionsDropped += 1
      return park(id)
    }
    fill(kind, range, source: source, fault: id, purpose: .decision(plugin.id))
  }

  /// The outcome of a fill the engine ordered.
  public func filled(_ order: FillOrder, outcome: IoctlOutcome, now: UInt64) {
    self.now = now
    if case .stream = order.purpose { return streamFilled(order, outcome: outcome) }
    guard let entry = ledger[order.fault], case .handling = entry.state else { return }  // its client went meanwhile
    // A range fill stops at the first page already present (EEXIST) or after a
    // partial copy, and neither says anything of the faulting page further in
    // (a page dropped by MADV_DONTNEED behind a present one: a balloon). Unless
    // the whole range was filled, or nothing could be (EAGAIN), the faulting
    // page is filled alone, and only its own outcome settles the fault.
    if order.range.count > order.pageSize, outcome != .done, outcome != .notNow {
      actions.append(.fill(order.alone()))
      return
    }
    switch order.purpose {
    case .decision where order.pageCache != nil && outcome.isFailure:
      return failClosed(order.fault, Self.sharedMemoryFailure(outcome))
    case .decision(let pluginID):
      if case .failed(.badAddress) = outcome {
        // The kernel could not read the bytes: a shared area the plugin cannot back (a hugetlb pool run dry).
        if let plugin = plugins[pluginID] { refuse(order.fault, from: plugin, .unreadableBytes, "its bytes could not be read (EFAULT)") }
        return park(order.fault)
      }
      if case .failed(.invalidArgument) = outcome {
        // The kernel refuses the fill itself: the memory's page is not the one the region names
        // (huge pages registered as small ones). Asking again would loop.
        return failClosed(order.fault, "the kernel refused the fill (EINVAL): the region's page size is not its memory's")
      }
      // Zeros copied (a swap-out write-protects the range) were a zero decision.
      let kind: DecisionKind = if case .zeros = order.source { .zero } else { order.kind }
      statistics.decisionsApplied += 1
      statistics.decisionsAppliedByKind.count(kind)
      statistics.faultsResolved += 1
      faultLatency.record(now >= entry.readAt ? now - entry.readAt : 0)
      if let route = plugins[pluginID]?.route {
        route.decisionsApplied += 1
        route.decisionsAppliedByKind.count(kind)
      }
    case .delegated:
      if case .failed(let errno) = outcome, errno != .badAddress {
        // The delegated file cannot be read: its plugin serves the fault instead.
        log(.warning, "a delegated file cannot be read: the fault goes to the plugin", ["client.id": "\(entry.client.id)", "errno": "\(errno)"])
        if let piece = entry.client.regions.piece(containing: entry.page), !piece.isNewMemory { return sendToPlugin(order.fault, piece: piece) }
        return park(order.fault)
      }
      if order.pageCache != nil && outcome.isFailure { return failClosed(order.fault, Self.sharedMemoryFailure(outcome)) }
      statistics.resolvedLocally += 1
      statistics.faultsResolved += 1
      faultLatency.record(now >= entry.readAt ? now - entry.readAt : 0)
    case .newMemory:
      if outcome.isResolved { statistics.newMemoryFills += 1 }
    case .failClosed(let cause):
      switch outcome {
      case .notNow, .partial: return park(order.fault)  // a map change not yet read: the events may place it after all
      case .rangeGone, .alreadyPresent: break  // not ours after all, or filled meanwhile: the wake settles it
      case .done, .targetExited, .failed:
        statistics.failedClosed += 1
        report(.error, "failed a fault closed", .faultFailedClosed, uid: entry.client.peer.uid, [
          "client.id": "\(entry.client.id)", "client.pid": "\(entry.client.pid)", "fault.address": "0x\(String(entry.page, radix: 16))",
          "cause": "\(cause)", "action": "\(outcome == .done ? "poisoned (SIGBUS at the access)" : "client killed")",
        ])
        if case .failed = outcome { actions.append(.kill(entry.client.id)) }
      }
    case .pluginFailed, .stream:
      break
    case .minor:
      if case .failed(.badAddress) = outcome {
        // The page left the file's cache since the fault (a hole punched, the file
        // truncated): a missing page now, which its plugin (or delegation) serves.
        ledger.clearMinor(order.fault)
        return park(order.fault)
      }
      if outcome.isFailure { return failClosed(order.fault, Self.sharedMemoryFailure(outcome)) }
      if outcome.isResolved {
        statistics.minorFaultsResolved += 1
        statistics.faultsResolved += 1
        faultLatency.record(now >= entry.readAt ? now - entry.readAt : 0)
      }
    }
    settle(order.fault, outcome)
  }

  /// Why a fill of shared memory failed, for the fault failed closed.
  static func sharedMemoryFailure(_ outcome: IoctlOutcome) -> String {
    "the shared-memory file could not be filled or mapped (\(outcome)): a range not registered in minor mode, or a file truncated under its mapping"
  }

  /// What process `pid`'s mappings say of `page`, an address the region table
  /// has no piece for: the mapping holding it, or nil if none does.
  public func inspected(_ id: ClientID, page: UInt, mapping: Range<UInt>?, now: UInt64) {
    self.now = now
    guard let client = clients[id], let fault = ledger.id(client: id, page: page), case .handling? = ledger[fault]?.state else { return }
    // The inspection of another fault of the same read may have placed it since
    // (the first fault in a grown tail records the whole stretch).
    if client.regions.piece(containing: page) != nil { return routeFault(fault) }
    guard let mapping else {
      // Unmapped, or replaced by memory this uffd does not serve: the access re-faults against what is there now.
      // Its page size is not known here: where huge pages may be, the huge page around it is woken
      // (a thread in a huge page waits at an address anywhere in it).
      let size = UInt(client.regions.mayHaveHugePages ? pageSizes.max() ?? pageSize : pageSize)
      actions.append(.wake(client.id, page & ~(size - 1)..<(page & ~(size - 1)) + size))
      client.noteWoken(page)
      return ledger.settle(fault)
    }
    if let range = client.regions.newMemory(around: page, in: mapping) {
      client.regions.addNewMemory(range)
      // New memory of its region's page size: routed as a fault there (entered again at a huge page's start).
      if client.regions.piece(containing: page) != nil { return routeFault(fault) }
    }
    failClosed(fault, "the fault is in registered memory the broker's region table does not cover")
  }

  // MARK: - Map events

  private func removed(_ range: Range<UInt>, client: Client, notices: inout [Client.Notice]) {
    client.forgetWakes(in: range)
    client.invalidations.record(range, faultsOut: client.faultsOut > 0)
    // A swap-out drops pages whose content the plugin has just stored.
    // Shared memory is left out: a dropped page reads its file again, not zeros,
    // and its plugin serves what the file lacks as before (see `RegionSpec.Backing`).
    var parts = client.regions.overlapping(range)
    if client.sharedMemory != nil { parts.removeAll { $0.piece.spec.isSharedMemory } }
    report(parts, of: client, removed: true, swappedOut: client.isSwappingAll(of: range))
    notices += parts.filter { !$0.piece.isNewMemory }.map { .dropped($0.piece.spec.id) }
  }

  private func unmapped(_ range: Range<UInt>, client: Client, notices: inout [Client.Notice]) {
    client.forgetWakes(in: range)
    client.invalidations.record(range, faultsOut: client.faultsOut > 0)
    let parts = client.regions.unmap(range)
    report(parts, of: client, removed: false)
    notices += parts.filter { !$0.piece.isNewMemory }.map { .layout($0.piece.spec.id) }
  }

  private func remapped(from: UInt, to: UInt, length: Int, client: Client, notices: inout [Client.Notice]) {
    let source = from..<from + UInt(length)
    let destination = to..<to + UInt(length)
    client.forgetWakes(in: source)
    client.forgetWakes(in: destination)
    client.invalidations.record(source, destination, faultsOut: client.faultsOut > 0)
    let moved = client.regions.move(from: from, to: to, length: length).filter { !$0.isNewMemory }
    notices += moved.map { .layout($0.spec.id) }
    for piece in moved {
      let newBase = piece.live.lowerBound &- UInt(piece.offset)
      sendEvent(.remapped(RemapEvent(clientID: client.id, regionID: piece.spec.id, from: from + (piece.live.lowerBound - to), to: piece.live.lowerBound, length: piece.live.count, newBase: newBase)), to: piece.route)
    }
  }

  /// Records removed or unmapped parts, takes them back from delegations (their
  /// next faults go to the plugin) and tells each part's plugin, in order.
  /// - removed by a swap-out: the plugin holds their content now;
  /// - removed otherwise: zeros from now on, and remembered as dropped;
  /// - unmapped: gone, so forgotten by every record.
  private func report(_ parts: [(piece: RegionTable.Piece, range: Range<UInt>)], of client: Client, removed: Bool, swappedOut: Bool = false) {
    for part in parts where !part.piece.isNewMemory {
      let start = part.piece.offset(of: part.range.lowerBound)
      let offsets = start..<start + UInt64(part.range.count)
      let regionID = part.piece.spec.id
      if swappedOut {
        statistics.swappedOutBytes += UInt64(part.range.count)
        client.swappedOutPages[regionID, default: OffsetRanges()].insert(offsets)
        client.droppedPages[regionID]?.subtract(offsets)
      } else {
        client.forgetSwapped(regionID: regionID, offsets)
        if removed { client.droppedPages[regionID, default: OffsetRanges()].insert(offsets) } else { client.droppedPages[regionID]?.subtract(offsets) }
      }
      if client.droppedPages[regionID]?.isEmpty == true { client.droppedPages[regionID] = nil }
      changeDelegations(of: client) { $0.cut(regionID: regionID, offsets) }
      let event = RangeEvent(clientID: client.id, regionID: regionID, range: part.range, startOffset: start, swappedOut: swappedOut)
      sendEvent(removed ? .removed(event) : .unmapped(event), to: part.piece.route)
    }
  }

  // MARK: - Routing

  /// Decides what a fault in state `.handling` needs: held, sent to its
  /// plugin, filled by the broker, parked, or failed closed.
  func routeFault(_ id: FaultLedger.ID) {
    guard let entry = ledger[id] else { return }
    let client = entry.client
    let page = entry.page
    let flags = entry.fault.flags
    if flags.contains(.writeProtect) {
      // Only swap-outs write-protect: hold the writer until its page is either
      // dropped (it then faults the stored copy back in) or kept and unprotected.
      if client.isSwapping(page..<page + UInt(entry.pageSize)) {
        ledger.move(id, to: .held)
      } else {
        actions.append(.writeProtect(client.id, page..<page + UInt(entry.pageSize), protect: false, swapOut: nil))
        ledger.settle(id)
      }
      return
    }
    // A forked child's faults wait until its plugins have taken its regions.
    if client.phase == .opening { return park(id) }
    // The rare cases first, each behind one emptiness test: the fault path pays no lookup for them.
    let wakes = client.takeWakes(of: page)
    if wakes >= Client.wakeLimit { return failClosed(id, "it was woken \(wakes) times and faulted again each time") }
    guard let piece = client.regions.piece(containing: page) else { return placeUnknown(id, client: client, page: page) }
    // Read before its region was placed (a fault of a region still opening): entered again at its region's page.
    if piece.spec.pageSize != entry.pageSize { return reenter(id, pageSize: piece.spec.pageSize) }
    if piece.isNewMemory { return fillNewMemory(id, piece: piece) }
    // The page is in the shared-memory file's cache (filled for another client,
    // or before a MADV_DONTNEED): it is the file's content, mapped with no round trip.
    if flags.contains(.minor) && piece.spec.isSharedMemory {
      return fill(.copy, page..<page + UInt(entry.pageSize), source: .pageCache, fault: id, purpose: .minor)
    }
    if !client.lostPages.isEmpty, client.lostPages[piece.spec.id]?.contains(piece.offset(of: page)) == true {
      return failClosed(id, "its swapped-out content was lost with its plugin")
    }
    if !client.refusedRegions.isEmpty && client.refusedRegions.contains(piece.spec.id) {
      return failClosed(id, "its plugin does not serve this forked child")
    }
    if !client.delegated.isEmpty, let range = client.delegated.range(regionID: piece.spec.id, offset: piece.offset(of: page)) {
      return fillDelegated(id, piece: piece, range: range, write: flags.contains(.write))
    }
    sendToPlugin(id, piece: piece)
  }

  /// Sends a fault to its region's plugin; parks it while the plugin is away or
  /// busy; poisons it if the plugin failed for good.
  private func sendToPlugin(_ id: FaultLedger.ID, piece: RegionTable.Piece) {
    guard let entry = ledger[id] else { return }
    let route = piece.route.effective
    if route.failed {
      // Failed closed: the access gets SIGBUS, never memory the plugin did not provide.
      return fill(.poison, entry.page..<entry.page + UInt(entry.pageSize), fault: id, purpose: .pluginFailed)
    }
    guard let plugin = route.connection, !plugin.isClosed, plugin.inFlight < configuration.maxInFlightPerPlugin else { return park(id) }
    let faultID = ledger.move(id, to: .inFlight(plugin: plugin, sequence: entry.client.invalidations.sequence, sentAt: now))
    actions.append(.send(plugin.id, .pagefault(PagefaultEvent(
      faultID: faultID, clientID: entry.client.id, regionID: piece.spec.id, address: entry.page,
      offset: piece.offset(of: entry.page), flags: entry.fault.flags.subtracting(.minor), threadID: entry.fault.thread))))
    statistics.faultsSent += 1
    route.faultsSent += 1
    if entry.attempts > 0 { route.redeliveries += 1 }
  }

  /// A fault where the table has no piece. Waking it blindly would livelock a
  /// thread whose memory the kernel still has registered (it faults again at
  /// once), so the kernel's mappings decide (`inspected`):
  /// - unmapped, or replaced by memory this uffd does not serve: wake it;
  /// - a region still being opened: park it until its plugin accepts;
  /// - memory registered without an event (a grown tail, a `DONTUNMAP` source):
  ///   new memory, filled with zeros from now on;
  /// - anything else: the table lost track of it. Fail closed (poison).
  /// Each fill checks with the kernel that no map change is pending (EAGAIN
  /// while one is queued), so an event not yet read only delays the decision.
  private func placeUnknown(_ id: FaultLedger.ID, client: Client, page: UInt) {
    if client.pendingOpen?.regions.contains(where: { $0.range.contains(page) }) == true { return park(id) }
    // A forked child has no pid to read the mappings of: poison tells (ENOENT where unregistered).
    if client.isForkedChild { return failClosed(id, "a forked child's fault outside its table") }
    actions.append(.inspect(client.id, pid: client.pid, page: page))
  }

  /// Fills a fault in new memory (a grown tail, a `DONTUNMAP` source) with
  /// zeros, as the kernel would fill fresh anonymous memory: an aligned block
  /// of up to `maxLocalFillPages` pages (in a huge-page region, its huge page) around it, inside the piece.
  private func fillNewMemory(_ id: FaultLedger.ID, piece: RegionTable.Piece) {
    guard let page = ledger[id]?.page else { return }
    // Past a shared-memory region lies more of its file, not zeros: the broker does not know which part.
    if piece.spec.isSharedMemory { return failClosed(id, "the fault is in memory grown past a shared-memory region") }
    let block = UInt(Self.localFillBytes(pageSize: piece.spec.pageSize, systemPageSize: pageSize))
    let range = (page / block * block..<page / block * block + block).clamped(to: piece.live)
    fill(.zero, range, fault: id, purpose: .newMemory)
  }

  /// The broker-local fast path: fills a fault from a delegated range with no round trip.
  private func fillDelegated(_ id: FaultLedger.ID, piece: RegionTable.Piece, range: DelegatedRanges.Range, write: Bool) {
    guard let page = ledger[id]?.page else { return }
    let offset = piece.offset(of: page)
    let pageSize = piece.spec.pageSize
    // An aligned block around the fault, inside the delegated range and the live piece.
    let block = range.faultBlock(pageSize: pageSize, systemPageSize: self.pageSize)
    let start = max(offset / block * block, range.offsets.lowerBound, piece.offset)
    let end = min(offset / block * block + block, range.offsets.upperBound, piece.offset + UInt64(piece.live.count))
    guard let address = piece.address(ofOffset: start) else { return park(id) }
    switch range.source {
    case .zero where write:
      // A write to a zero page would take a second, copy-on-write fault: copy zeros.
      fill(.copy, page..<page + UInt(pageSize), source: .zeros, fault: id, purpose: .delegated)
    case .zero:
      fill(.zero, address..<address + UInt(end - start), fault: id, purpose: .delegated)
    case .file(let file, _):
      fill(.copy, address..<address + UInt(end - start), source: .file(file, offset: range.fileOffset(of: start)!), fault: id, purpose: .delegated)
    }
  }

  /// Fails a fault the broker cannot place closed: the page is poisoned, so the
  /// access gets SIGBUS instead of zeros or a thread woken forever; where the
  /// uffd cannot poison, the client is killed. Logged and counted.
  func failClosed(_ id: FaultLedger.ID, _ cause: String) {
    guard let entry = ledger[id] else { return }
    fill(.poison, entry.page..<entry.page + UInt(entry.pageSize), fault: id, purpose: .failClosed(cause))
  }

  /// Orders a fill for fault `id`. While a swap-out runs, every fill reaching
  /// into it is write-protected, so no write escapes it; zeros are then copied
  /// (the shared zero page is read-only to the kernel, not to uffd-wp).
  private func fill(_ kind: DecisionKind, _ range: Range<UInt>, source: FillOrder.Source = .none, fault id: FaultLedger.ID, purpose: FillOrder.Purpose) {
    guard let entry = ledger[id] else { return }
    fill(kind, range, source: source, client: entry.client, page: entry.page, pageSize: entry.pageSize, fault: id, purpose: purpose)
  }

  /// Orders a fill of `client`'s `range` of `pageSize`-byte pages around `page`.
  func fill(_ kind: DecisionKind, _ range: Range<UInt>, source: FillOrder.Source, client: Client, page: UInt, pageSize: Int, fault id: FaultLedger.ID, purpose: FillOrder.Purpose) {
    let protect = client.isSwapping(range)
    let cache = kind == .poison ? nil : pageCache(of: range, client: client)
    // hugetlbfs has no UFFDIO_ZEROPAGE, nor has shmem: a (huge) page of zeros is copied.
    let zerosByCopy = kind == .zero && (protect || pageSize != self.pageSize || cache != nil)
    actions.append(.fill(FillOrder(
      client: client.id, kind: zerosByCopy ? .copy : kind, range: range, source: zerosByCopy ? .zeros : source,
      writeProtect: protect, pageCache: cache, fault: id, page: page, pageSize: pageSize, purpose: purpose)))
  }

  /// Where a fill of `range` (inside one piece) goes first, if it is shared
  /// memory: the file offset it maps. One emptiness test for other clients.
  private func pageCache(of range: Range<UInt>, client: Client) -> FillOrder.PageCache? {
    guard let file = client.sharedMemory, let piece = client.regions.piece(containing: range.lowerBound),
          case .sharedMemory(let fileOffset) = piece.spec.backing
    else { return nil }
    return FillOrder.PageCache(file: file, offset: fileOffset + piece.offset(of: range.lowerBound))
  }

  /// What an ioctl's outcome means for a fault. An outcome that only wakes the
  /// thread (the page exists, or the range is gone) is counted: a page woken
  /// again and again without an event in between is not progressing, and its
  /// next fault fails closed (`routeFault`).
  private func settle(_ id: FaultLedger.ID, _ outcome: IoctlOutcome) {
    guard let entry = ledger[id] else { return }
    switch outcome {
    case .done, .targetExited:
      ledger.settle(id)
    case .alreadyPresent, .rangeGone:
      entry.client.noteWoken(entry.page)
      actions.append(.wake(entry.client.id, entry.page..<entry.page + UInt(entry.pageSize)))
      ledger.settle(id)
    case .partial, .notNow, .failed:
      park(id)
    }
  }

  // MARK: - Redelivery

  static let backoffBase: UInt64 = 1_000_000
  static let backoffCap: UInt64 = 64_000_000

  /// Parks a fault for redelivery: after the client's next map event, or its
  /// backoff deadline. A parked page never delays other pages.
  func park(_ id: FaultLedger.ID) {
    guard let attempts = ledger[id]?.attempts else { return }
    let backoff = min(Self.backoffBase << UInt64(min(attempts, 6)), Self.backoffCap)
    ledger.move(id, to: .parked(notBefore: now + backoff))
  }

  /// Delivers again every parked fault of `client` (a map event may have unblocked them).
  func redeliverParked(of client: Client) {
    redeliver(ledger.takeParked { $0.client === client })
  }

  /// Delivers again the parked faults whose backoff deadline has passed.
  func redeliverDue() {
    let now = now
    redeliver(ledger.takeParked { fault in
      guard case .parked(let due) = fault.state else { return false }
      return due <= now
    })
  }

  /// Enters fault `id` again at its region's page of `pageSize` bytes (merged
  /// into a fault of that page already outstanding, whose fill wakes it too).
  private func reenter(_ id: FaultLedger.ID, pageSize: Int) {
    guard let entry = ledger[id] else { return }
    ledger.settle(id)
    let page = entry.fault.address & ~UInt(pageSize - 1)
    guard ledger.id(client: entry.client.id, page: page) == nil else { return }
    routeFault(ledger.enter(entry.fault, page: page, pageSize: pageSize, client: entry.client, now: entry.readAt))
  }

  private func redeliver(_ ids: [FaultLedger.ID]) {
    for id in ids {
      guard let fault = ledger[id], fault.client.phase != .closed else { continue }
      statistics.redeliveries += 1
      ledger.move(id, to: .handling)
      routeFault(id)
    }
  }
}
