import BrokerProtocol
import Userfaultfd

/// The descriptors a client request carried, as the runtime found them.
public enum AttachedDescriptors: Sendable {
  case none
  /// One userfaultfd, with the features the kernel enabled on it.
  case userfaultfd(UserfaultFD.Features)
  /// A userfaultfd and, after it, the file of its shared-memory regions: as
  /// the runtime holds it, or why the runtime refused it.
  case userfaultfdAndFile(UserfaultFD.Features, Result<SharedMemoryFile, BrokerError>)
  /// One descriptor that is not a userfaultfd that ran UFFDIO_API (why, said by the error).
  case notUserfaultfd(BrokerError)
  case several(Int)
}

/// A client's shared-memory file (a memfd), held by the runtime: the engine names it only.
public struct SharedMemoryFile: Sendable, Equatable {
  public var handle: FileHandle
  /// Its size when it was attached: shared-memory regions must lie inside it.
  public var size: UInt64
  public init(handle: FileHandle, size: UInt64) {
    self.handle = handle
    self.size = size
  }
}

extension BrokerEngine {
  // MARK: - Inputs

  /// A client connected with `peer`'s credentials (`isVMM`: a VMM, to a
  /// Firecracker socket). Returns its id, or the error to refuse it with (the
  /// runtime sends it and closes the socket).
  public func clientConnected(_ peer: PeerCredentials, isVMM: Bool = false, now: UInt64) -> Result<ClientID, BrokerError> {
    self.now = now
    guard Self.allows(peer, uids: configuration.clientUIDs, gids: configuration.clientGIDs) else {
      report(.warning, "refused a client", .clientRefused, cause: BrokerError.Code.notAuthorized.name, uid: peer.uid, ["peer.uid": "\(peer.uid)", "peer.pid": "\(peer.pid)", "reason": "uid not allowed"])
      return .failure(BrokerError(.notAuthorized, "uid \(peer.uid) may not register memory with this broker"))
    }
    guard clients.count < configuration.maxClients else {
      report(.warning, "refused a client", .clientRefused, cause: BrokerError.Code.limit.name, uid: peer.uid, ["peer.uid": "\(peer.uid)", "reason": "maxClients"])
      return .failure(BrokerError(.limit, "the broker serves its maximum of \(configuration.maxClients) clients"))
    }
    // One uid must not take every slot from the others (its forked children count too).
    guard clientCount(ofUID: peer.uid) < configuration.maxClientsPerUID else {
      report(.warning, "refused a client", .clientRefused, cause: BrokerError.Code.limit.name, uid: peer.uid, ["peer.uid": "\(peer.uid)", "reason": "maxClientsPerUID"])
      return .failure(BrokerError(.limit, "uid \(peer.uid) has its maximum of \(configuration.maxClientsPerUID) clients connected"))
    }
    let client = Client(id: takeID(), peer: peer, hasSocket: true, isVMM: isVMM, connectedAt: now)
    clients[client.id] = client
    log(.debug, "client connection accepted", ["client.id": "\(client.id)", "peer.pid": "\(peer.pid)", "peer.uid": "\(peer.uid)"])
    return .success(client.id)
  }

  /// Clients of `uid`, forked children included.
  func clientCount(ofUID uid: UInt32) -> Int {
    clients.values.lazy.filter { $0.peer.uid == uid }.count
  }

  /// A request from a client. A malformed or out-of-place one is refused and
  /// ends the connection; so does a refused registration.
  public func clientRequest(_ id: ClientID, _ request: ClientRequest, descriptors: AttachedDescriptors, now: UInt64) {
    self.now = now
    guard let client = clients[id], client.phase != .closed else { return }
    do {
      try handle(request, descriptors: descriptors, client: client)
    } catch {
      refuse(request.requestID, of: client, error)
    }
  }

  /// The client's connection failed (a packet too large, a socket error): it is told `error` and closed.
  public func clientFailed(_ id: ClientID, _ error: BrokerError, now: UInt64) {
    self.now = now
    guard let client = clients[id] else { return }
    reply(client, BrokerReply(requestID: 0, .error(error)))
    closeClient(client, error)
  }

