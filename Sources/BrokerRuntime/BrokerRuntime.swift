import BrokerCore
import BrokerProtocol
import CLinux
import CUserfaultfd
import ChildProcess
import Glibc
import LinuxSupport
import Logging
import Synchronization
import SystemPackage
import Userfaultfd

/// The broker's I/O: one epoll loop serves every socket and uffd. It reads,
/// feeds what it read to the `BrokerEngine`, and performs the engine's actions
/// (sends, ioctls, closes, kills, logs); the logic is the engine's.
///
/// Single-threaded by design: the fault path takes no lock and no ioctl waits
/// on another thread. Create it, then call `run()` on the thread that should
/// serve; `stop()` may be called from any thread (or send SIGINT/SIGTERM when
/// `handleSignals` is set).
public final class BrokerRuntime: @unchecked Sendable {
  // @unchecked: all state below is confined to the thread in `run()`; `stop()`
  // only writes to an eventfd, and `faultsResolved` is atomic.
  public let configuration: BrokerConfiguration
  let logger: Logger
  let engine: BrokerEngine
  let loop: EventLoop
  let clientListener: PacketListener
  let pluginListener: PacketListener
  let controlListener: PacketListener?
  /// The configured Firecracker-style sockets (ids 1...), and those opened for one VM since.
  var firecrackerListeners: [UInt64: FirecrackerListener] = [:]
  var nextFirecrackerListener: UInt64 = 1
  private let wakeup: OwnedDescriptor
  private let signals: OwnedDescriptor
  /// Reads the configuration again (SIGHUP); nil: there is nothing to reload.
  private let reload: (() throws -> BrokerConfiguration)?
  var supervisor: PluginSupervisor?
  private var service = ServiceManager()
  /// Who each configured plugin runs as (resolved once, at start).
  private let pluginCredentials: [ChildProcess.Credentials?]
  /// Whether other uids or gids can connect to the client and plugin sockets
  /// (their files' modes), whatever the configuration lets in.
  private let openSockets: (client: Bool, plugin: Bool)
  /// Takes a status snapshot each interval (nil: no metrics, nothing to do).
  let publisher: (any StatusPublisher)?
  private var nextPublish: UInt64 = 0

  var clients: [ClientID: ClientLink] = [:]
  var plugins: [PluginID: PluginLink] = [:]
  /// Delegated files, by the handle the engine knows them by.
  var files: [FileHandle: DelegatedFileMapping] = [:]
  var nextFile: UInt64 = 1
  /// Forked children's uffds, until the engine names their client.
  var forks: [ForkTicket: UserfaultFD] = [:]
  var nextTicket: UInt64 = 1
  /// What each plugin name keeps with the broker across its connections.
  var stores: [String: DescriptorStore] = [:]
  /// A Register's userfaultfd, while the engine decides on the request.
  var registering: UserfaultFD?
  /// A Register's shared-memory file, while the engine decides on the request.
  var registeringMemory: (handle: FileHandle, mapping: SharedMemoryMapping)?
  /// The client whose request the engine is deciding on (`registering` is its).
  var readingClient: ClientID?
  /// Clients' shared-memory files, by the handle the engine knows them by (numbered with `files`).
  var memoryFiles: [FileHandle: SharedMemoryMapping] = [:]
  /// The broker's own userfaultfd, which registers its mappings of shared-memory
  /// files (see `SharedMemoryMapping`); made with the first one.
  var memoryUffd: UserfaultFD?
  var controls: [UInt64: ControlLink] = [:]
  var nextControl: UInt64 = 1
  /// What only the runtime sees (connections refused for want of descriptors, control refusals).
  var tally = Tally()
  let startedAt = monotonicNanoseconds()
  private var stopping = false
  /// The time the loop last woke up: the engine's inputs are stamped with it,
  /// not with a clock read per fault.
  var loopTime: UInt64 = 0
  /// Held in reserve: when descriptors run out (EMFILE), it is closed to accept
  /// and refuse the waiting connection, so the listener does not spin.
  var spareDescriptor = OwnedDescriptor()

