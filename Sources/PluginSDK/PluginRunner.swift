import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport
import Userfaultfd

/// The plugin's side of the broker connection: Hello, then a loop that
/// decodes each batch of events, calls the `PagePlugin`, and answers with one
/// batch of decisions. Page bytes are written by the handler straight into a
/// page-aligned staging area; nothing is allocated per fault.
///
/// The staging area is, when possible, a memfd shared with the broker (sent
/// with Hello, sealed so it cannot shrink): decisions then name where their
/// bytes lie instead of carrying them. Its two halves alternate between
/// packets; a half is reused only once the broker reports (`packets_applied`)
/// that it applied the packet that last used it; otherwise bytes go inline.
///
/// Faults the plugin defers (`PluginDecision.later`) are answered from any
/// thread through `FaultAnswers`; the runner then waits in `poll` on the
/// socket and the answers' eventfd, and sends each answer with the next batch.
/// A plugin that never defers keeps waiting in `recv` alone, as before.
public final class PluginRunner {
  private struct RegionKey: Hashable {
    var client: UInt64
    var region: UInt64
  }

  private let plugin: any PagePlugin
  private let name: String
  private let socket: PacketSocket
  private let maxPrefetch: Int
  private let events = EventBatchDecoder()
  private let decisions = DecisionBatchEncoder()
  private let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  /// Private staging, for bytes sent inline.
  private let staging: UnsafeMutableRawBufferPointer
  /// The memfd shared with the broker (two halves), if it was set up.
  private let shared: UnsafeMutableRawBufferPointer?
  /// Where the current packet's bytes go: `staging`, or a half of `shared` at `stageOffset`.
  private var stage: UnsafeMutableRawBufferPointer
  private var stageOffset: Int?
  private var staged = 0
  private var packetsSent: UInt64 = 0
  private var packetsApplied: UInt64 = 0
  /// Room for a packet's bytes: prefetches of small pages, or a 2 MiB huge page and then some.
  private static let sharedHalf = 4 << 20
  private var regions: [RegionKey: PluginRegion] = [:] {
    didSet { lastRegion = nil }
  }
  /// The region of the last fault: runs of faults in one region skip the hashing.
  private var lastRegion: PluginRegion?
  private var fds: [CInt] = []
  /// The descriptors the broker kept for this name, received with its Hello.
  private var restored: [String: CInt] = [:]
  /// The handle the plugin answers deferred faults with; one per connection.
  private let answers: FaultAnswers
  /// The answers taken from `answers`, being sent (its storage alternates with the handle's).
  private var drained = FaultAnswers.Queue()
  /// The faults the plugin deferred and has not answered yet, by fault id.
  private var pending: [UInt64: PagefaultEvent] = [:]
  /// The socket and the answers' eventfd, for `poll` once the plugin has deferred a fault.
  private var pollSet: [pollfd]

  /// Faults answered so far (for logs and tests).
  public private(set) var faultsServed = 0
  /// Faults the plugin answered `.later` so far.
  public private(set) var faultsDeferred = 0
  /// Deferred faults not answered yet (the broker waits for each, within its deadline).
  public var faultsPending: Int { pending.count }
  /// Answers that found no fault waiting for them, dropped unsent: a second
  /// answer, an unknown id, a fault whose region closed first.
  public private(set) var answersDropped = 0
  /// Where to write `name=value` lines of statistics (at most every 100 ms), if anywhere.
  private let statsPath: String?
  private var statsWrittenAt: UInt64 = 0