  /// A request that could not be decoded: refused; a malformed one (or any
  /// before the client is active) ends the connection.
  public func undecodableRequest(_ id: ClientID, _ error: BrokerError, now: UInt64) {
    self.now = now
    guard let client = clients[id] else { return }
    refuse(0, of: client, error)
  }

  /// The client is gone (its socket closed, its process exited, a send failed).
  public func clientGone(_ id: ClientID, _ why: BrokerError, now: UInt64) {
    self.now = now
    guard let client = clients[id] else { return }
    closeClient(client, why)
  }

  /// Watching the client's uffd or process failed: it cannot be served.
  public func watchFailed(_ id: ClientID, _ error: BrokerError, now: UInt64) {
    self.now = now
    guard let client = clients[id] else { return }
    if client.isForkedChild {
      // Unread, the child's faults would hang: fail them closed instead.
      log(.error, "cannot watch a forked child's userfaultfd: its memory fails closed", ["client.id": "\(client.parentID)", "error": "\(error)"])
      for piece in client.regions.pieces { actions.append(.poisonMissing(client.id, piece.live)) }
    } else {
      reply(client, BrokerReply(requestID: 0, .error(error)))
    }
    closeClient(client, error)
  }

  /// A notice could not be sent (the client's socket is full): kept for the next sweep.
  public func noticeNotSent(_ id: ClientID, _ notice: BrokerReply) {
    switch notice.body {
    case .layout(let region, _): clients[id]?.unsent.insert(.layout(region))
    case .dropped(let region, _, _): clients[id]?.unsent.insert(.dropped(region))
    default: break
    }
  }

  /// Whether the client has notices the engine could not send yet (its socket
  /// was full): until they go, its read journal stays unsettled.
  public func hasUnsentNotices(_ id: ClientID) -> Bool {
    clients[id].map { !$0.unsent.isEmpty } ?? false
  }

  /// Whether credentials are allowed by uid, or by primary gid.
  static func allows(_ peer: PeerCredentials, uids: Set<UInt32>, gids: Set<UInt32>) -> Bool {
    uids.contains(peer.uid) || gids.contains(peer.gid)
  }

  // MARK: - Requests

  private func handle(_ request: ClientRequest, descriptors: AttachedDescriptors, client: Client) throws(BrokerError) {
    if case .several(let count) = descriptors, case .register = request.body {
      throw BrokerError(.notUserfaultfd, "Register carries the client's userfaultfd and, for shared memory, its file: no more (got \(count) descriptors)")
    }
    switch (client.phase, request.body) {
    case (.awaitingHello, .hello(let hello)):
      guard case .none = descriptors else { throw BrokerError(.malformed, "Hello must not carry descriptors") }
      guard hello.version == brokerProtocolVersion, hello.role == .client else {
        throw BrokerError(.version, "this broker speaks protocol \(brokerProtocolVersion) to clients; got version \(hello.version) role \(hello.role)")
      }
      client.phase = .awaitingRegister
      reply(client, BrokerReply(requestID: request.requestID, .hello(Hello(role: .broker, name: "uffd-broker"))))
    case (.awaitingRegister, .register(let register)):
      try beginRegistration(client, register, descriptors: descriptors, requestID: request.requestID)
    case (.active, .addRegions(let specs)):
      guard case .none = descriptors else { throw BrokerError(.malformed, "AddRegions must not carry descriptors") }
      guard client.pendingOpen == nil else { throw BrokerError(.malformed, "another request is still pending") }
      if let shared = specs.first(where: \.isSharedMemory) {
        throw BrokerError(.badRegion, "region \(shared.id) is shared memory: those are registered with Register, which carries their file")
      }
      guard client.regions.pieces.count + specs.count <= configuration.maxRegionsPerClient else {
        throw BrokerError(.limit, "a client may register at most \(configuration.maxRegionsPerClient) regions")
      }
      try client.regions.validate(specs, pageSizes: pageSizes)
      try openRegions(specs, client: client, requestID: request.requestID)
    case (.active, .removeRegions(let ids)):
      guard case .none = descriptors else { throw BrokerError(.malformed, "RemoveRegions must not carry descriptors") }
      for id in ids {
        guard let route = client.regions.pieces.first(where: { $0.spec.id == id })?.route else {
          throw BrokerError(.badRegion, "region \(id) is not registered")
        }
        client.regions.remove(regionID: id)
        client.droppedPages[id] = nil
        changeDelegations(of: client) { $0.removeAll(regionID: id) }
        client.announcedRegions[id] = nil
        sendEvent(.regionClosed(clientID: client.id, regionID: id), to: route)
      }
      reply(client, BrokerReply(requestID: request.requestID, .ack(clientID: client.id)))
    case (.active, .swapOut), (.active, .swapOutData), (.active, .swapOutDone):
      guard case .none = descriptors else { throw BrokerError(.malformed, "a swap-out request must not carry descriptors") }
      try swapRequest(request, client: client)
    default:
      throw BrokerError(.malformed, "unexpected message in this state of the connection")
    }
  }