  /// The largest page of zeros (a huge page's), the source of zero fills that
  /// must be copies: an anonymous mapping never written, so it costs no memory.
  let zeroPage: UnsafeRawBufferPointer = {
    let count = BrokerEngine.maxHugePageSize
    guard let pointer = mmap(nil, count, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), pointer != MAP_FAILED else {
      fatalError("the broker cannot map \(count) bytes of zeros")
    }
    return UnsafeRawBufferPointer(start: pointer, count: count)
  }()
  /// Where delegated file pages are read before they are copied in (the most a local fill takes).
  let localBuffer = UnsafeMutableRawBufferPointer.allocate(
    byteCount: BrokerEngine.localFillBytes(pageSize: BrokerEngine.maxHugePageSize, systemPageSize: systemPageSize), alignment: systemPageSize)
  let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  /// Plugin packets only: decisions are read in place, so their bytes must
  /// outlive the sends (into `packet`) that applying them may cause.
  let pluginPacket = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  let decisions = DecisionBatchDecoder()
  let arena = WireArena(capacity: 1 << 20)
  var receivedFDs: [CInt] = []
  let uffdEvents = UnsafeMutablePointer<cuffd_event>.allocate(capacity: Int(CUFFD_READ_BATCH))
  /// Clients whose read journal is open (`settleJournals`).
  var openJournals: [ClientLink] = []
  var kernelEvents: [KernelEvent] = []
  var actions: [Action] = []
  var dirtyPlugins: [PluginLink] = []

  private let resolvedCounter = Atomic<UInt64>(0)
  /// Faults resolved so far (by plugin decisions or locally); readable from any thread.
  public var faultsResolved: UInt64 { resolvedCounter.load(ordering: .relaxed) }
  /// The engine's counters (read them on the thread in `run()`, or after it returned).
  public var statistics: FaultStatistics { engine.statistics }