  /// Connects to the broker's plugin socket and says Hello as `name`, then
  /// calls `plugin.connected(_:)` on this thread. Throws `BrokerError`: the
  /// socket cannot be reached (`io`) or is served by someone untrusted
  /// (`notAuthorized`), no default socket path (`malformed`), the broker
  /// refuses the connection (its Error: `nameTaken`, say) or does not
  /// answer Hello within 10 s (`timedOut`). Use the runner on the thread that
  /// made it: it is not thread-safe.
  /// - Parameter plugin: the handler; the runner keeps it and calls it on the thread that calls `serve()`.
  /// - Parameter name: the plugin name regions name (`RegionSpec.plugin`), as in the broker's config.
  /// - Parameter maxPrefetch: the largest range one decision may fill (the buffer handed to `pagefault`),
  ///   rounded down to pages; at most half of `PacketSocket.maxPacketSize` (a precondition).
  /// - Parameter statsPath: a file to keep `faults=N` and the plugin's `statistics` in, for monitoring.
  /// - Parameter sharedMemory: offer the broker a shared memfd for page bytes (the fast path).
  /// - Parameter socketPath: the broker's plugin socket (nil: the connection a
  ///   broker that spawned this process handed it, `UFFD_BROKER_PLUGIN_FD`,
  ///   else `SocketPaths.plugin`).
  /// - Parameter brokerUID: a uid besides root and this process's own that may
  ///   serve the socket (nil: `UFFD_BROKER_UID`, if set). Any other listener is
  ///   refused with `notAuthorized` before Hello is sent: the plugin's pages
  ///   never go to whoever squats on the path.
  public init(
    plugin: any PagePlugin, name: String, socketPath: String? = nil, brokerUID: UInt32? = nil, maxPrefetch: Int = 128 << 10,
    statsPath: String? = nil, sharedMemory: Bool = true
  ) throws(BrokerError) {
    self.plugin = plugin
    self.name = name
    self.statsPath = statsPath
    self.maxPrefetch = max(maxPrefetch / systemPageSize, 1) * systemPageSize
    precondition(self.maxPrefetch <= PacketSocket.maxPacketSize / 2, "maxPrefetch must fit a packet")
    staging = .allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
    stage = staging
    answers = try FaultAnswers(maxPrefetch: self.maxPrefetch)
    if socketPath == nil, let inherited = try Self.inheritedSocket(trusting: brokerUID) {
      socket = inherited
    } else {
      let path = if let socketPath { socketPath } else { try SocketPaths.plugin }
      socket = try PacketSocket.connect(path: path, trusting: brokerUID)
    }
    var memfd: CInt = -1
    var mapping: UnsafeMutableRawBufferPointer?
    if sharedMemory {
      memfd = clinux_sealed_memfd("uffd-plugin-pages", UInt64(2 * Self.sharedHalf))
      if memfd >= 0, let pointer = mmap(nil, 2 * Self.sharedHalf, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0), pointer != MAP_FAILED {
        mapping = UnsafeMutableRawBufferPointer(start: pointer, count: 2 * Self.sharedHalf)
      }
    }
    shared = mapping
    pollSet = [pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: answers.event, events: Int16(POLLIN), revents: 0)]
    defer { closeDescriptor(memfd) }
    decisions.setHello(Hello(role: .plugin, name: name))
    let count = decisions.encode(into: packet)
    let attached = mapping == nil ? [] : [memfd]
    let sent = attached.withUnsafeBufferPointer { fds in
      Result { () throws(BrokerError) in try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<count]), fds: fds) }
    }
    if case .failure(let error) = sent {
      // A broker that refuses a connection sends why, then shuts it: the send
      // fails (EPIPE), but the Error is there to read.
      socket.setReceiveTimeout(milliseconds: 1_000)
      if case .packet? = try? receive(), let refusal = events.error { throw refusal }
      throw error
    }
    packetsSent = 1
    chooseStage()
    socket.setReceiveTimeout(milliseconds: 10_000)
    guard try receive() == .packet else { throw BrokerError(.timedOut, "the broker did not answer Hello") }
    // With a stats file, wake up now and then to write it even when idle.
    socket.setReceiveTimeout(milliseconds: statsPath == nil ? 0 : 200)
    if let error = events.error { throw error }
    guard let hello = try events.hello, hello.role == .broker else {
      throw BrokerError(.version, "the broker did not answer Hello")
    }
    plugin.connected(DescriptorStore(restored: restored, encoder: decisions), answers: answers)
    restored = [:]
    try flush()
  }

  /// The connection the broker handed this process when it spawned it: its
  /// end of a socket pair, the descriptor named by `UFFD_BROKER_PLUGIN_FD`
  /// (taken once: the variable is removed and the descriptor made
  /// close-on-exec, so the plugin's own children get neither). nil when unset.
  /// Its peer is checked as a socket's listener is (`PacketSocket.connect`).
  private static func inheritedSocket(trusting brokerUID: UInt32?) throws(BrokerError) -> PacketSocket? {
    guard let text = getenv("UFFD_BROKER_PLUGIN_FD").map({ String(cString: $0) }) else { return nil }
    unsetenv("UFFD_BROKER_PLUGIN_FD")
    var info = stat()
    guard let fd = CInt(text), fd >= 0, fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else {
      throw BrokerError(.io, "UFFD_BROKER_PLUGIN_FD=\(text) names no socket this process holds")
    }
    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
    let socket = PacketSocket(adopting: fd)
    let peer = try socket.peerCredentials().uid
    let trusted = if let brokerUID { brokerUID } else { try SocketPaths.trustedBrokerUID }
    guard peer == 0 || peer == getuid() || peer == geteuid() || peer == trusted else {
      throw BrokerError(.notAuthorized, "the socket in UFFD_BROKER_PLUGIN_FD=\(fd) is held by uid \(peer), not root or you; refusing to send it anything")
    }
    return socket
  }

  deinit {
    answers.close()
    packet.deallocate()
    staging.deallocate()
    if let shared { munmap(shared.baseAddress, shared.count) }
  }

  /// Connects and serves until the broker closes the connection (returns) or
  /// an error occurs (throws). The one-call form of a plugin's `main`: the
  /// plugin is called on the calling thread.
  public static func run(
    _ plugin: any PagePlugin, name: String, socketPath: String? = nil, brokerUID: UInt32? = nil, maxPrefetch: Int = 128 << 10, statsPath: String? = nil
  ) throws(BrokerError) {
    try PluginRunner(plugin: plugin, name: name, socketPath: socketPath, brokerUID: brokerUID, maxPrefetch: maxPrefetch, statsPath: statsPath).serve()
  }

  /// Serves events until the broker closes the connection (returns). Throws
  /// on a malformed packet, an Error from the broker (say it dropped this
  /// plugin for invalid decisions or a missed deadline), or a failed send.
  /// An error the plugin throws refuses only that region or store, never the loop.
  /// When it returns or throws, the plugin's `FaultAnswers` drops every answer.
  public func serve() throws(BrokerError) {
    defer {
      answers.close()
      writeStatistics(force: true)
    }
    while true {
      let arrival: Arrival
      do {
        arrival = try receive()
      } catch where error.code == .disconnected {
        return
      }
      switch arrival {
      case .packet:
        if let error = events.error { throw error }
        for index in 0..<events.eventCount {
          try handle(try events.event(at: index))
        }
        // Answers that came meanwhile ride with this batch.
        if faultsDeferred > 0 { try takeAnswers() }
      case .answers:
        try takeAnswers()
      case .idle:
        writeStatistics(force: true)
        continue
      }
      try flush()
      writeStatistics(force: false)
    }
  }

  private func writeStatistics(force: Bool) {
    guard let statsPath else { return }
    let now = monotonicNanoseconds()
    guard force || now - statsWrittenAt > 100_000_000 else { return }
    statsWrittenAt = now
    let deferred = faultsDeferred == 0 ? [] : [("faultsDeferred", faultsDeferred), ("faultsPending", pending.count), ("answersDropped", answersDropped)]
    let text = ([("faults", faultsServed)] + deferred + plugin.statistics).map { "\($0.0)=\($0.1)\n" }.joined()
    guard let file = fopen(statsPath + ".tmp", "w") else { return }
    fputs(text, file)
    fclose(file)
    rename(statsPath + ".tmp", statsPath)
  }

  private enum Arrival {
    /// A packet, decoded into `events`.
    case packet
    /// No packet, but deferred answers wait (`FaultAnswers`).
    case answers
    /// Neither, within the receive timeout.
    case idle
  }

  /// Receives and decodes one packet. Once the plugin has deferred a fault,
  /// waits for the socket or the deferred answers, whichever comes first.
  private func receive() throws(BrokerError) -> Arrival {
    if faultsDeferred > 0 {
      let ready = pollSet.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, 2, statsPath == nil ? -1 : 200) }
      guard ready > 0 else { return .idle }  // the timeout, or EINTR
      if pollSet[0].revents == 0 { return pollSet[1].revents == 0 ? .idle : .answers }
    }
    fds.removeAll(keepingCapacity: true)
    switch try socket.receive(into: packet, fds: &fds, blocking: faultsDeferred == 0) {
    case .packet(let count):
      defer { fds.forEach(closeDescriptor) }  // those not taken as restored
      try events.decode(UnsafeRawBufferPointer(rebasing: packet[..<count]))
      let kept = try events.keptNames
      if !kept.isEmpty && kept.count <= fds.count {
        for (index, name) in kept.enumerated() { restored[name] = fds[index] }
        fds.removeFirst(kept.count)
      }
      packetsApplied = max(packetsApplied, events.packetsApplied)
      return .packet
    case .wouldBlock:
      return .idle
    case .closed:
      throw BrokerError(.disconnected, "the broker closed the connection")
    }
  }

  private func flush() throws(BrokerError) {
    guard !decisions.isEmpty else { return }
    let count = decisions.encode(into: packet)
    defer {
      packetsSent += 1
      staged = 0
      chooseStage()
    }
    let descriptors = decisions.descriptors
    defer { descriptors.forEach(closeDescriptor) }  // the broker has its own copies now
    if descriptors.isEmpty {
      try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<count]))
    } else {
      let sent = descriptors.withUnsafeBufferPointer { fds in
        Result { () throws(BrokerError) in try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<count]), fds: fds) }
      }
      _ = try sent.get()
    }
  }

  /// Picks where the next packet's bytes go: the shared half it owns if the
  /// broker has applied the packet before last (which used that half), else inline.
  private func chooseStage() {
    let next = packetsSent + 1
    if let shared, packetsApplied + 2 >= next {
      let offset = Int(next % 2) * Self.sharedHalf
      stage = UnsafeMutableRawBufferPointer(rebasing: shared[offset..<offset + Self.sharedHalf])
      stageOffset = offset
    } else {
      stage = staging
      stageOffset = nil
    }
  }

  private func handle(_ event: BrokerEvent) throws(BrokerError) {
    switch event {
    case .pagefault(let fault):
      try serve(fault)
    case .regionOpened(let clientID, let client, let spec, let parentID, let token):
      let region = PluginRegion(clientID: clientID, client: client, spec: spec, clientToken: token)
      var refusal: BrokerError?
      do {
        if spec.pageSize > Self.sharedHalf || (spec.pageSize > PacketSocket.maxPacketSize / 2 && shared == nil) {
          // A huge page's bytes fit no packet: they go through the shared area only.
          throw BrokerError(.pluginRefused, "region \(spec.id) has \(spec.pageSize)-byte pages, more than this plugin's buffers hold")
        }
        if parentID == 0 {
          try plugin.regionOpened(region)
        } else if let parent = regions[RegionKey(client: parentID, region: spec.id)] {
          region.base = parent.base
          try plugin.regionForked(region, from: parent)
        } else {
          throw BrokerError(.pluginRefused, "the parent's region \(spec.id) of client \(parentID) is not open here")
        }
        regions[RegionKey(client: clientID, region: spec.id)] = region
        sendDelegations(of: region)
      } catch let error as BrokerError {
        refusal = error
      } catch {
        refusal = BrokerError(.pluginRefused, "\(error)")
      }
      // A forked child's stored pages are its parent's (regionForked copied them).
      let lost = refusal == nil && parentID == 0 ? spec.swappedOut.filter { !plugin.holds($0, in: region) } : []
      decisions.append(RegionReply(clientID: clientID, regionID: spec.id, error: refusal, lost: lost))
    case .removed(let range):
      if let region = regions[RegionKey(client: range.clientID, region: range.regionID)] {
        let offsets = range.startOffset..<range.startOffset + UInt64(range.range.count)
        if range.swappedOut { plugin.swappedOut(offsets, in: region) } else { plugin.removed(offsets, in: region) }
      }
    case .store(let store):
      var refusal: BrokerError?
      if let region = regions[RegionKey(client: store.clientID, region: store.regionID)] {
        do {
          try store.data.withUnsafeBytes { try plugin.store($0, at: store.offset, in: region) }
        } catch let error as BrokerError {
          refusal = error
        } catch {
          refusal = BrokerError(.pluginRefused, "\(error)")
        }
      } else {
        refusal = BrokerError(.badRegion, "region \(store.regionID) of client \(store.clientID) is not open here")
      }
      decisions.append(StoreReply(storeID: store.storeID, error: refusal))
    case .unmapped(let range):
      if let region = regions[RegionKey(client: range.clientID, region: range.regionID)] {
        plugin.unmapped(range.startOffset..<range.startOffset + UInt64(range.range.count), in: region)
      }
    case .remapped(let remap):
      if let region = regions[RegionKey(client: remap.clientID, region: remap.regionID)] {
        region.base = remap.newBase
        plugin.remapped(region)
      }
    case .regionClosed(let clientID, let regionID):
      try retryPending { $0.clientID == clientID && $0.regionID == regionID }
      if let region = regions.removeValue(forKey: RegionKey(client: clientID, region: regionID)) { plugin.regionClosed(region) }
    case .closed(let clientID, let reason):
      // The broker closed every region of the client before (RegionClosed on the wire).
      try retryPending { $0.clientID == clientID }
      for key in regions.keys where key.client == clientID { regions[key] = nil }
      plugin.clientClosed(clientID, reason: reason)
    case .decisionRefused(let faultID, let cause, let reason):
      plugin.decisionRefused(faultID: faultID, cause: cause, reason: reason)
    }
  }

  private func serve(_ event: PagefaultEvent) throws(BrokerError) {
    let region = region(of: event)
    // The fault's buffer: `maxPrefetch`, or one whole page of a huge-page region.
    let room = max(maxPrefetch, region?.pageSize ?? 0)
    try makeRoom(room)
    // No region, or a huge page while no shared half is free (its bytes fit no packet): asked again later.
    guard let region, stage.count - staged >= room else {
      decisions.append(faultID: event.faultID, kind: .retry, address: event.address, length: 0)
      return
    }
    let buffer = UnsafeMutableRawBufferPointer(rebasing: stage[staged..<staged + room])
    let fault = PluginFault(faultID: event.faultID, address: event.address, offset: event.offset, flags: event.flags, threadID: event.threadID)
    faultsServed += 1
    let decision = plugin.pagefault(fault, in: region, buffer: buffer)
    if !region.pendingDelegations.isEmpty { sendDelegations(of: region) }
    append(decision, for: event, pageSize: region.pageSize, buffer: buffer)
  }

  /// Sends the batch first if the next decision might not fit it: its bytes
  /// the stage, or the decision the packet.
  private func makeRoom(_ room: Int) throws(BrokerError) {
    if stage.count - staged < room || !decisions.canAppend(dataLength: stageOffset == nil ? room : 0) {
      try flush()
      if staged == 0 && stageOffset == nil && shared != nil { chooseStage() }  // the broker may have caught up since
    }
  }

  /// Appends the decision for `event`; a copy's bytes are at the start of
  /// `buffer`, which is the stage from `staged` on. `.later` makes it pending.
  private func append(_ decision: PluginDecision, for event: PagefaultEvent, pageSize: Int, buffer: UnsafeMutableRawBufferPointer) {
    let sharedOffset = stageOffset.map { UInt64($0 + staged) }
    switch decision {
    case .copy:
      decisions.append(faultID: event.faultID, kind: .copy, address: event.address, length: pageSize,
                       data: sharedOffset == nil ? UnsafeRawBufferPointer(rebasing: buffer[..<pageSize]) : nil, sharedOffset: sharedOffset)
      staged += pageSize
    case .copyRange(let offset, let length):
      precondition(length > 0 && length <= buffer.count, "copyRange of \(length) bytes exceeds the buffer of \(buffer.count)")
      decisions.append(faultID: event.faultID, kind: .copy, address: address(of: offset, for: event), length: length,
                       data: sharedOffset == nil ? UnsafeRawBufferPointer(rebasing: buffer[..<length]) : nil, sharedOffset: sharedOffset)
      staged += (length + systemPageSize - 1) / systemPageSize * systemPageSize
    case .zero:
      decisions.append(faultID: event.faultID, kind: .zero, address: event.address, length: pageSize)
    case .zeroRange(let offset, let length):
      decisions.append(faultID: event.faultID, kind: .zero, address: address(of: offset, for: event), length: length)
    case .retry:
      decisions.append(faultID: event.faultID, kind: .retry, address: event.address, length: 0)
    case .poison:
      decisions.append(faultID: event.faultID, kind: .poison, address: event.address, length: pageSize)
    case .later:
      pending[event.faultID] = event
      faultsDeferred += 1
    }
  }

  /// Sends the deferred answers that came (`FaultAnswers`): each one that
  /// finds its fault pending is appended as if `pagefault` had returned it,
  /// its bytes copied into the stage; the others are dropped and counted.
  private func takeAnswers() throws(BrokerError) {
    answers.take(into: &drained)
    for answer in drained.answers {
      guard let event = pending.removeValue(forKey: answer.faultID) else {
        answersDropped += 1
        continue
      }
      let pageSize = region(of: event)?.pageSize ?? systemPageSize
      let room = max(maxPrefetch, pageSize)
      try makeRoom(room)
      guard stage.count - staged >= room else {  // a huge page while no shared half is free
        decisions.append(faultID: event.faultID, kind: .retry, address: event.address, length: 0)
        continue
      }
      let buffer = UnsafeMutableRawBufferPointer(rebasing: stage[staged..<staged + room])
      if !answer.bytes.isEmpty {
        drained.bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[answer.bytes])) }
      }
      append(answer.decision, for: event, pageSize: pageSize, buffer: buffer)
    }
  }

  /// Answers `.retry` for the pending faults whose region or client closed,
  /// and forgets them (a late answer is then dropped). The broker may still
  /// wait for them (a region the client removed keeps its faults in flight),
  /// and a retry lets it settle them as the memory is now.
  private func retryPending(where isClosed: (PagefaultEvent) -> Bool) throws(BrokerError) {
    guard !pending.isEmpty else { return }
    for (faultID, event) in pending where isClosed(event) {
      pending[faultID] = nil
      try makeRoom(0)
      decisions.append(faultID: faultID, kind: .retry, address: event.address, length: 0)
    }
  }

  private func region(of fault: PagefaultEvent) -> PluginRegion? {
    if let last = lastRegion, last.clientID == fault.clientID, last.spec.id == fault.regionID { return last }
    lastRegion = regions[RegionKey(client: fault.clientID, region: fault.regionID)]
    return lastRegion
  }

  private func sendDelegations(of region: PluginRegion) {
    // At most CLINUX_MAX_FDS descriptors ride on one packet: flush in between.
    for (delegation, file) in region.pendingDelegations {
      if file != nil, decisions.descriptorCount >= 8 { try? flush() }
      decisions.append(delegation, file: file)
    }
    region.pendingDelegations.removeAll()
  }

  /// The address of region offset `offset`, in the same live piece as the fault.
  private func address(of offset: UInt64, for event: PagefaultEvent) -> UInt {
    event.address &- UInt(truncatingIfNeeded: event.offset) &+ UInt(truncatingIfNeeded: offset)
  }
}
