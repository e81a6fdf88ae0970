import BrokerProtocol
import CUserfaultfd
import Glibc
import Logging
import Synchronization
import SystemPackage
import Userfaultfd

/// The broker: owns every client's userfaultfd, routes its events to plugins,
/// validates their decisions and applies them with its own ioctls.
///
/// Single-threaded by design: one epoll loop serves every socket and uffd, so
/// the fault path takes no lock and no ioctl waits on another thread. Create
/// it, then call `run()` on the thread that should serve; `stop()` may be
/// called from any thread (or send SIGINT/SIGTERM when `handleSignals` is set).
public final class Broker: @unchecked Sendable {
  // @unchecked: all state below is confined to the thread in `run()`; `stop()`
  // only writes to an eventfd.
  public let configuration: BrokerConfiguration
  let logger: Logger
  private let loop: EventLoop
  private let clientListener: PacketListener
  private let pluginListener: PacketListener
  private let wakeup: CInt
  @exclusivity(unchecked) private var signals: CInt = -1
  @exclusivity(unchecked) private var supervisor: PluginSupervisor?

  @exclusivity(unchecked) private var nextID: UInt64 = 1
  @exclusivity(unchecked) private var clients: [UInt64: ClientSession] = [:]
  @exclusivity(unchecked) private var plugins: [UInt64: PluginConnection] = [:]
  @exclusivity(unchecked) private var routes: [String: PluginRoute] = [:]
  @exclusivity(unchecked) private var inFlight = InFlightTable<InFlight>(reservingCapacity: 4096)
  /// The time the loop last woke up: timestamps on the fault path without a clock read per fault.
  @exclusivity(unchecked) private var loopTime: UInt64 = 0
  @exclusivity(unchecked) private var pendingStores: [UInt64: PendingStore] = [:]
  /// A page of zeros, the source of write-protected zero fills.
  private let zeroPage = UnsafeMutableRawBufferPointer.allocate(byteCount: systemPageSize, alignment: systemPageSize)
  /// Where delegated file pages are read before they are copied in.
  private let localBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Broker.maxDelegatedPrefetch * systemPageSize, alignment: systemPageSize)
  static let maxDelegatedPrefetch = 32
  @exclusivity(unchecked) private var dirtyPlugins: [PluginConnection] = []
  /// The sessions whose dispatcher has parked faults (each listed once): the
  /// loop's timeout and redelivery look at these only, not at every client.
  @exclusivity(unchecked) private var parkedSessions: [ClientSession] = []
  @exclusivity(unchecked) private var parkedSpare: [ClientSession] = []
  @exclusivity(unchecked) private var stopping = false
  @exclusivity(unchecked) private var nextSweep: UInt64 = 0
  /// Held in reserve: when descriptors run out (EMFILE), it is closed to accept
  /// and refuse the waiting connection, so the listener does not spin.
  @exclusivity(unchecked) private var spareDescriptor: CInt = -1

  private let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  /// Plugin packets only: decisions are read in place, so their bytes must
  /// outlive the sends (into `packet`) that applying them may cause.
  private let pluginPacket = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  private let decisions = DecisionBatchDecoder()
  private let arena = WireArena(capacity: 1 << 20)
  @exclusivity(unchecked) private var receivedFDs: [CInt] = []

  /// A fault handed to a plugin and not yet answered.
  private struct InFlight {
    var session: ClientSession
    var page: UInt
    /// The dispatcher's `sequence` when it was sent: later overlapping events make its decision stale.
    var sequence: UInt64
    var plugin: PluginConnection
    var sentAt: UInt64
  }

  /// A swap-out chunk handed to a plugin to store; the client waits for its reply.
  private struct PendingStore {
    var session: ClientSession
    var requestID: UInt64
    var range: Range<UInt>
    var piece: RegionTable.Piece
    /// The plugin asked to store it: only its reply counts.
    var plugin: PluginConnection
  }

  /// Counters for tests, logs and the benchmark.
  public struct Statistics: Sendable {
    public var faultsSent = 0
    public var decisionsApplied = 0
    public var staleDecisionsDropped = 0
    public var invalidDecisions = 0
    public var retries = 0
    /// Faults resolved by the broker itself from a delegated range.
    public var resolvedLocally = 0
    /// Faults in new memory (a grown tail, a `DONTUNMAP` source) filled with zeros.
    public var newMemoryFills = 0
    /// Faults the broker could not place, failed closed (poison or kill).
    public var failedClosed = 0
    /// Swapped-out bytes a plugin came back without (their faults fail closed).
    public var swappedBytesLost: UInt64 = 0
  }
  @exclusivity(unchecked) public private(set) var statistics = Statistics()
  private let resolvedCounter = Atomic<UInt64>(0)
  /// Faults resolved so far (by plugin decisions or locally); readable from any thread.
  public var faultsResolved: UInt64 { resolvedCounter.load(ordering: .relaxed) }

  /// Binds both sockets. A socket (and the directory it creates for it) is
  /// private to the broker's uid (0600/0700) unless the config lets others in;
  /// either way SO_PEERCRED decides who may do what.
  public init(configuration: BrokerConfiguration, logger: Logger) throws(BrokerError) {
    try configuration.validate()
    self.configuration = configuration
    self.logger = logger
    let ownerOnly = { (uids: Set<UInt32>, gids: Set<UInt32>) in uids.subtracting([getuid()]).isEmpty && gids.isEmpty }
    let clientPrivate = ownerOnly(configuration.clientUIDs, configuration.clientGIDs)
    let pluginPrivate = ownerOnly(configuration.pluginUIDs, configuration.pluginGIDs)
    for (path, isPrivate) in [(configuration.clientSocketPath, clientPrivate), (configuration.pluginSocketPath, pluginPrivate)] {
      let directory = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
      if !directory.isEmpty { mkdir(directory, isPrivate && clientPrivate && pluginPrivate ? 0o700 : 0o755) }
    }
    loop = try EventLoop()
    clientListener = try PacketListener(path: configuration.clientSocketPath, mode: clientPrivate ? 0o600 : 0o666)
    pluginListener = try PacketListener(path: configuration.pluginSocketPath, mode: pluginPrivate ? 0o600 : 0o666)
    spareDescriptor = open("/dev/null", O_RDONLY | O_CLOEXEC)
    switch valueOrErrno(cuffd_eventfd()) {
    case .success(let fd): wakeup = fd
    case .failure(let errno): throw BrokerError(.io, "eventfd failed", errno: errno)
    }
    try loop.add(clientListener.fd, Token(.clientListener))
    try loop.add(pluginListener.fd, Token(.pluginListener))
    try loop.add(wakeup, Token(.wakeup))
    zeroPage.initializeMemory(as: UInt8.self, repeating: 0)
    dirtyPlugins.reserveCapacity(64)
    for plugin in configuration.plugins { _ = route(named: plugin.name) }
  }

  deinit {
    packet.deallocate()
    pluginPacket.deallocate()
    zeroPage.deallocate()
    localBuffer.deallocate()
    closeDescriptor(wakeup)
    closeDescriptor(signals)
    closeDescriptor(spareDescriptor)
  }

  /// Asks `run()` to return (from any thread).
  public func stop() {
    var one: UInt64 = 1
    _ = write(wakeup, &one, 8)
  }

  /// Serves until `stop()` or, with `handleSignals`, SIGINT/SIGTERM. Spawns
  /// the configured plugins first and stops them (TERM, wait, KILL) last.
  public func run(handleSignals: Bool = false) throws(BrokerError) {
    if handleSignals {
      switch valueOrErrno(cuffd_termination_signalfd()) {
      case .success(let fd): signals = fd
      case .failure(let errno): throw BrokerError(.io, "signalfd failed", errno: errno)
      }
      try loop.add(signals, Token(.signal))
    }
    if !configuration.plugins.isEmpty {
      let supervisor = PluginSupervisor(plugins: configuration.plugins, pluginSocketPath: configuration.pluginSocketPath, logger: logger)
      self.supervisor = supervisor
      supervisor.startAll(loop: loop)
    }
    logger.info("broker serving", metadata: ["socket.client": "\(configuration.clientSocketPath)", "socket.plugin": "\(configuration.pluginSocketPath)"])
    loopTime = monotonicNanoseconds()
    while !stopping {
      let readyCount = loop.wait(timeout: nextTimeout())
      loopTime = monotonicNanoseconds()
      for index in 0..<readyCount {
        let (token, events) = loop.ready(at: index)
        if let token { handle(token, events) }
      }
      housekeeping()
      flushPlugins()
    }
    shutdown()
  }

  // MARK: - Dispatch of readiness

  private func handle(_ token: Token, _ events: UInt32) {
    switch token.kind {
    case .clientListener: acceptClients()
    case .pluginListener: acceptPlugins()
    case .signal:
      let signal = cuffd_read_signal(signals)
      logger.info("stopping on signal", metadata: ["signal": "\(signal)"])
      stopping = true
    case .wakeup:
      stopping = true
    case .clientSocket:
      if let session = clients[token.id] { readClient(session) }
    case .clientUffd:
      clients[token.id]?.dispatcher?.drain()
    case .clientPidfd:
      if let session = clients[token.id] { closeClient(session, reason: "the client process exited") }
    case .plugin:
      guard let plugin = plugins[token.id] else { return }
      if events & cuffd_epollout != 0 { drainBacklog(plugin) }
      if events & (cuffd_epollin | cuffd_epollhup | cuffd_epollerr) != 0 { readPlugin(plugin) }
    case .child:
      supervisor?.childExited(id: token.id, loop: loop)
    }
  }

  private func nextTimeout() -> CInt {
    let tick: UInt64 = 100_000_000  // housekeeping
    let restart = supervisor?.nextRestart
    // The fault path's usual case: nothing is due before the tick, no clock read needed.
    if parkedSessions.isEmpty && restart == nil { return CInt(tick / 1_000_000) }
    let now = monotonicNanoseconds()  // not `loopTime`: handling the last wake took time
    var due: UInt64 = now + tick
    for session in parkedSessions {
      if let deadline = session.dispatcher?.nextDeadline, deadline < due { due = deadline }
    }
    if let restart, restart < due { due = restart }
    return due <= now ? 0 : CInt((due - now + 999_999) / 1_000_000)
  }

  /// Redelivers parked faults that are due, expires registrations and hung plugins, restarts plugins.
  private func housekeeping() {
    let now = loopTime
    if !parkedSessions.isEmpty { redeliverParked(now: now) }
    // The rest scans tables: at most every 20 ms, off the per-batch path.
    guard now >= nextSweep else { return }
    nextSweep = now + 20_000_000
    for session in clients.values {
      if let pending = session.pendingOpen, pending.deadline <= now {
        let names = Set(pending.regions.filter { pending.awaiting.contains($0.id) }.map(\.plugin)).sorted().joined(separator: ", ")
        failOpen(session, BrokerError(.timedOut, "plugin \(names) did not accept the regions in time"))
      }
    }
    sweepClients()
    let deadline = UInt64(configuration.pluginDeadlineMilliseconds) * 1_000_000
    var hung = inFlight.entries.filter { now > $0.sentAt + deadline }.map(\.plugin)
    for session in clients.values {
      guard let pending = session.pendingOpen, now > pending.sentAt + deadline else { continue }
      for spec in pending.regions where pending.awaiting.contains(spec.id) {
        // A plugin that connected since got the regions then.
        if let plugin = route(named: spec.plugin).effective.connection, !plugin.isClosed, now > plugin.connectedAt + deadline { hung.append(plugin) }
      }
    }
    for plugin in hung where !plugin.isClosed {
      let reason = "it did not answer a fault within \(configuration.pluginDeadlineMilliseconds) ms"
      closePlugin(plugin, reason: reason)
      supervisor?.killChild(pid: plugin.peer.pid, reason: reason)
    }
    supervisor?.restartDue(loop: loop)
    for route in routes.values where route.connection == nil && route.failover == nil && !route.failed {
      guard let policy = configuration.policies[route.name], policy.fallback != nil || policy.onFailure != .wait, let lostAt = route.lostAt else { continue }
      if now >= lostAt + UInt64(policy.failAfterMilliseconds) * 1_000_000 || supervisor?.hasGivenUp(route.name) == true {
        fail(route, policy)
      }
    }
  }

  /// Redelivers the due parked faults of every session that has some, and
  /// forgets the sessions left with none.
  private func redeliverParked(now: UInt64) {
    swap(&parkedSessions, &parkedSpare)  // `parkedSessions` refills through `onPark`
    for session in parkedSpare { session.hasParkedFaults = false }
    for session in parkedSpare { session.dispatcher?.redeliverDue(now: now) }
    // Faults parked again re-listed their session through `onPark`; those still waiting for their deadline:
    for session in parkedSpare where !session.hasParkedFaults && session.dispatcher?.parkedCount ?? 0 > 0 {
      session.hasParkedFaults = true
      parkedSessions.append(session)
    }
    parkedSpare.removeAll(keepingCapacity: true)
  }

  /// Retries layouts a full socket held back, and looks for forked children
  /// that are gone. A forked child has no pidfd (the kernel does not name it):
  /// its exit (or exec) is seen as ESRCH from a zero-page request at an address
  /// it has not registered, which fills nothing while its memory lives.
  private func sweepClients() {
    for session in clients.values where !session.layoutUnsent.isEmpty { sendLayouts(session) }
    for session in clients.values where session.isForkedChild && session.phase != .closed {
      guard let uffd = session.uffd else { continue }
      let probe = UInt(Self.probeAddress)
      guard session.regions.piece(containing: probe) == nil else { continue }
      if uffd.zero(address: probe, length: systemPageSize) == .targetExited {
        closeClient(session, reason: "the forked child exited")
      }
    }
  }

  /// The lowest address a process may map (the default `vm.mmap_min_addr`).
  static let probeAddress = 65536

  // MARK: - Clients

  /// Accepts one connection; nil when none is waiting. Out of descriptors, it
  /// uses the spare one to accept the connection and refuse it with `refusal`,
  /// and keeps serving everyone already connected.
  private func accept(from listener: PacketListener, role: String, refusal: (PacketSocket, BrokerError) -> Void) -> PacketSocket? {
    do {
      return try listener.accept()
    } catch where error.errno == .tooManyOpenFiles || error.errno == .tooManyOpenFilesInSystem {
      // accept(2) fails for want of a descriptor before it looks for a connection:
      // refuse one (if any) and let the next wakeup handle the rest.
      closeDescriptor(spareDescriptor)
      if let socket = try? listener.accept() {
        logger.error("out of descriptors: refusing a new connection", metadata: ["role": "\(role)"])
        refusal(socket, BrokerError(.limit, "the broker is out of file descriptors; try again later"))
      }
      spareDescriptor = open("/dev/null", O_RDONLY | O_CLOEXEC)
      return nil
    } catch {
      logger.error("cannot accept a connection", metadata: ["role": "\(role)", "error": "\(error)"])
      return nil
    }
  }

  /// Whether credentials are allowed by uid, or by primary gid.
  private static func allowed(_ peer: PeerCredentials, uids: Set<UInt32>, gids: Set<UInt32>) -> Bool {
    uids.contains(peer.uid) || gids.contains(peer.gid)
  }

  private func acceptClients() {
    while true {
      guard let socket = accept(from: clientListener, role: "client", refusal: { refuse($0, requestID: 0, $1) }) else { return }
      guard let peer = try? socket.peerCredentials() else { continue }
      guard Self.allowed(peer, uids: configuration.clientUIDs, gids: configuration.clientGIDs) else {
        refuse(socket, requestID: 0, BrokerError(.notAuthorized, "uid \(peer.uid) may not register memory with this broker"))
        logger.warning("refused a client", metadata: ["peer.uid": "\(peer.uid)", "peer.pid": "\(peer.pid)", "reason": "uid not allowed"])
        continue
      }
      guard clients.count < configuration.maxClients else {
        refuse(socket, requestID: 0, BrokerError(.limit, "the broker serves its maximum of \(configuration.maxClients) clients"))
        continue
      }
      let session = ClientSession(id: takeID(), socket: socket, peer: peer, broker: self)
      do {
        try loop.add(socket.fd, Token(.clientSocket, session.id))
      } catch {
        continue
      }
      clients[session.id] = session
    }
  }

  private func refuse(_ socket: PacketSocket, requestID: UInt64, _ error: BrokerError) {
    let bytes = ClientWire.encode(BrokerReply(requestID: requestID, .error(error)))
    _ = bytes.withUnsafeBytes { try? socket.send($0) }
  }

  /// An mremap or munmap moved or cut regions of the client: it is told where
  /// they lie now, so that it re-attaches to a restarted broker with the
  /// layout of the moment. A full socket (a client that makes no request for
  /// a long while) keeps them for the next try; the client is never closed for it.
  func layoutChanged(of session: ClientSession, regions ids: [UInt64]) {
    guard session.socket != nil, !ids.isEmpty else { return }
    session.layoutUnsent.formUnion(ids)
    sendLayouts(session)
  }

  private func sendLayouts(_ session: ClientSession) {
    guard let socket = session.socket else { return }
    for id in session.layoutUnsent.sorted() {
      let pieces = session.regions.layout(of: id)
      guard pieces.count <= RegionSpec.maxPieces else {
        // It could not re-attach in that many pieces anyway: what moved fails closed after a broker restart.
        logger.warning("a region is cut in too many pieces to tell the client", metadata: ["client.id": "\(session.id)", "region.id": "\(id)", "pieces": "\(pieces.count)"])
        session.layoutUnsent.remove(id)
        continue
      }
      let bytes = ClientWire.encode(BrokerReply(requestID: 0, .layout(regionID: id, pieces: pieces)))
      guard (try? bytes.withUnsafeBytes { (raw) throws(BrokerError) in try socket.send(raw) }) == .sent else { return }
      session.layoutUnsent.remove(id)
    }
  }

  private func reply(_ session: ClientSession, _ reply: BrokerReply) {
    let bytes = ClientWire.encode(reply)
    do {
      _ = try bytes.withUnsafeBytes { (raw) throws(BrokerError) in try session.socket?.send(raw) }
    } catch {
      closeClient(session, reason: "its socket failed: \(error)")
    }
  }

  private func readClient(_ session: ClientSession) {
    while session.phase != .closed {
      receivedFDs.removeAll(keepingCapacity: true)
      let result: PacketSocket.ReceiveResult
      do {
        guard let socket = session.socket else { return }
        result = try socket.receive(into: packet, fds: &receivedFDs)
      } catch {
        receivedFDs.forEach(closeDescriptor)
        reply(session, BrokerReply(requestID: 0, .error(error)))
        closeClient(session, reason: "\(error)")
        return
      }
      switch result {
      case .wouldBlock: return
      case .closed:
        closeClient(session, reason: "the client closed its connection")
        return
      case .packet(let count):
        var fds = receivedFDs
        defer { fds.forEach(closeDescriptor) }  // those no one took over
        var requestID: UInt64 = 0
        do {
          let request = try ClientWire.decodeRequest(UnsafeRawBufferPointer(rebasing: packet[..<count]), arena: arena)
          requestID = request.requestID
          try handleRequest(request, fds: &fds, session: session)
        } catch {
          logger.warning("refused a client request", metadata: ["client.id": "\(session.id)", "peer.pid": "\(session.peer.pid)", "reason": "\(error)"])
          reply(session, BrokerReply(requestID: requestID, .error(error)))
          // A malformed or out-of-place message ends the connection; a refused registration too.
          if error.code == .malformed || session.phase != .active { closeClient(session, reason: "\(error.message)") }
        }
      }
    }
  }

  /// Handles one client request; a descriptor it takes over is removed from `fds`.
  private func handleRequest(_ request: ClientRequest, fds: inout [CInt], session: ClientSession) throws(BrokerError) {
    switch (session.phase, request.body) {
    case (.awaitingHello, .hello(let hello)):
      guard fds.isEmpty else { throw BrokerError(.malformed, "Hello must not carry descriptors") }
      guard hello.version == brokerProtocolVersion, hello.role == .client else {
        throw BrokerError(.version, "this broker speaks protocol \(brokerProtocolVersion) to clients; got version \(hello.version) role \(hello.role)")
      }
      session.phase = .awaitingRegister
      reply(session, BrokerReply(requestID: request.requestID, .hello(Hello(role: .broker, name: "uffd-broker"))))
    case (.awaitingRegister, .register(let register)):
      try beginRegistration(session, register, fds: &fds, requestID: request.requestID)
    case (.active, .addRegions(let specs)):
      guard fds.isEmpty else { throw BrokerError(.malformed, "AddRegions must not carry descriptors") }
      guard session.pendingOpen == nil else { throw BrokerError(.malformed, "another request is still pending") }
      guard session.regions.pieces.count + specs.count <= configuration.maxRegionsPerClient else {
        throw BrokerError(.limit, "a client may register at most \(configuration.maxRegionsPerClient) regions")
      }
      try session.regions.validate(specs, pageSize: systemPageSize)
      try openRegions(specs, session: session, requestID: request.requestID)
    case (.active, .removeRegions(let ids)):
      guard fds.isEmpty else { throw BrokerError(.malformed, "RemoveRegions must not carry descriptors") }
      for id in ids {
        guard let route = session.regions.pieces.first(where: { $0.spec.id == id })?.route else {
          throw BrokerError(.badRegion, "region \(id) is not registered")
        }
        session.regions.remove(regionID: id)
        session.delegated.removeAll(regionID: id)
        session.announcedRegions[id] = nil
        sendEvent(.regionClosed(clientID: session.id, regionID: id), to: route)
      }
      reply(session, BrokerReply(requestID: request.requestID, .ack(clientID: session.id)))
    case (.active, .swapOut(let regionID, let offset, let length)):
      let (range, _) = try session.liveRange(regionID: regionID, offset: offset, length: length)
      guard !session.isSwapping(range) else { throw BrokerError(.badRegion, "a swap-out of this range is in progress") }
      guard let uffd = session.uffd else { throw BrokerError(.internal, "the client has no userfaultfd") }
      session.swapping.append(range)  // first: fills from now on are write-protected
      if case .failure(let errno) = uffd.writeProtect(address: range.lowerBound, length: range.count, protect: true) {
        session.swapping.removeLast()
        throw BrokerError(.badRegion, "cannot write-protect region \(regionID) (register it with write-protect mode)", errno: errno)
      }
      reply(session, BrokerReply(requestID: request.requestID, .ack(clientID: session.id)))
    case (.active, .swapOutData(let regionID, let offset, let data)):
      let (range, piece) = try session.liveRange(regionID: regionID, offset: offset, length: data.count)
      guard session.isSwappingAll(of: range) else {
        throw BrokerError(.badRegion, "SwapOutData outside a swap-out in progress")
      }
      guard let plugin = piece.route.effective.connection, !plugin.isClosed else {
        throw BrokerError(.unknownPlugin, "plugin \(piece.route.effective.name) is not connected")
      }
      let storeID = takeID()
      pendingStores[storeID] = PendingStore(session: session, requestID: request.requestID, range: range, piece: piece, plugin: plugin)
      sendEvent(.store(StoreEvent(storeID: storeID, clientID: session.id, regionID: regionID, offset: offset, data: data)), to: piece.route)
    case (.active, .swapOutDone(let regionID, let offset, let length)):
      let (range, _) = try session.liveRange(regionID: regionID, offset: offset, length: length)
      guard let index = session.swapping.firstIndex(of: range), let uffd = session.uffd else {
        throw BrokerError(.badRegion, "no swap-out of this range is in progress")
      }
      session.swapping.remove(at: index)
      // Unprotecting wakes the held writers: a kept page is now writable; a
      // dropped one faults again and is filled from the plugin's copy.
      _ = uffd.writeProtect(address: range.lowerBound, length: range.count, protect: false)
      for page in session.heldWrites where range.contains(page) {
        session.heldWrites.remove(page)
        session.dispatcher?.complete(page, .resolved)
      }
      reply(session, BrokerReply(requestID: request.requestID, .ack(clientID: session.id)))
    default:
      throw BrokerError(.malformed, "unexpected message in this state of the connection")
    }
  }

  private func beginRegistration(_ session: ClientSession, _ register: RegisterRequest, fds: inout [CInt], requestID: UInt64) throws(BrokerError) {
    guard fds.count == 1 else {
      throw BrokerError(.notUserfaultfd, "Register must carry exactly one descriptor, the client's userfaultfd (got \(fds.count))")
    }
    let uffd: UserfaultFD
    do {
      // Its features as the kernel enabled them, not as the message says.
      uffd = try UserfaultFD(adopting: FileDescriptor(rawValue: fds[0]), features: nil, ioctls: register.ioctls)
      fds.removeAll()  // the uffd object owns (and closes) the descriptor now
    } catch {
      throw BrokerError(.notUserfaultfd, "the attached descriptor: \(error.message)")
    }
    let granted = uffd.features
    guard register.pid == session.peer.pid else {
      throw BrokerError(.notAuthorized, "Register names pid \(register.pid) but the connection is from pid \(session.peer.pid)")
    }
    guard register.regions.count <= configuration.maxRegionsPerClient else {
      throw BrokerError(.limit, "a client may register at most \(configuration.maxRegionsPerClient) regions")
    }
    let needed: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap]
    guard granted.isSuperset(of: needed) else {
      throw BrokerError(.notUserfaultfd, "the userfaultfd lacks features \(needed.subtracting(granted)): the broker needs remove, unmap and remap events to keep memory correct")
    }
    try session.regions.validate(register.regions, pageSize: systemPageSize)
    let pidfd: CInt
    switch valueOrErrno(cuffd_pidfd_open(session.peer.pid)) {
    case .success(let fd): pidfd = fd
    case .failure(let errno): throw BrokerError(.io, "cannot watch the client process", errno: errno)
    }
    session.pidfd = pidfd
    session.pid = register.pid
    session.token = register.token != 0 ? register.token : .randomToken()
    attach(uffd, to: session)
    try openRegions(register.regions, session: session, requestID: requestID)
    session.phase = .opening
    if session.pendingOpen == nil { activate(session, requestID: requestID) }
  }

  /// Gives a session its uffd and the dispatcher that orders its events.
  private func attach(_ uffd: UserfaultFD, to session: ClientSession) {
    session.uffd = uffd
    let dispatcher = EventDispatcher(uffd: uffd, handler: session)
    // By id, not a weak reference: a weak one would give the session a side
    // table, and every retain of it on the fault path would take the slow path.
    dispatcher.onPark = { [unowned self, sessionID = session.id] in
      if let session = clients[sessionID], !session.hasParkedFaults {
        session.hasParkedFaults = true
        parkedSessions.append(session)
      }
    }
    session.dispatcher = dispatcher
  }

  /// A client forked; `child` (from the fork event) intercepts the child's copy
  /// of the registered memory. The child gets a session of its own with the
  /// parent's table as of the fork, and each region is offered to its plugin as
  /// the parent's copy (RegionOpened naming the parent). Its uffd is read at
  /// once (its faults wait until the plugins answer); a region refused, or of a
  /// plugin that has failed, fails closed in the child. The kernel does not
  /// name the child: it has no pid here, and its exit is found by probing its
  /// uffd (`sweepClients`).
  func adoptFork(_ child: UserfaultFD, of parent: ClientSession) {
    guard clients.count < configuration.maxClients else {
      // Forked children count as clients: past the limit, one is not served, so
      // what it never had fails closed (poisoned, and its uffd let go).
      logger.error("a forked child exceeds maxClients: its unfilled pages fail closed", metadata: ["client.id": "\(parent.id)", "clients": "\(clients.count)"])
      for piece in parent.regions.pieces { child.poisonMissing(address: piece.live.lowerBound, length: piece.live.count) }
      return
    }
    let session = ClientSession(id: takeID(), socket: nil, peer: parent.peer, broker: self)
    // First of all (the window in which a broker killed leaves the child
    // unprotected stays microseconds): the parent keeps a copy of the child's
    // uffd, which otherwise lives only here.
    // A grandchild's goes to the nearest ancestor that is connected (a child has no socket).
    var keeper = parent
    while keeper.socket == nil, let up = clients[keeper.parentID] { keeper = up }
    let notice = ClientWire.encode(BrokerReply(requestID: 0, .forked(childID: session.id, pieces: parent.regions.layout())))
    let kept = [child.fileDescriptor.rawValue].withUnsafeBufferPointer { fds in
      notice.withUnsafeBytes { raw in (try? keeper.socket?.send(raw, fds: fds)) == .sent }
    }
    if !kept {
      logger.warning("the parent cannot keep its forked child's userfaultfd: a broker killed now leaves the child's unfilled pages reading zeros", metadata: ["client.id": "\(parent.id)", "child.id": "\(session.id)"])
    }
    session.parentID = parent.id
    session.token = .randomToken()
    session.phase = .opening
    session.regions = parent.regions
    // The kernel gives a child's copy of a WIPEONFORK mapping fresh pages, which fault to its uffd.
    for wiped in ProcessMappings.wipedOnFork(pid: parent.pid) { session.regions.makeNewMemory(wiped) }
    session.delegated = parent.delegated
    session.refusedRegions = parent.refusedRegions
    session.swappedOutPages = parent.swappedOutPages
    session.lostPages = parent.lostPages
    attach(child, to: session)
    clients[session.id] = session
    do {
      try loop.add(child.fileDescriptor.rawValue, Token(.clientUffd, session.id))
    } catch {
      // Unread, the child's faults would hang: fail them closed instead.
      logger.error("cannot watch a forked child's userfaultfd: its memory fails closed", metadata: ["client.id": "\(parent.id)", "error": "\(error)"])
      for piece in session.regions.pieces { child.poisonMissing(address: piece.live.lowerBound, length: piece.live.count) }
      closeClient(session, reason: "its userfaultfd could not be watched")
      return
    }
    var seen = Set<UInt64>()
    let specs = session.regions.pieces.filter { !$0.isNewMemory && seen.insert($0.spec.id).inserted }.map(\.spec)
    logger.info("client forked", metadata: ["client.id": "\(parent.id)", "child.id": "\(session.id)", "regions": "\(specs.count)"])
    do {
      try openRegions(specs, session: session, requestID: 0)
    } catch {
      failOpen(session, error)
    }
    if session.pendingOpen == nil { activate(session, requestID: 0) }
  }

  /// Announces regions to their plugins; the reply to the client waits for theirs.
  private func openRegions(_ specs: [RegionSpec], session: ClientSession, requestID: UInt64) throws(BrokerError) {
    for spec in specs {
      let route = routes[spec.plugin]?.effective
      if route?.failed == true { throw BrokerError(.unknownPlugin, "plugin \"\(spec.plugin)\" has failed and serves no new regions") }
      if route?.connection == nil && !configuration.plugins.contains(where: { $0.name == spec.plugin }) && route?.failover == nil {
        throw BrokerError(.unknownPlugin, "region \(spec.id) names plugin \"\(spec.plugin)\", which is neither configured nor connected")
      }
    }
    guard !specs.isEmpty else {
      if session.phase == .active { reply(session, BrokerReply(requestID: requestID, .ack(clientID: session.id))) }
      return
    }
    let now = monotonicNanoseconds()
    let deadline = now + UInt64(configuration.registrationTimeoutMilliseconds) * 1_000_000
    session.pendingOpen = ClientSession.PendingOpen(requestID: requestID, regions: specs, awaiting: Set(specs.map(\.id)), deadline: deadline, sentAt: now)
    for spec in specs {
      session.announcedRegions[spec.id] = spec.plugin
      session.servedBy.insert(spec.plugin)
      // A client re-attaching says what it swapped out: the plugin is asked whether it still holds it.
      if !spec.swappedOut.isEmpty { session.swappedOutPages[spec.id] = OffsetRanges(spec.swappedOut) }
      // A plugin that is away gets it when it connects (see `announceRegions`).
      if let connection = route(named: spec.plugin).effective.connection {
        append(.regionOpened(clientID: session.id, pid: session.pid, region: session.announced(spec), forkedFrom: session.parentID, token: session.token), to: connection)
      }
    }
  }

  private func regionReply(_ reply: RegionReply, from plugin: PluginConnection) {
    if !reply.lost.isEmpty { recordLost(reply, from: plugin) }
    guard let session = clients[reply.clientID], var pending = session.pendingOpen,
          pending.awaiting.contains(reply.regionID),
          pending.regions.contains(where: { $0.id == reply.regionID && route(named: $0.plugin).effective === plugin.route })
    else {
      if let error = reply.error {
        logger.error("plugin refused a region it serves", metadata: ["plugin": "\(plugin.name)", "client.id": "\(reply.clientID)", "region.id": "\(reply.regionID)", "error": "\(error)"])
      }
      return
    }
    if let error = reply.error {
      let refusal = BrokerError(.pluginRefused, "plugin \(plugin.name) refused region \(reply.regionID): \(error.message)")
      guard session.isForkedChild else {
        failOpen(session, refusal)
        return
      }
      refuseForChild([reply.regionID], of: session, refusal)
    }
    pending.awaiting.remove(reply.regionID)
    session.pendingOpen = pending
    guard pending.awaiting.isEmpty else { return }
    session.pendingOpen = nil
    // A forked child's table is its parent's copy already.
    if !session.isForkedChild { for spec in pending.regions { session.regions.add(spec, route: route(named: spec.plugin)) } }
    if session.phase == .opening {
      activate(session, requestID: pending.requestID)
    } else {
      self.reply(session, BrokerReply(requestID: pending.requestID, .ack(clientID: session.id)))
    }
  }

  /// A plugin (re)opened a region without some of the swapped-out pages it was
  /// to hold: from now on their faults fail closed (SIGBUS), never zeros.
  private func recordLost(_ reply: RegionReply, from plugin: PluginConnection) {
    guard let session = clients[reply.clientID], let record = session.swappedOutPages[reply.regionID],
          session.announcedRegions[reply.regionID].map({ route(named: $0).effective === plugin.route }) == true
    else { return }
    var lost = OffsetRanges()
    for range in reply.lost { for part in record.clamped(to: range) { lost.insert(part) } }
    guard !lost.isEmpty else { return }
    for range in lost.ranges {
      session.swappedOutPages[reply.regionID]?.subtract(range)
      session.lostPages[reply.regionID, default: OffsetRanges()].insert(range)
    }
    statistics.swappedBytesLost += lost.count
    logger.error("a plugin lost swapped-out pages: they fail closed", metadata: [
      "plugin": "\(plugin.name)", "client.id": "\(session.id)", "region.id": "\(reply.regionID)", "bytes": "\(lost.count)",
    ])
  }

  private func storeReply(_ storeReply: StoreReply, from plugin: PluginConnection) {
    guard let pending = pendingStores[storeReply.storeID] else { return }
    guard pending.plugin === plugin else {
      // Acknowledging another plugin's store would let the client drop pages nobody kept.
      logger.warning("refused a store reply", metadata: ["plugin": "\(plugin.name)", "store.id": "\(storeReply.storeID)", "reason": "the store was not sent to it"])
      countInvalid(from: plugin)
      return
    }
    pendingStores[storeReply.storeID] = nil
    guard pending.session.phase == .active else { return }
    if let error = storeReply.error {
      reply(pending.session, BrokerReply(requestID: pending.requestID, .error(BrokerError(.pluginRefused, "the plugin did not store the pages: \(error.message)"))))
      return
    }
    let busy = pending.session.heldWrites.filter { pending.range.contains($0) }.sorted().map { pending.piece.offset(of: $0) }
    reply(pending.session, BrokerReply(requestID: pending.requestID, .ack(clientID: pending.session.id, busyOffsets: busy)))
  }

  /// Regions of a forked child that will not be served there: their faults fail closed.
  private func refuseForChild(_ ids: [UInt64], of session: ClientSession, _ error: BrokerError) {
    session.refusedRegions.formUnion(ids)
    logger.warning("a forked child's regions fail closed", metadata: ["client.id": "\(session.id)", "client.parent": "\(session.parentID)", "regions": "\(ids)", "reason": "\(error)"])
  }

  private func failOpen(_ session: ClientSession, _ error: BrokerError) {
    guard let pending = session.pendingOpen else {
      // A forked child's regions that could not even be offered.
      if session.isForkedChild { refuseForChild(session.regions.pieces.map(\.spec.id), of: session, error) }
      return
    }
    if session.isForkedChild {
      // Never closed: its uffd is the only thing between the child and zeros.
      session.pendingOpen = nil
      refuseForChild(Array(pending.awaiting), of: session, error)
      activate(session, requestID: 0)
      return
    }
    session.pendingOpen = nil
    for spec in pending.regions {
      session.delegated.removeAll(regionID: spec.id)
      session.announcedRegions[spec.id] = nil
      sendEvent(.regionClosed(clientID: session.id, regionID: spec.id), to: route(named: spec.plugin))
    }
    logger.warning("refused a client's regions", metadata: ["client.id": "\(session.id)", "reason": "\(error)"])
    reply(session, BrokerReply(requestID: pending.requestID, .error(error)))
    if session.phase == .opening { closeClient(session, reason: error.message) }
  }

  private func activate(_ session: ClientSession, requestID: UInt64) {
    guard let uffd = session.uffd else { return }
    if session.isForkedChild {
      // Watched since its fork; its faults were parked until now.
      session.phase = .active
      session.dispatcher?.redeliverDue(now: .max)
      return
    }
    do throws(BrokerError) {
      try loop.add(uffd.fileDescriptor.rawValue, Token(.clientUffd, session.id))
      try loop.add(session.pidfd, Token(.clientPidfd, session.id))
    } catch {
      reply(session, BrokerReply(requestID: requestID, .error(error)))
      closeClient(session, reason: "\(error)")
      return
    }
    session.phase = .active
    // A client re-attaching after a broker restart may have threads blocked on
    // faults the old broker read and never answered: wake them to fault again.
    for piece in session.regions.pieces { _ = uffd.wake(address: piece.live.lowerBound, length: piece.live.count) }
    logger.info("client registered", metadata: ["client.id": "\(session.id)", "client.pid": "\(session.pid)", "regions": "\(session.regions.pieces.count)"])
    reply(session, BrokerReply(requestID: requestID, .ack(clientID: session.id)))
    session.dispatcher?.drain()  // faults may have queued before the ack
  }

  /// Cleans a client up: every region still open is closed for its plugin, and
  /// every plugin a region was ever announced to is told Closed, once, last
  /// (whatever the client unmapped first); its faults in flight are forgotten,
  /// its uffd and pidfd closed.
  private func closeClient(_ session: ClientSession, reason: String) {
    guard session.phase != .closed else { return }
    session.phase = .closed
    if let socket = session.socket { loop.remove(socket.fd) }
    if let uffd = session.uffd { loop.remove(uffd.fileDescriptor.rawValue) }
    if session.pidfd >= 0 { loop.remove(session.pidfd) }
    session.dispatcher?.close()
    for entry in inFlight.removeAll(where: { $0.session === session }) { entry.plugin.inFlight -= 1 }
    for (id, plugin) in session.announcedRegions.sorted(by: { $0.key < $1.key }) {
      sendEvent(.regionClosed(clientID: session.id, regionID: id), to: route(named: plugin))
    }
    session.announcedRegions.removeAll()
    if session.isForkedChild {
      // Whichever ancestor keeps the child's uffd lets it go.
      var keeper = clients[session.parentID]
      while let current = keeper, current.socket == nil { keeper = clients[current.parentID] }
      if let socket = keeper?.socket {
        _ = ClientWire.encode(BrokerReply(requestID: 0, .childClosed(childID: session.id))).withUnsafeBytes { try? socket.send($0) }
      }
    }
    for name in session.servedBy.sorted() { sendEvent(.closed(clientID: session.id, reason: reason), to: route(named: name)) }
    pendingStores = pendingStores.filter { $0.value.session !== session }
    session.dispatcher = nil
    session.uffd = nil  // the broker's reference closes here
    clients[session.id] = nil
    logger.info("client closed", metadata: ["client.id": "\(session.id)", "client.pid": "\(session.pid)", "reason": "\(reason)"])
  }

  // MARK: - Plugins

  private func acceptPlugins() {
    while true {
      guard let socket = accept(from: pluginListener, role: "plugin", refusal: tellPlugin) else { return }
      guard let peer = try? socket.peerCredentials() else { continue }
      guard Self.allowed(peer, uids: configuration.pluginUIDs, gids: configuration.pluginGIDs) else {
        tellPlugin(socket, BrokerError(.notAuthorized, "uid \(peer.uid) may not serve as a plugin of this broker"))
        logger.warning("refused a plugin", metadata: ["peer.uid": "\(peer.uid)", "peer.pid": "\(peer.pid)", "reason": "uid not allowed"])
        continue
      }
      let plugin = PluginConnection(id: takeID(), socket: socket, peer: peer)
      do {
        try loop.add(socket.fd, Token(.plugin, plugin.id))
      } catch {
        continue
      }
      plugins[plugin.id] = plugin
    }
  }

  /// Sends a plugin connection an Error, best effort (it is about to be closed).
  private func tellPlugin(_ socket: PacketSocket, _ error: BrokerError) {
    _ = EventBatchEncoder.encodeControl(hello: nil, error: error).withUnsafeBytes { try? socket.send($0) }
  }

  /// Handles one packet of a plugin. One per wakeup: epoll is level-triggered,
  /// so more wake us again, and a drain-until-EAGAIN would cost a failing
  /// recvmsg per packet.
  private func readPlugin(_ plugin: PluginConnection) {
    if !plugin.isClosed {
      receivedFDs.removeAll(keepingCapacity: true)
      let result: PacketSocket.ReceiveResult
      do {
        result = try plugin.socket.receive(into: pluginPacket, fds: &receivedFDs)
      } catch {
        closePlugin(plugin, reason: "\(error)", tell: error)
        return
      }
      switch result {
      case .wouldBlock: return
      case .closed:
        closePlugin(plugin, reason: "the plugin closed its connection")
        return
      case .packet(let count):
        defer {  // those no delegation took
          receivedFDs.forEach(closeDescriptor)
          receivedFDs.removeAll(keepingCapacity: true)
        }
        do {
          try decisions.decode(UnsafeRawBufferPointer(rebasing: pluginPacket[..<count]))
          try handlePluginMessage(plugin, descriptors: &receivedFDs)
          plugin.packetsApplied += 1
        } catch {
          closePlugin(plugin, reason: "\(error)", tell: error)
          return
        }
      }
    }
  }

  private func handlePluginMessage(_ plugin: PluginConnection, descriptors: inout [CInt]) throws(BrokerError) {
    if plugin.route == nil {
      guard let hello = try decisions.hello else { throw BrokerError(.malformed, "a plugin must start with Hello") }
      guard hello.version == brokerProtocolVersion, hello.role == .plugin else {
        throw BrokerError(.version, "this broker speaks protocol \(brokerProtocolVersion) to plugins; got version \(hello.version) role \(hello.role)")
      }
      guard !hello.name.isEmpty else { throw BrokerError(.malformed, "a plugin's Hello must name the plugin") }
      let route = route(named: hello.name)
      if route.connection != nil { throw BrokerError(.malformed, "plugin \"\(hello.name)\" is already connected") }
      if let fd = descriptors.first {
        plugin.sharedArea = try SharedArea(fd: fd)
      }
      route.connection = plugin
      route.lostAt = nil
      plugin.route = route
      logger.info("plugin connected", metadata: ["plugin": "\(hello.name)", "plugin.pid": "\(plugin.peer.pid)", "store.descriptors": "\(route.store.names.count)"])
      // The first packet to the plugin: nothing can be queued before it.
      let bytes = EventBatchEncoder.encodeControl(hello: Hello(role: .broker, name: "uffd-broker"), error: nil, kept: route.store.names)
      let kept = route.store.descriptors
      let sent = bytes.withUnsafeBytes { raw in
        kept.withUnsafeBufferPointer { fds in Result { () throws(BrokerError) in try plugin.socket.send(raw, fds: fds) } }
      }
      _ = try sent.get()
      announceRegions(to: plugin)
      return
    }
    for index in 0..<decisions.decisionCount {
      if let decision = decisions.decision(at: index) { apply(decision, from: plugin) }
      if plugin.isClosed { return }
    }
    // Delegations before region replies: a reply may activate the client, whose
    // first faults must already find the ranges its plugin handed over.
    let delegations = try decisions.delegations(descriptors: descriptors)
    for delegation in delegations {
      if plugin.isClosed { return }  // too many refusals: the rest are not looked at
      if case .file(let fd, _) = delegation.source, let index = descriptors.firstIndex(of: fd) {
        descriptors.remove(at: index)  // ownership moves to the delegation (or is closed on refusal)
      }
      delegate(delegation, from: plugin)
    }
    // Then the descriptors to keep, in order (file delegations took theirs).
    let keep = try decisions.keepNames
    guard descriptors.count >= keep.count else { throw BrokerError(.malformed, "\(keep.count) descriptors to keep, \(descriptors.count) attached") }
    for name in keep {
      let fd = descriptors.removeFirst()
      try plugin.route?.store.keep(fd, as: name)
    }
    for reply in try decisions.regionReplies where !plugin.isClosed { regionReply(reply, from: plugin) }
    for reply in decisions.storeReplies where !plugin.isClosed { storeReply(reply, from: plugin) }
  }

  /// A plugin (re)connected: it learns every region it serves, then the events it
  /// missed. With `origin` (a failed plugin whose regions it takes over): only
  /// that plugin's regions; its own are open already, and opening them again
  /// would reset whatever it keeps for them.
  private func announceRegions(to plugin: PluginConnection, of origin: PluginRoute? = nil) {
    guard let route = plugin.route else { return }
    let announces = { (candidate: PluginRoute) in
      candidate.effective === route && (origin.map { candidate.passes(through: $0) } ?? true)
    }
    for session in clients.values.sorted(by: { $0.id < $1.id }) {
      var announced = Set<UInt64>()
      for piece in session.regions.pieces where !piece.isNewMemory && announces(piece.route) && announced.insert(piece.spec.id).inserted {
        append(.regionOpened(clientID: session.id, pid: session.pid, region: session.announced(piece.spec), forkedFrom: session.parentID, token: session.token), to: plugin)
      }
      for spec in session.pendingOpen?.regions ?? [] where announces(self.route(named: spec.plugin)) {
        append(.regionOpened(clientID: session.id, pid: session.pid, region: session.announced(spec), forkedFrom: session.parentID, token: session.token), to: plugin)
      }
    }
    if origin == nil { for event in route.takeMissedEvents() { append(event, to: plugin) } }
  }

  /// Disconnects a plugin; its faults in flight are parked for its return (or a restart).
  private func closePlugin(_ plugin: PluginConnection, reason: String, tell error: BrokerError? = nil) {
    guard !plugin.isClosed else { return }
    plugin.isClosed = true
    if let error { tellPlugin(plugin.socket, error) }
    loop.remove(plugin.socket.fd)
    plugins[plugin.id] = nil
    if plugin.route?.connection === plugin {
      plugin.route?.connection = nil
      plugin.route?.lostAt = monotonicNanoseconds()
    }
    let orphaned = inFlight.removeAll { $0.plugin === plugin }
    for entry in orphaned { entry.session.dispatcher?.complete(entry.page, .notNow) }
    // A swap-out chunk it had not stored yet fails: the client keeps those pages.
    for (storeID, pending) in pendingStores where pending.plugin === plugin {
      pendingStores[storeID] = nil
      if pending.session.phase == .active {
        reply(pending.session, BrokerReply(requestID: pending.requestID, .error(BrokerError(.pluginRefused, "the plugin went away before it stored the pages"))))
      }
    }
    let level: Logger.Level = error == nil && plugin.route != nil ? .notice : .warning
    logger.log(level: level, "plugin disconnected", metadata: ["plugin": "\(plugin.name)", "plugin.pid": "\(plugin.peer.pid)", "reason": "\(reason)", "faults.parked": "\(orphaned.count)"])
  }

  /// A plugin is gone for good: its regions fail over to the fallback, or fail closed.
  private func fail(_ route: PluginRoute, _ policy: BrokerConfiguration.PluginPolicy) {
    if let name = policy.fallback, name != route.name {
      let fallback = self.route(named: name)
      route.failover = fallback
      logger.error("plugin failed over", metadata: ["plugin": "\(route.name)", "fallback": "\(name)"])
      // The fallback learns the regions, then what the failed plugin missed.
      if let connection = fallback.connection { announceRegions(to: connection, of: route) }
      for event in route.takeMissedEvents() { sendEvent(event, to: fallback) }
      return
    }
    route.failed = true
    logger.error("plugin failed: its regions fail closed", metadata: ["plugin": "\(route.name)", "policy": "\(policy.onFailure.rawValue)"])
    guard policy.onFailure == .kill else { return }  // poison: each fault is poisoned as it comes
    for session in clients.values where session.regions.pieces.contains(where: { $0.route.effective === route }) {
      kill(session, "killing a client whose plugin failed", plugin: route)
    }
  }

  private func route(named name: String) -> PluginRoute {
    if let route = routes[name] { return route }
    let route = PluginRoute(name: name)
    routes[name] = route
    return route
  }

  // MARK: - The fault path

  /// Sends a fault to its region's plugin (or parks it while the plugin is away).
  func sendFault(_ fault: Pagefault, piece: RegionTable.Piece, session: ClientSession) -> PagefaultResult {
    let route = piece.route.effective
    if route.failed, let uffd = session.uffd {
      // Failed closed: the access gets SIGBUS, never memory the plugin did not provide.
      let page = fault.address & ~UInt(piece.spec.pageSize - 1)
      return settle(uffd.poison(address: page, length: piece.spec.pageSize), page: page, pageSize: piece.spec.pageSize, session: session, uffd: uffd)
    }
    guard let plugin = route.connection, !plugin.isClosed, plugin.inFlight < configuration.maxInFlightPerPlugin,
          let dispatcher = session.dispatcher
    else { return .notNow }
    let page = fault.address & ~UInt(piece.spec.pageSize - 1)
    if plugin.events.isFull {
      flush(plugin)
      if plugin.isClosed { return .notNow }  // the send failed: park it for the plugin's return
    }
    let faultID = inFlight.insert(InFlight(session: session, page: page, sequence: dispatcher.sequence, plugin: plugin, sentAt: loopTime))
    plugin.inFlight += 1
    plugin.events.append(PagefaultEvent(
      faultID: faultID, clientID: session.id, regionID: piece.spec.id, address: page,
      offset: piece.offset(of: page), flags: fault.flags, threadID: fault.thread))
    markDirty(plugin)
    statistics.faultsSent += 1
    return .inFlight
  }

  /// Sends a non-fault event, in order; kept for the plugin's return if it is away.
  func sendEvent(_ event: BrokerEvent, to primary: PluginRoute) {
    let route = primary.effective
    if let plugin = route.connection, !plugin.isClosed {
      append(event, to: plugin)
      return
    }
    guard route.missedEvents.count < Self.maxMissedEvents else {
      // Dropping an event could make the plugin serve stale memory later: instead the
      // client that keeps changing its mappings while its plugin is away is failed closed.
      if let session = clients[event.clientID] { kill(session, "killing a client: too many events for an absent plugin", plugin: route) }
      return
    }
    route.missedEvents.append(event)
  }

  /// Events kept for a plugin that is away; past this a client is failed closed.
  static let maxMissedEvents = 1 << 20

  /// Fails a client closed: SIGKILL through its pidfd (never a recycled pid), with the reason logged.
  private func kill(_ session: ClientSession, _ message: Logger.Message, plugin route: PluginRoute) {
    logger.error(message, metadata: ["client.id": "\(session.id)", "client.pid": "\(session.pid)", "plugin": "\(route.name)"])
    _ = cuffd_pidfd_send_signal(session.pidfd, SIGKILL)
  }

  private func append(_ event: BrokerEvent, to plugin: PluginConnection) {
    if case .store(let store) = event, !plugin.events.canAppend(size: store.data.count) { flush(plugin) }
    if plugin.events.isFull { flush(plugin) }
    plugin.events.append(event)
    markDirty(plugin)
  }

  /// Records a plugin's delegation (or revocation) after checking that the plugin
  /// serves the region, the range is page aligned inside it, and a file is a regular file.
  private func delegate(_ delegation: Delegation, from plugin: PluginConnection) {
    var file: DelegatedRanges.File?
    if case .file(let fd, _) = delegation.source { file = DelegatedRanges.File(fd: fd) }  // closes on every refusal path
    guard let session = clients[delegation.clientID], session.phase == .active || session.phase == .opening else { return }
    let spec = session.regions.pieces.first { $0.spec.id == delegation.regionID }?.spec
      ?? session.pendingOpen?.regions.first { $0.id == delegation.regionID }
    let mask = UInt64(systemPageSize - 1)
    guard let spec, spec.plugin == plugin.name else {
      refuseDelegation(plugin, "region \(delegation.regionID) of client \(delegation.clientID) is not served by it")
      return
    }
    guard delegation.offsets.lowerBound & mask == 0, UInt64(delegation.offsets.count) & mask == 0,
          delegation.offsets.upperBound <= UInt64(spec.length), !delegation.offsets.isEmpty
    else {
      refuseDelegation(plugin, "offsets \(delegation.offsets) are not a page-aligned part of region \(spec.id)")
      return
    }
    if delegation.revoke {
      session.delegated.cut(regionID: spec.id, delegation.offsets)
      return
    }
    let source: DelegatedRanges.Source
    switch delegation.source {
    case .zero:
      source = .zero
    case .file(_, let offset):
      var info = stat()
      // pread takes an off_t: the whole range must lie below 2^63 in the file.
      guard let file, fstat(file.fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG, offset & mask == 0,
            offset <= UInt64(Int64.max) - UInt64(delegation.offsets.count)
      else {
        refuseDelegation(plugin, "a delegated file must be a regular file or memfd at a page-aligned offset below 2^63")
        return
      }
      file.map(offset..<offset + UInt64(delegation.offsets.count), size: UInt64(max(info.st_size, 0)))
      source = .file(file, offset: offset)
    }
    session.delegated.add(.init(regionID: spec.id, offsets: delegation.offsets, source: source,
                                prefetchPages: min(max(delegation.prefetchPages, 1), Self.maxDelegatedPrefetch)))
  }

  private func refuseDelegation(_ plugin: PluginConnection, _ reason: String) {
    logger.warning("refused a delegation", metadata: ["plugin": "\(plugin.name)", "reason": "\(reason)"])
    countInvalid(from: plugin)
  }

  /// What an ioctl's outcome means for the fault on `page`. An outcome that
  /// only wakes the thread (the page exists, or the range is gone) is counted:
  /// a page woken again and again without an event in between is not
  /// progressing, and its next fault fails closed (`ClientSession.pagefault`).
  private func settle(_ outcome: IoctlOutcome, page: UInt, pageSize: Int, session: ClientSession, uffd: UserfaultFD) -> PagefaultResult {
    if outcome == .alreadyPresent || outcome == .rangeGone { session.noteWoken(page) }
    return PagefaultResult(settling: outcome, address: page, length: pageSize, on: uffd)
  }

  /// Fills a fault in new memory (a grown tail, a `DONTUNMAP` source) with
  /// zeros, as the kernel would fill fresh anonymous memory: an aligned block
  /// of up to `maxDelegatedPrefetch` pages around it, inside the piece.
  func fillNewMemory(_ fault: Pagefault, piece: RegionTable.Piece, session: ClientSession) -> PagefaultResult {
    guard let uffd = session.uffd else { return .notNow }
    let pageSize = piece.spec.pageSize
    let page = fault.address & ~UInt(pageSize - 1)
    let block = UInt(Self.maxDelegatedPrefetch * pageSize)
    let range = (page / block * block..<page / block * block + block).clamped(to: piece.live)
    let outcome = fill(.zero, range: range, around: page, pageSize: pageSize, data: UnsafeRawBufferPointer(zeroPage), session: session, uffd: uffd)
    if outcome.isResolved { statistics.newMemoryFills += 1 }
    return settle(outcome, page: page, pageSize: pageSize, session: session, uffd: uffd)
  }

  /// Fails a fault the broker cannot place closed: the page is poisoned, so the
  /// access gets SIGBUS instead of zeros or a thread woken forever; where the
  /// uffd cannot poison, the client is killed. Logged and counted. EAGAIN (a
  /// map change not yet read) parks it: the events may place it after all.
  func failClosed(_ page: UInt, session: ClientSession, cause: String) -> PagefaultResult {
    guard let uffd = session.uffd else { return .notNow }
    let outcome = uffd.poison(address: page, length: systemPageSize)
    switch outcome {
    case .notNow, .partial: return .notNow
    case .rangeGone, .alreadyPresent: break  // not ours after all, or filled meanwhile: the wake settles it
    case .done, .targetExited, .failed:
      statistics.failedClosed += 1
      logger.error("failed a fault closed", metadata: [
        "client.id": "\(session.id)", "client.pid": "\(session.pid)", "fault.address": "0x\(String(page, radix: 16))",
        "cause": "\(cause)", "action": "\(outcome == .done ? "poisoned (SIGBUS at the access)" : "client killed")",
      ])
      if case .failed = outcome { _ = cuffd_pidfd_send_signal(session.pidfd, SIGKILL) }
    }
    return settle(outcome, page: page, pageSize: systemPageSize, session: session, uffd: uffd)
  }

  /// The broker-local fast path: fills a fault from a delegated range with no
  /// round trip. Returns nil (send it to the plugin) if the file cannot be read.
  func resolveLocally(_ fault: Pagefault, piece: RegionTable.Piece, delegated range: DelegatedRanges.Range, session: ClientSession) -> PagefaultResult? {
    guard let uffd = session.uffd else { return nil }
    let pageSize = piece.spec.pageSize
    let page = fault.address & ~UInt(pageSize - 1)
    let offset = piece.offset(of: page)
    // An aligned block around the fault, inside the delegated range and the live piece.
    let block = UInt64(range.prefetchPages * pageSize)
    let pieceOffsets = piece.offset..<piece.offset + UInt64(piece.live.count)
    let start = max(offset / block * block, range.offsets.lowerBound, pieceOffsets.lowerBound)
    let end = min(offset / block * block + block, range.offsets.upperBound, pieceOffsets.upperBound)
    guard let address = piece.address(ofOffset: start) else { return nil }
    var kind = DecisionKind.copy
    var fillRange = address..<address + UInt(end - start)
    var data = UnsafeRawBufferPointer(start: nil, count: 0)
    switch range.source {
    case .zero:
      if fault.flags.contains(.write) {
        // A write to a zero page would take a second, copy-on-write fault: copy zeros.
        fillRange = page..<page + UInt(pageSize)
        data = UnsafeRawBufferPointer(zeroPage)
      } else {
        kind = .zero
      }
    case .file(let file, _):
      let fileStart = range.fileOffset(of: start)!
      let length = Int(end - start)
      if let mapped = file.bytes(at: fileStart..<fileStart + UInt64(length)) {
        data = mapped
      } else {
        guard let read = read(file, at: fileStart, length: length) else { return nil }
        data = read
      }
    }
    var outcome = fill(kind, range: fillRange, around: page, pageSize: pageSize, data: data, session: session, uffd: uffd)
    if case .failed(.badAddress) = outcome, case .file(let file, _) = range.source {
      // The file shrank under the mapping: what is gone now reads as zeros.
      guard let read = read(file, at: range.fileOffset(of: start)!, length: Int(end - start)) else { return nil }
      outcome = fill(kind, range: fillRange, around: page, pageSize: pageSize, data: read, session: session, uffd: uffd)
    }
    statistics.resolvedLocally += 1
    resolvedCounter.add(1, ordering: .relaxed)
    return settle(outcome, page: page, pageSize: pageSize, session: session, uffd: uffd)
  }

  /// Reads `length` bytes of a delegated file at `offset` into `localBuffer`;
  /// past the end of the file they read as zeros. Nil if the file cannot be read.
  private func read(_ file: DelegatedRanges.File, at offset: UInt64, length: Int) -> UnsafeRawBufferPointer? {
    var done = 0
    while done < length {
      let n = pread(file.fd, localBuffer.baseAddress! + done, length - done, off_t(offset + UInt64(done)))
      if n < 0 && errno == EINTR { continue }
      if n < 0 { return nil }
      if n == 0 { break }
      done += n
    }
    if done < length { (localBuffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: length - done) }
    return UnsafeRawBufferPointer(rebasing: localBuffer[..<length])
  }

  /// Validates a decision against the live region of the fault's client and applies it.
  private func apply(_ decision: DecodedDecision, from plugin: PluginConnection) {
    guard let entry = inFlight.entry(decision.faultID) else { return }  // answered already, or its client is gone
    guard entry.plugin === plugin else {
      refuse(decision, from: plugin, "it answers fault \(decision.faultID), which was not sent to it")
      return
    }
    inFlight.remove(decision.faultID)
    plugin.inFlight -= 1
    let session = entry.session
    guard let dispatcher = session.dispatcher, let uffd = session.uffd else { return }
    let page = entry.page
    guard let kind = decision.kind else {
      refuse(decision, from: plugin, "unknown decision kind")
      dispatcher.complete(page, .notNow)
      return
    }
    if kind == .retry {
      statistics.retries += 1
      dispatcher.complete(page, .notNow)
      return
    }
    guard let piece = session.regions.piece(containing: page), !piece.isNewMemory else {
      // The range went away (or changed) while the plugin decided: the
      // redelivery finds out what the page is now (`ClientSession.pagefault`).
      dispatcher.complete(page, .notNow)
      return
    }
    let pageSize = piece.spec.pageSize
    let start = decision.length == 0 ? page : decision.address
    let length = decision.length == 0 ? pageSize : decision.length
    let mask = UInt(pageSize - 1)
    // In region offsets (stable across munmap and mremap), the range must lie inside the region as registered.
    let startOffset = Int(bitPattern: UInt(truncatingIfNeeded: piece.offset) &+ (start &- piece.live.lowerBound))
    guard start & mask == 0, UInt(length) & mask == 0, page >= start, page - start < UInt(length),
          startOffset >= 0, length <= piece.spec.length - startOffset
    else {
      refuse(decision, from: plugin, "range 0x\(String(start, radix: 16)) + \(length) is misaligned, outside region \(piece.spec.id), or misses the faulting page")
      dispatcher.complete(page, .notNow)
      return
    }
    var data = decision.data
    if kind == .copy, let offset = decision.sharedOffset {
      guard let area = plugin.sharedArea, offset & UInt64(mask) == 0, offset <= UInt64(area.bytes.count), UInt64(length) <= UInt64(area.bytes.count) - offset else {
        refuse(decision, from: plugin, "shared bytes at \(offset) + \(length) are outside its shared area")
        dispatcher.complete(page, .notNow)
        return
      }
      data = UnsafeRawBufferPointer(rebasing: area.bytes[Int(offset)..<Int(offset) + length])
    } else if kind == .copy && data.count != length {
      refuse(decision, from: plugin, "copy of \(length) bytes carries \(data.count)")
      dispatcher.complete(page, .notNow)
      return
    }
    // A prefetch may reach parts of the region that were unmapped or moved
    // away since: fill only what is live here, around the faulting page.
    let range = (start..<start + UInt(length)).clamped(to: piece.live)
    if kind == .copy { data = UnsafeRawBufferPointer(rebasing: data[Int(range.lowerBound - start)..<Int(range.upperBound - start)]) }
    if dispatcher.isStale(range, since: entry.sequence) {
      // A remove/unmap/remap of this range was read after the fault was sent:
      // the plugin decided on old state. It has seen the event by now; ask again.
      statistics.staleDecisionsDropped += 1
      dispatcher.complete(page, .notNow)
      return
    }
    let outcome = fill(kind, range: range, around: page, pageSize: pageSize, data: data, session: session, uffd: uffd)
    if case .failed(.badAddress) = outcome {
      // The kernel could not read the bytes: a shared area the plugin cannot back (a hugetlb pool run dry).
      refuse(decision, from: plugin, "its bytes could not be read (EFAULT)")
      dispatcher.complete(page, .notNow)
      return
    }
    statistics.decisionsApplied += 1
    resolvedCounter.add(1, ordering: .relaxed)
    dispatcher.complete(page, settle(outcome, page: page, pageSize: pageSize, session: session, uffd: uffd))
  }

  /// Fills `range` (the faulting `page` and maybe neighbours). While a swap-out
  /// runs, every fill reaching into it is write-protected, so no write escapes it.
  ///
  /// A range fill stops at the first page already present (EEXIST) or after a
  /// partial copy, and neither says anything of the faulting page further in
  /// (a page dropped by MADV_DONTNEED behind a present one: a balloon). Unless
  /// the whole range was filled, or nothing could be (EAGAIN), the faulting page
  /// is filled alone, and only its own outcome settles the fault.
  private func fill(_ kind: DecisionKind, range: Range<UInt>, around page: UInt, pageSize: Int, data: UnsafeRawBufferPointer,
                    session: ClientSession, uffd: UserfaultFD) -> IoctlOutcome {
    let protect = session.isSwapping(range)
    let outcome = fill(kind, range: range, data: data, uffd: uffd, writeProtect: protect)
    guard range.count > pageSize, outcome != .done, outcome != .notNow else { return outcome }
    let at = Int(page - range.lowerBound)
    let slice = kind == .copy ? UnsafeRawBufferPointer(rebasing: data[at..<at + pageSize]) : data
    return fill(kind, range: page..<page + UInt(pageSize), data: slice, uffd: uffd, writeProtect: protect)
  }

  private func fill(_ kind: DecisionKind, range: Range<UInt>, data: UnsafeRawBufferPointer, uffd: UserfaultFD, writeProtect: Bool) -> IoctlOutcome {
    switch kind {
    case .copy:
      return uffd.copy(to: range.lowerBound, from: data.baseAddress!, length: range.count, writeProtect: writeProtect)
    case .zero where writeProtect:
      // The shared zero page is read-only to the kernel, not to uffd-wp: a write
      // to it would escape the swap-out. Copy zeros, write-protected, instead.
      for page in stride(from: range.lowerBound, to: range.upperBound, by: zeroPage.count) {
        let outcome = uffd.copy(to: page, from: zeroPage.baseAddress!, length: zeroPage.count, writeProtect: true)
        if !outcome.isResolved { return outcome }
      }
      return .done
    case .zero:
      return uffd.zero(address: range.lowerBound, length: range.count)
    case .poison:
      return uffd.poison(address: range.lowerBound, length: range.count)
    case .retry:
      return .notNow
    }
  }

  private func refuse(_ decision: DecodedDecision, from plugin: PluginConnection, _ reason: String) {
    logger.warning("refused a plugin decision", metadata: ["plugin": "\(plugin.name)", "fault.id": "\(decision.faultID)", "reason": "\(reason)"])
    countInvalid(from: plugin)
  }

  /// Counts an invalid decision or delegation; a plugin that keeps sending them is dropped.
  private func countInvalid(from plugin: PluginConnection) {
    statistics.invalidDecisions += 1
    plugin.invalidDecisions += 1
    if plugin.invalidDecisions > configuration.maxInvalidDecisions {
      closePlugin(plugin, reason: "it sent \(plugin.invalidDecisions) invalid decisions", tell: BrokerError(.malformed, "too many invalid decisions"))
    }
  }

  // MARK: - Sending to plugins

  private func markDirty(_ plugin: PluginConnection) {
    if !plugin.isDirty {
      plugin.isDirty = true
      dirtyPlugins.append(plugin)
    }
  }

  private func flushPlugins() {
    for plugin in dirtyPlugins {
      plugin.isDirty = false
      if !plugin.isClosed { flush(plugin) }
    }
    dirtyPlugins.removeAll(keepingCapacity: true)
  }

  private func flush(_ plugin: PluginConnection) {
    guard !plugin.events.isEmpty else { return }
    plugin.events.packetsApplied = plugin.packetsApplied
    let count = plugin.events.encode(into: packet)
    send(UnsafeRawBufferPointer(rebasing: packet[..<count]), to: plugin)
  }

  private func send(_ bytes: [UInt8], to plugin: PluginConnection) {
    bytes.withUnsafeBytes { send($0, to: plugin) }
  }

  private func send(_ bytes: UnsafeRawBufferPointer, to plugin: PluginConnection) {
    guard !plugin.isClosed else { return }
    if plugin.backlog.isEmpty {
      do {
        if try plugin.socket.send(bytes) == .sent { return }
      } catch {
        closePlugin(plugin, reason: "\(error)")
        return
      }
      loop.modify(plugin.socket.fd, Token(.plugin, plugin.id), events: cuffd_epollin | cuffd_epollout)
    }
    // The plugin is not reading: keep order by queueing behind what is waiting.
    plugin.backlog.append(bytes)
    if plugin.backlog.bytes > 64 << 20 { closePlugin(plugin, reason: "it stopped reading its events") }
  }

  private func drainBacklog(_ plugin: PluginConnection) {
    while let first = plugin.backlog.first {
      do {
        guard try first.withUnsafeBytes({ (raw) throws(BrokerError) in try plugin.socket.send(raw) }) == .sent else { return }
      } catch {
        closePlugin(plugin, reason: "\(error)")
        return
      }
      plugin.backlog.removeFirst()
    }
    loop.modify(plugin.socket.fd, Token(.plugin, plugin.id), events: cuffd_epollin)
  }

  // MARK: - Shutdown

  private func takeID() -> UInt64 {
    defer { nextID += 1 }
    return nextID
  }

  private func shutdown() {
    logger.info("broker stopping", metadata: [
      "clients": "\(clients.count)", "plugins": "\(plugins.count)",
      "faults.sent": "\(statistics.faultsSent)", "decisions.applied": "\(statistics.decisionsApplied)",
      "faults.local": "\(statistics.resolvedLocally)", "decisions.stale": "\(statistics.staleDecisionsDropped)",
      "faults.newMemory": "\(statistics.newMemoryFills)", "faults.failedClosed": "\(statistics.failedClosed)",
      "swapped.lostBytes": "\(statistics.swappedBytesLost)",
      "decisions.invalid": "\(statistics.invalidDecisions)", "decisions.retry": "\(statistics.retries)",
    ])
    for session in clients.values {
      // A forked child cannot re-attach: what was never filled fails closed.
      if session.isForkedChild, let uffd = session.uffd { for piece in session.regions.pieces { uffd.poisonMissing(address: piece.live.lowerBound, length: piece.live.count) } }
      closeClient(session, reason: "the broker is stopping")
    }
    flushPlugins()
    for plugin in plugins.values { closePlugin(plugin, reason: "the broker is stopping") }
    supervisor?.stopAll()
  }
}