  /// Binds both sockets. A socket (and the directory it creates for it) is
  /// private to the broker's uid (0600/0700) unless the config lets others in;
  /// either way SO_PEERCRED decides who may do what. Throws, taking nobody's
  /// place, when a socket's directory could be written by another user
  /// (`SocketDirectory`), something not a socket is at a socket's path, or a
  /// broker already answers there (`PacketListener`).
  ///
  /// Under systemd's socket activation (`LISTEN_FDS` for this process) the
  /// sockets handed over are served instead, at the paths they are bound to;
  /// a control socket not handed over is bound as above. Throws when one is
  /// unknown, missing or of the wrong kind (`InheritedListeners`).
  ///
  /// `handleSignals`: SIGINT and SIGTERM stop `run()` cleanly, SIGHUP reloads
  /// the configuration from `reload`; they are taken from here on, so one that
  /// comes while the broker starts is not lost.
  ///
  /// `publisher`: takes a status snapshot each of its intervals (the metrics).
  public init(configuration: BrokerConfiguration, logger: Logger, handleSignals: Bool = false,
              reload: (() throws -> BrokerConfiguration)? = nil, publisher: (any StatusPublisher)? = nil) throws(BrokerError) {
    var configuration = configuration
    self.reload = reload
    self.publisher = publisher
    if handleSignals {
      switch valueOrErrno(clinux_signalfd([SIGINT, SIGTERM, SIGHUP], 3)) {
      case .success(let fd): signals = OwnedDescriptor(fd)
      case .failure(let errno): throw BrokerError(.io, "signalfd failed", errno: errno)
      }
    } else {
      signals = OwnedDescriptor()
    }
    try configuration.validate()
    try configuration.checkExecutables()
    Self.raiseDescriptorLimit()
    pluginCredentials = try PluginCredentials.resolve(configuration.plugins)
    engine = try BrokerEngine(configuration: configuration, pageSize: systemPageSize, hugePageSizes: kernelHugePageSizes(), now: monotonicNanoseconds(),
                              makeToken: { .randomToken() })
    self.logger = logger
    engine.logLevel = logger.logLevel
    var configured: [InheritedListeners.Role: String] = [.client: configuration.clientSocketPath, .plugin: configuration.pluginSocketPath]
    configured[.control] = configuration.controlSocketPath
    let inherited = try InheritedListeners.take(configured: configured)
    // Served where they are bound: the paths spawned plugins, the status and the log name.
    if let client = inherited[.client] { configuration.clientSocketPath = client.path }
    if let plugin = inherited[.plugin] { configuration.pluginSocketPath = plugin.path }
    if let control = inherited[.control] { configuration.controlSocketPath = control.path }
    self.configuration = configuration
    let (clientPrivate, pluginPrivate) = Self.privateSockets(configuration)
    // The directories of the sockets the broker binds itself (never those handed over).
    let bound = [(InheritedListeners.Role.client, configuration.clientSocketPath, clientPrivate), (.plugin, configuration.pluginSocketPath, pluginPrivate),
                 (.control, configuration.controlSocketPath ?? "", true)].filter { inherited[$0.0] == nil }.map { ($0.1, $0.2) }
    for (path, isPrivate) in bound + configuration.firecrackerSockets.map({ ($0.path, clientPrivate) }) where !path.isEmpty {
      try SocketDirectory.prepare(forSocketAt: path, mode: isPrivate && clientPrivate && pluginPrivate ? 0o700 : 0o755)
    }
    loop = try EventLoop()
    clientListener = if let client = inherited[.client] { client } else { try PacketListener(path: configuration.clientSocketPath, mode: clientPrivate ? 0o600 : 0o666) }
    pluginListener = if let plugin = inherited[.plugin] { plugin } else { try PacketListener(path: configuration.pluginSocketPath, mode: pluginPrivate ? 0o600 : 0o666) }
    controlListener = if let control = inherited[.control] { control } else {
      try configuration.controlSocketPath.map { (path) throws(BrokerError) in try PacketListener(path: path, mode: 0o600) }
    }
    openSockets = (Self.othersMayConnect(clientListener, madeOpen: !clientPrivate), Self.othersMayConnect(pluginListener, madeOpen: !pluginPrivate))
    for (role, listener, isOpen, isPrivate) in [("client", clientListener, openSockets.client, clientPrivate), ("plugin", pluginListener, openSockets.plugin, pluginPrivate)]
    where listener.isInherited && !isOpen && !isPrivate {
      logger.warning("the inherited socket lets only its owner connect: peers of other uids or gids the config allows cannot",
                     metadata: ["socket.role": "\(role)", "socket.path": "\(listener.path)"])
    }
    let vmmListeners = try configuration.firecrackerSockets.map { (socket) throws(BrokerError) in
      FirecrackerListener(try PacketListener(path: socket.path, mode: clientPrivate ? 0o600 : 0o666, stream: true), socket: socket, vmName: nil)
    }
    spareDescriptor = OwnedDescriptor(open("/dev/null", O_RDONLY | O_CLOEXEC))
    switch valueOrErrno(clinux_eventfd()) {
    case .success(let fd): wakeup = OwnedDescriptor(fd)
    case .failure(let errno): throw BrokerError(.io, "eventfd failed", errno: errno)
    }
    try loop.add(clientListener.fd, Token(.clientListener))
    try loop.add(pluginListener.fd, Token(.pluginListener))
    if let controlListener { try loop.add(controlListener.fd, Token(.controlListener)) }
    for listener in vmmListeners { try listen(listener) }
    try loop.add(wakeup.rawValue, Token(.wakeup))
    dirtyPlugins.reserveCapacity(64)
    kernelEvents.reserveCapacity(Int(CUFFD_READ_BATCH))
    actions.reserveCapacity(256)
    openJournals.reserveCapacity(64)
  }

  deinit {
    packet.deallocate()
    pluginPacket.deallocate()
    munmap(UnsafeMutableRawPointer(mutating: zeroPage.baseAddress), zeroPage.count)
    localBuffer.deallocate()
    uffdEvents.deallocate()
  }

  /// Asks `run()` to return (from any thread).
  public func stop() {
    var one: UInt64 = 1
    _ = write(wakeup.rawValue, &one, 8)
  }