  private func beginRegistration(_ client: Client, _ register: RegisterRequest, descriptors: AttachedDescriptors, requestID: UInt64) throws(BrokerError) {
    let granted: UserfaultFD.Features
    var file: Result<SharedMemoryFile, BrokerError>?
    switch descriptors {
    case .userfaultfd(let features): granted = features  // as the kernel enabled them, not as the message says
    case .userfaultfdAndFile(let features, let attached): (granted, file) = (features, attached)
    case .notUserfaultfd(let error): throw error
    case .none: throw BrokerError(.notUserfaultfd, "Register must carry the client's userfaultfd (got no descriptor)")
    case .several(let count): throw BrokerError(.notUserfaultfd, "Register carries the client's userfaultfd and, for shared memory, its file: no more (got \(count) descriptors)")
    }
    guard register.pid == client.peer.pid else {
      throw BrokerError(.notAuthorized, "Register names pid \(register.pid) but the connection is from pid \(client.peer.pid)")
    }
    guard register.regions.count <= configuration.maxRegionsPerClient else {
      throw BrokerError(.limit, "a client may register at most \(configuration.maxRegionsPerClient) regions")
    }
    // A VMM's guest memory is not unmapped or moved while the VM runs; its
    // balloon's drops must still be seen, or they would read old snapshot bytes.
    let needed: UserfaultFD.Features = client.isVMM ? [.eventRemove] : [.eventRemove, .eventUnmap, .eventRemap]
    guard granted.isSuperset(of: needed) else {
      throw BrokerError(.notUserfaultfd, "the userfaultfd lacks features \(needed.subtracting(granted)): the broker needs \(client.isVMM ? "remove events" : "remove, unmap and remap events") to keep memory correct")
    }
    try client.regions.validate(register.regions, pageSizes: pageSizes)
    let sharedMemory = try Self.checkSharedMemory(register.regions, file: file, granted: granted, systemPageSize: pageSize)
    try checkPlugins(of: register.regions)
    actions.append(.adoptUffd(client.id))
    client.sharedMemory = sharedMemory
    client.pid = register.pid
    client.token = register.token != 0 ? register.token : makeToken()
    try openRegions(register.regions, client: client, requestID: requestID)
    client.phase = .opening
    if client.pendingOpen == nil { activate(client, requestID: requestID) }
  }

