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

  /// Faults answered so far (for logs and tests).
  public private(set) var faultsServed = 0
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
    defer { closeDescriptor(memfd) }
    decisions.setHello(Hello(role: .plugin, name: name))
    let count = decisions.encode(into: packet)
    let attached = mapping == nil ? [] : [memfd]
    let sent = attached.withUnsafeBufferPointer { fds in
      Result { () throws(BrokerError) in try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<count]), fds: fds) }
    }
    _ = try sent.get()
    packetsSent = 1
    chooseStage()
    socket.setReceiveTimeout(milliseconds: 10_000)
    guard try receive() else { throw BrokerError(.timedOut, "the broker did not answer Hello") }
    // With a stats file, wake up now and then to write it even when idle.
    socket.setReceiveTimeout(milliseconds: statsPath == nil ? 0 : 200)
    if let error = events.error { throw error }
    guard let hello = try events.hello, hello.role == .broker else {
      throw BrokerError(.version, "the broker did not answer Hello")
    }
    plugin.connected(DescriptorStore(restored: restored, encoder: decisions))
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
  public func serve() throws(BrokerError) {
    defer { writeStatistics(force: true) }
    while true {
      do {
        guard try receive() else {
          writeStatistics(force: true)
          continue
        }
      } catch where error.code == .disconnected {
        return
      }
      if let error = events.error { throw error }
      for index in 0..<events.eventCount {
        try handle(try events.event(at: index))
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
    let text = ([("faults", faultsServed)] + plugin.statistics).map { "\($0.0)=\($0.1)\n" }.joined()
    guard let file = fopen(statsPath + ".tmp", "w") else { return }
    fputs(text, file)
    fclose(file)
    rename(statsPath + ".tmp", statsPath)
  }

  /// Receives and decodes one packet; false when the receive timeout passed first.
  private func receive() throws(BrokerError) -> Bool {
    fds.removeAll(keepingCapacity: true)
    switch try socket.receive(into: packet, fds: &fds, blocking: true) {
    case .packet(let count):
      defer { fds.forEach(closeDescriptor) }  // those not taken as restored
      try events.decode(UnsafeRawBufferPointer(rebasing: packet[..<count]))
      let kept = try events.keptNames
      if !kept.isEmpty && kept.count <= fds.count {
        for (index, name) in kept.enumerated() { restored[name] = fds[index] }
        fds.removeFirst(kept.count)
      }
      packetsApplied = max(packetsApplied, events.packetsApplied)
      return true
    case .wouldBlock:
      return false
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
      if let region = regions.removeValue(forKey: RegionKey(client: clientID, region: regionID)) { plugin.regionClosed(region) }
    case .closed(let clientID, let reason):
      // The broker closed every region of the client before (RegionClosed on the wire).
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
    if stage.count - staged < room || !decisions.canAppend(dataLength: stageOffset == nil ? room : 0) {
      try flush()
      if staged == 0 && stageOffset == nil && shared != nil { chooseStage() }  // the broker may have caught up since
    }
    // No region, or a huge page while no shared half is free (its bytes fit no packet): asked again later.
    guard let region, stage.count - staged >= room else {
      decisions.append(faultID: event.faultID, kind: .retry, address: event.address, length: 0)
      return
    }
    let pageSize = region.pageSize
    let buffer = UnsafeMutableRawBufferPointer(rebasing: stage[staged..<staged + room])
    let sharedOffset = stageOffset.map { UInt64($0 + staged) }
    let fault = PluginFault(faultID: event.faultID, address: event.address, offset: event.offset, flags: event.flags, threadID: event.threadID)
    faultsServed += 1
    let decision = plugin.pagefault(fault, in: region, buffer: buffer)
    if !region.pendingDelegations.isEmpty { sendDelegations(of: region) }
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