  /// Serves until `stop()` or, with `handleSignals`, SIGINT/SIGTERM. Spawns
  /// the configured plugins first and stops them (TERM, wait, KILL) last.
  public func run() throws(BrokerError) {
    if signals.isValid { try loop.add(signals.rawValue, Token(.signal)) }
    loopTime = monotonicNanoseconds()  // spawned plugins connect at once
    let spawned = PluginSupervisor(
      plugins: configuration.plugins, credentials: pluginCredentials, pluginSocketPath: configuration.pluginSocketPath, logger: logger,
      adopt: { [unowned self] socket, peer, name in adoptSpawnedPlugin(socket, peer: peer, name: name) })
    supervisor = spawned
    spawned.startAll(loop: loop)
    tellGivenUp()
    let listeners: [(String, PacketListener?)] = [("client", clientListener), ("plugin", pluginListener), ("control", controlListener)]
    let inherited = listeners.compactMap { role, listener in listener?.isInherited == true ? role : nil }
    logger.info("broker serving", metadata: ["socket.client": "\(configuration.clientSocketPath)", "socket.plugin": "\(configuration.pluginSocketPath)",
                                             "socket.inherited": "\(inherited.isEmpty ? "none" : inherited.joined(separator: ","))"])
    loopTime = monotonicNanoseconds()
    service.ready(serviceStatus())
    while !stopping {
      let readyCount = loop.wait(timeout: nextTimeout())
      loopTime = monotonicNanoseconds()
      for index in 0..<readyCount {
        let (token, events) = loop.ready(at: index)
        if let token { handle(token, events) }
      }
      engine.tick(now: loopTime)
      if supervisor?.restartDue(loop: loop) == true { tellGivenUp() }
      if !controls.isEmpty { expireControls() }
      if service.tick(now: loopTime) { service.status(serviceStatus()) }
      if let publisher, loopTime >= nextPublish { publish(to: publisher) }
      perform()
      // A stream block after the ready inputs: a fault waits at most for one block.
      if let due = engine.nextStreamDeadline, due <= loopTime {
        engine.stream(now: loopTime)
        perform()
      }
      flushPlugins()
      resolvedCounter.store(engine.statistics.faultsResolved, ordering: .relaxed)
    }
    shutdown()
  }

  // MARK: - Readiness

  private func handle(_ token: Token, _ events: UInt32) {
    switch token.kind {
    case .clientListener: acceptClients()
    case .pluginListener: acceptPlugins()
    case .controlListener: acceptControl()
    case .firecrackerListener: acceptVMMs(listener: token.id)
    case .control:
      if let link = controls[token.id] { serveControl(link) }
    case .signal:
      let signal = clinux_read_signal(signals.rawValue)
      if signal == SIGHUP { return reloadConfiguration() }
      logger.info("stopping on signal", metadata: ["signal": "\(signal)"])
      stopping = true
    case .wakeup:
      stopping = true
    case .clientSocket:
      if let link = clients[token.id] { readClient(link) }
    case .clientUffd:
      if let link = clients[token.id] { readUffd(link) }
    case .clientPidfd:
      engine.clientGone(token.id, BrokerError(.disconnected, "the client process exited"), now: loopTime)
    case .plugin:
      guard let link = plugins[token.id] else { return }
      if events & clinux_epollout != 0 { drainBacklog(link) }
      if events & (clinux_epollin | clinux_epollhup | clinux_epollerr) != 0 { readPlugin(link) }
    case .child:
      supervisor?.childExited(id: token.id, loop: loop)
      tellGivenUp()
      tellGivenUp()
    }
    // Now: a decision's bytes live in `pluginPacket` until the next plugin packet is read.
    perform()
  }

  /// SIGHUP: what may change while the broker runs changes (who may connect,
  /// limits, deadlines, policies, the spawned plugins: added, removed or
  /// changed); a file the broker would not start with, or one that removes a
  /// plugin still serving clients' regions, is refused and the running
  /// configuration kept (the sockets stay those it has). Either way it says so
  /// in the log and the status.
  private func reloadConfiguration() {
    guard let reload else {
      tally.count(.configReloadRefused, "nothingToReload")
      return logger.warning("SIGHUP: the broker was started without a config file; nothing to reload")
    }
    do {
      var next = try reload()
      let (client, plugin) = Self.privateSockets(next)
      guard (client || openSockets.client) && (plugin || openSockets.plugin) else {
        throw BrokerError(.notAuthorized, """
          letting other uids or gids in needs a restart: the sockets are for the broker's uid alone (0600; \
          those systemd hands over as their socket unit's SocketMode= says)
          """)
      }
      (next.clientSocketPath, next.pluginSocketPath, next.controlSocketPath) = (configuration.clientSocketPath, configuration.pluginSocketPath, configuration.controlSocketPath)
      next.firecrackerSockets = configuration.firecrackerSockets
      try next.checkExecutables()
      let credentials = try PluginCredentials.resolve(next.plugins)
      try engine.reconfigure(next)
      supervisor?.apply(next.plugins, credentials: credentials, loop: loop)
      tally.count(.configReloaded)
      logger.notice("configuration reloaded")
    } catch {
      let error = BrokerError(error)
      tally.count(.configReloadRefused, error.code.name)
      logger.error("configuration reload refused: the running one is kept", metadata: ["reason": "\(error)"])
    }
  }