  /// Shared-memory regions need the file attached after the uffd (and a file
  /// needs them), minor mode on shmem, small pages, and to lie inside the file.
  /// Returns the file's handle.
  static func checkSharedMemory(_ specs: [RegionSpec], file: Result<SharedMemoryFile, BrokerError>?, granted: UserfaultFD.Features, systemPageSize: Int) throws(BrokerError) -> FileHandle? {
    let shared = specs.filter(\.isSharedMemory)
    guard let file else {
      if let first = shared.first {
        throw BrokerError(.badRegion, "region \(first.id) is shared memory, but Register carries no shared-memory file after the userfaultfd")
      }
      return nil
    }
    guard !shared.isEmpty else {
      throw BrokerError(.notUserfaultfd, "Register carries a second descriptor, but no region is shared memory")
    }
    let attached = try file.get()
    guard granted.contains(.minorShmem) else {
      throw BrokerError(.notUserfaultfd, "the userfaultfd lacks minor_shmem (UFFD_FEATURE_MINOR_SHMEM): shared-memory regions are served by minor faults")
    }
    for spec in shared {
      guard case .sharedMemory(let offset) = spec.backing else { continue }
      guard spec.pageSize == systemPageSize else {
        throw BrokerError(.badRegion, "region \(spec.id): shared memory of huge pages (hugetlbfs minor faults) is not supported")
      }
      guard offset & UInt64(systemPageSize - 1) == 0, offset <= attached.size, UInt64(spec.length) <= attached.size - offset else {
        throw BrokerError(.badRegion, "region \(spec.id): file offset \(offset) + \(spec.length) is not page aligned inside the shared-memory file (\(attached.size) bytes)")
      }
    }
    return attached.handle
  }

  private func checkPlugins(of specs: [RegionSpec]) throws(BrokerError) {
    for spec in specs {
      let route = routes[spec.plugin]?.effective
      if route?.failed == true { throw BrokerError(.unknownPlugin, "plugin \"\(spec.plugin)\" has failed and serves no new regions") }
      if route?.connection == nil && !configuration.plugins.contains(where: { $0.name == spec.plugin }) && route?.failover == nil {
        throw BrokerError(.unknownPlugin, "region \(spec.id) names plugin \"\(spec.plugin)\", which is neither configured nor connected")
      }
    }
  }

  /// Announces regions to their plugins; the reply to the client waits for theirs.
  func openRegions(_ specs: [RegionSpec], client: Client, requestID: UInt64) throws(BrokerError) {
    try checkPlugins(of: specs)
    guard !specs.isEmpty else {
      if client.phase == .active { reply(client, BrokerReply(requestID: requestID, .ack(clientID: client.id))) }
      return
    }
    let deadline = now + configuration.registrationTimeout.nanoseconds
    client.pendingOpen = Client.PendingOpen(requestID: requestID, regions: specs, awaiting: Set(specs.map(\.id)), deadline: deadline, sentAt: now)
    log(.debug, "regions announced to their plugins", ["client.id": "\(client.id)", "regions": "\(specs.map(\.id))", "plugins": "\(Set(specs.map(\.plugin)).sorted())"])
    for spec in specs {
      client.announcedRegions[spec.id] = spec.plugin
      client.servedBy.insert(spec.plugin)
      // A client re-attaching says what it swapped out: the plugin is asked whether it still holds it.
      // And what it dropped (the plugin is told), and what no one can vouch for (it fails closed).
      // Not a forked child: its records are its parent's as of the fork, and the specs in its
      // table still carry what the parent re-attached with, long since out of date.
      if !client.isForkedChild {
        if !spec.swappedOut.isEmpty { client.swappedOutPages[spec.id] = OffsetRanges(spec.swappedOut) }
        // Shared memory has no drops: a dropped page reads its file again (a record of one is ignored).
        if !spec.dropped.isEmpty && !spec.isSharedMemory { client.droppedPages[spec.id] = OffsetRanges(spec.dropped) }
        for range in spec.unknown { client.lostPages[spec.id, default: OffsetRanges()].insert(range) }
      }
      // A plugin that is away gets it when it connects (see `announceRegions`).
      if let plugin = route(named: spec.plugin).effective.connection {
        actions.append(.send(plugin.id, regionOpened(spec, of: client)))
        for event in droppedEvents(of: spec, client: client) { actions.append(.send(plugin.id, event)) }
      }
    }
  }

