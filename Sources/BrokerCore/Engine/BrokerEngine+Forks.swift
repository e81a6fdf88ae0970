import BrokerProtocol

extension BrokerEngine {
  /// A client forked; the child's copy of the registered memory faults to the
  /// uffd the runtime holds under `ticket`. The child becomes a client of its
  /// own with the parent's table as of the fork, and each region is offered to
  /// its plugin as the parent's copy (RegionOpened naming the parent). Its uffd
  /// is read at once (its faults wait until the plugins answer); a region
  /// refused, or of a plugin that has failed, fails closed in the child. The
  /// kernel does not name the child: it has no pid here, and its exit is found
  /// by probing its uffd (`tick`).
  func adoptFork(_ ticket: ForkTicket, wipedOnFork wiped: [Range<UInt>], of parent: Client) {
    let limit = clients.count >= configuration.maxClients ? "maxClients"
      : clientCount(ofUID: parent.peer.uid) >= configuration.maxClientsPerUID ? "maxClientsPerUID" : nil
    if let limit {
      // Forked children count as clients (of their parent's uid): past a limit,
      // one is not served, so what it never had fails closed (poisoned, and its uffd let go).
      report(.error, "a forked child exceeds \(limit): its unfilled pages fail closed", .forkRefused, cause: BrokerError.Code.limit.name, uid: parent.peer.uid,
             ["client.id": "\(parent.id)", "clients": "\(clients.count)", "peer.uid": "\(parent.peer.uid)"])
      actions.append(.failChild(ticket, parent.regions.pieces.map(\.live)))
      return
    }
    let child = Client(id: takeID(), peer: parent.peer, hasSocket: false, connectedAt: now)
    actions.append(.adoptChild(ticket, child: child.id))
    // First of all (the window in which a broker killed leaves the child
    // unprotected stays microseconds): the nearest connected ancestor keeps a
    // copy of the child's uffd, which otherwise lives only here.
    if let keeper = parent.hasSocket ? parent : keeper(of: parent) {
      actions.append(.keepChild(keeper: keeper.id, child: child.id, notice: BrokerReply(requestID: 0, .forked(childID: child.id, pieces: parent.regions.layout()))))
    }
    child.parentID = parent.id
    child.token = makeToken()
    child.phase = .opening
    child.regions = parent.regions
    // The kernel gives a child's copy of a WIPEONFORK mapping fresh pages, which fault to its uffd.
    for range in wiped { child.regions.makeNewMemory(range) }
    child.delegated = parent.delegated
    child.sharedMemory = parent.sharedMemory
    child.delegated.streams = []  // the parent's restore, not the child's
    child.refusedRegions = parent.refusedRegions
    child.swappedOutPages = parent.swappedOutPages
    child.lostPages = parent.lostPages
    child.droppedPages = parent.droppedPages
    clients[child.id] = child
    actions.append(.watchChild(child.id))
    var seen = Set<UInt64>()
    let specs = child.regions.pieces.filter { !$0.isNewMemory && seen.insert($0.spec.id).inserted }.map(\.spec)
    log(.info, "client forked", ["client.id": "\(parent.id)", "child.id": "\(child.id)", "regions": "\(specs.count)"])
    do {
      try openRegions(specs, client: child, requestID: 0)
    } catch {
      failOpen(child, error)
    }
    if child.phase == .opening && child.pendingOpen == nil { activate(child, requestID: 0) }
  }

  /// A probe found a forked child gone (it exited, or exec'd).
  public func probed(_ id: ClientID, exited: Bool, now: UInt64) {
    self.now = now
    guard exited, let client = clients[id] else { return }
    closeClient(client, BrokerError(.disconnected, "the forked child exited"))
  }
}