  private func nextTimeout() -> CInt {
    let tick: UInt64 = 100_000_000  // housekeeping
    let restart = supervisor?.nextRestart
    var parked = engine.nextDeadline
    if let stream = engine.nextStreamDeadline { parked = min(parked ?? stream, stream) }
    // The fault path's usual case: nothing is due before the tick, no clock read needed.
    if parked == nil && restart == nil { return CInt(tick / 1_000_000) }
    let now = monotonicNanoseconds()
    var due = now + tick
    if let parked, parked < due { due = parked }
    if let restart, restart < due { due = restart }
    return due <= now ? 0 : CInt((due - now + 999_999) / 1_000_000)
  }

  /// Whether the client and plugin sockets are for the broker's own uid alone (0600), or open to others (0666, SO_PEERCRED deciding).
  static func privateSockets(_ configuration: BrokerConfiguration) -> (client: Bool, plugin: Bool) {
    let ownerOnly = { (uids: Set<UInt32>, gids: Set<UInt32>) in uids.subtracting([getuid()]).isEmpty && gids.isEmpty }
    return (ownerOnly(configuration.clientUIDs, configuration.clientGIDs), ownerOnly(configuration.pluginUIDs, configuration.pluginGIDs))
  }

  /// Whether a socket lets other uids or gids connect: one the broker bound is
  /// as it made it (`madeOpen`: 0666); an inherited one as its file's mode
  /// says (group or other may write).
  static func othersMayConnect(_ listener: PacketListener, madeOpen: Bool) -> Bool {
    guard listener.isInherited else { return madeOpen }
    var info = stat()
    return lstat(listener.path, &info) == 0 && info.st_mode & 0o022 != 0
  }

  /// Every client costs up to three descriptors (socket, pidfd, uffd): the
  /// soft limit (often 1,024) is raised to the hard one, so the configured
  /// `maxClients` are reached before the descriptors run out.
  static func raiseDescriptorLimit() {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
    limit.rlim_cur = limit.rlim_max
    _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
  }

  /// Counts an incident only the runtime sees, and logs the 1st, 2nd, 4th,
  /// 8th... of its kind (with the count so far): a peer that provokes
  /// thousands must not flood the log.
  func report(_ level: Logger.Level, _ message: Logger.Message, _ kind: Tally.Kind, cause: String, _ metadata: Logger.Metadata) {
    tally.count(kind, cause)
    let count = tally[kind]
    guard count & (count - 1) == 0 else { return }
    logger.log(level: level, message, metadata: metadata.merging(["count": "\(count)"]) { $1 })
  }

  /// The engine learns which plugins the supervisor gave up (their policies then apply).
  private func tellGivenUp() {
    for name in supervisor?.givenUp ?? [] { engine.pluginGivenUp(name) }
  }

  /// One line for systemd's `STATUS=`.
  private func serviceStatus() -> String {
    "serving \(clients.count) clients, \(plugins.count) plugin connections; \(engine.statistics.faultsResolved) faults resolved"
  }

  /// Hands a snapshot to the publisher (once per its interval: a status costs allocations).
  private func publish(to publisher: any StatusPublisher) {
    nextPublish = loopTime + publisher.interval.nanoseconds
    publisher.publish(status())
  }

  private func shutdown() {
    service.stopping()
    // The last figures (a textfile keeps them after the broker is gone).
    if let publisher { publish(to: publisher) }
    engine.shutdown(now: monotonicNanoseconds())
    perform()
    flushPlugins()
    supervisor?.stopAll()
  }
}

extension BrokerConfiguration {
  /// With the broker's own uid as the only one allowed by default.
  public init(clientSocketPath: String, pluginSocketPath: String) {
    self.init(clientSocketPath: clientSocketPath, pluginSocketPath: pluginSocketPath, owner: getuid())
  }

  /// Checks that every spawned plugin's executable is one.
  public func checkExecutables() throws(BrokerError) {
    for (index, plugin) in plugins.enumerated() where access(plugin.executable, X_OK) != 0 {
      throw BrokerError(.malformed, "plugins[\(index)].executable \(plugin.executable) is not an executable file")
    }
  }
}