  /// A forked child's region is offered as a copy of its parent's only while
  /// the fork's offer of it awaits an answer (the plugin copies what it holds
  /// of the parent then). Once taken, it is the child's own: a plugin that
  /// restarts opens it afresh, with the child's drop record, as any client's
  /// (the parent's state has moved on since the fork, and the parent may be gone).
  func regionOpened(_ spec: RegionSpec, of client: Client) -> BrokerEvent {
    let forkedFrom = client.pendingOpen?.awaiting.contains(spec.id) == true ? client.parentID : 0
    let credentials = PeerCredentials(pid: client.pid, uid: client.peer.uid, gid: client.peer.gid)
    return .regionOpened(clientID: client.id, client: credentials, region: client.announced(spec), forkedFrom: forkedFrom, token: client.token)
  }

  /// The regions could not be opened: a client is refused (and closed if it
  /// was registering); a forked child keeps its uffd, its regions fail closed.
  func failOpen(_ client: Client, _ error: BrokerError) {
    guard let pending = client.pendingOpen else {
      // A forked child's regions that could not even be offered.
      if client.isForkedChild { refuseForChild(client.regions.pieces.map(\.spec.id), of: client, error) }
      return
    }
    client.pendingOpen = nil
    if client.isForkedChild {
      // Never closed: its uffd is the only thing between the child and zeros.
      refuseForChild(Array(pending.awaiting), of: client, error)
      activate(client, requestID: 0)
      return
    }
    for spec in pending.regions {
      changeDelegations(of: client) { $0.removeAll(regionID: spec.id) }
      client.announcedRegions[spec.id] = nil
      sendEvent(.regionClosed(clientID: client.id, regionID: spec.id), to: route(named: spec.plugin))
    }
    report(.warning, "refused a client's regions", .regionsRefused, cause: error.code.name, uid: client.peer.uid, ["client.id": "\(client.id)", "reason": "\(error)"])
    reply(client, BrokerReply(requestID: pending.requestID, .error(error)))
    if client.phase == .opening { closeClient(client, error) }
  }

  /// Regions of a forked child that will not be served there: their faults fail closed.
  func refuseForChild(_ ids: [UInt64], of client: Client, _ error: BrokerError) {
    client.refusedRegions.formUnion(ids)
    log(.warning, "a forked child's regions fail closed", ["client.id": "\(client.id)", "client.parent": "\(client.parentID)", "regions": "\(ids)", "reason": "\(error)"])
  }

  func activate(_ client: Client, requestID: UInt64) {
    client.phase = .active
    if client.isForkedChild {
      // Watched since its fork; its faults were parked until now.
      redeliverParked(of: client)
      return
    }
    actions.append(.watch(client.id))
    // A client re-attaching after a broker restart may have threads blocked on
    // faults the old broker read and never answered: wake them to fault again.
    // Where its regions lie, and everywhere else: a thread may wait where its
    // memory lay before a move or munmap the old broker read (should a kernel
    // refuse the wide range, the regions' own wakes still go).
    for piece in client.regions.pieces { actions.append(.wake(client.id, piece.live)) }
    actions.append(.wake(client.id, Self.probeAddress..<Self.userAddressEnd))
    report(.info, "client registered", .clientRegistered, uid: client.peer.uid, ["client.id": "\(client.id)", "client.pid": "\(client.pid)", "regions": "\(client.regions.pieces.count)"])
    reply(client, BrokerReply(requestID: requestID, .ack(clientID: client.id)))
  }

  /// Cleans a client up: every region still open is closed for its plugin, and
  /// every plugin a region was ever announced to is told Closed, once, last
  /// (whatever the client unmapped first); its faults are forgotten.
  func closeClient(_ client: Client, _ why: BrokerError) {
    guard client.phase != .closed else { return }
    client.phase = .closed
    ledger.forget(client: client)
    for (id, plugin) in client.announcedRegions.sorted(by: { $0.key < $1.key }) {
      sendEvent(.regionClosed(clientID: client.id, regionID: id), to: route(named: plugin))
    }
    client.announcedRegions.removeAll()
    if client.isForkedChild, let keeper = keeper(of: client) {
      // Whichever ancestor keeps the child's uffd lets it go.
      reply(keeper, BrokerReply(requestID: 0, .childClosed(childID: client.id)))
    }
    for name in client.servedBy.sorted() { sendEvent(.closed(clientID: client.id, reason: why.message), to: route(named: name)) }
    for (storeID, pending) in pendingStores where pending.client === client { pendingStores[storeID] = nil }
    changeDelegations(of: client) { $0 = DelegatedRanges() }
    clients[client.id] = nil
    // Its forked children map the same file.
    if let file = client.sharedMemory, !clients.values.contains(where: { $0.sharedMemory == file }) { actions.append(.releaseFile(file)) }
    actions.append(.close(client.id))
    report(.info, "client closed", .clientClosed, cause: why.code.name, uid: client.peer.uid, ["client.id": "\(client.id)", "client.pid": "\(client.pid)", "reason": "\(why)"])
  }

  /// Refuses a client request with `error`; a malformed one (or any before
  /// the client is active) ends the connection.
  func refuse(_ requestID: UInt64, of client: Client, _ error: BrokerError) {
    report(.warning, "refused a client request", .requestRefused, cause: error.code.name, uid: client.peer.uid,
           ["client.id": "\(client.id)", "peer.pid": "\(client.peer.pid)", "reason": "\(error)"])
    reply(client, BrokerReply(requestID: requestID, .error(error)))
    if error.code == .malformed || client.phase != .active { closeClient(client, error) }
  }

  /// The nearest ancestor of a forked child that is connected: it keeps the child's uffd.
  func keeper(of client: Client) -> Client? {
    var keeper = clients[client.parentID]
    while let current = keeper, !current.hasSocket { keeper = clients[current.parentID] }
    return keeper
  }

  /// Changes a client's delegations; files no client reads any more are released.
  func changeDelegations(of client: Client, _ change: (inout DelegatedRanges) -> Void) {
    let before = client.delegated.isEmpty ? [] : client.delegated.files
    change(&client.delegated)
    guard !before.isEmpty else { return }
    let dropped = before.subtracting(client.delegated.files)
    guard !dropped.isEmpty else { return }
    // A forked child shares its parent's files.
    var inUse = Set<FileHandle>()
    for other in clients.values where other !== client && !other.delegated.isEmpty { inUse.formUnion(other.delegated.files) }
    for file in dropped.subtracting(inUse).sorted(by: { $0.rawValue < $1.rawValue }) { actions.append(.releaseFile(file)) }
  }

  // MARK: - Notices

  /// An mremap or munmap moved or cut regions of the client: it is told where
  /// they lie now, so that it re-attaches to a restarted broker with the
  /// layout of the moment. Likewise what it dropped. A full socket keeps them
  /// for the next sweep; the client is never closed for it.
  func notify(_ client: Client, _ notices: some Sequence<Client.Notice>) {
    guard client.hasSocket else { return }
    client.unsent.formUnion(notices)
    sendNotices(client)
  }

  func sendNotices(_ client: Client) {
    for notice in client.unsent.sorted() {
      client.unsent.remove(notice)
      switch notice {
      case .layout(let id):
        let pieces = client.regions.layout(of: id)
        guard pieces.count <= RegionSpec.maxPieces else {
          // It could not re-attach in that many pieces anyway: what moved fails closed after a broker restart.
          log(.warning, "a region is cut in too many pieces to tell the client", ["client.id": "\(client.id)", "region.id": "\(id)", "pieces": "\(pieces.count)"])
          continue
        }
        actions.append(.notify(client.id, BrokerReply(requestID: 0, .layout(regionID: id, pieces: pieces))))
      case .dropped(let id):
        let record = client.dropRecord(of: id)
        actions.append(.notify(client.id, BrokerReply(requestID: 0, .dropped(regionID: id, dropped: record.dropped, unknown: record.unknown))))
      }
    }
  }
}
