import BrokerCore
import BrokerProtocol
import CLinux
import CUserfaultfd
import Glibc
import LinuxSupport
import SystemPackage
import Userfaultfd

/// Accepting connections and reading sockets and uffds: what is read becomes an input of the engine.
extension BrokerRuntime {
  // MARK: - Accepting

  /// Accepts one connection; nil when none is waiting. Out of descriptors, it
  /// uses the spare one to accept the connection and refuse it with `refusal`,
  /// and keeps serving everyone already connected.
  func accept(from listener: PacketListener, role: String, refusal: (PacketSocket, BrokerError) -> Void) -> PacketSocket? {
    do {
      return try listener.accept()
    } catch where error.errno == .tooManyOpenFiles || error.errno == .tooManyOpenFilesInSystem {
      // accept(2) fails for want of a descriptor before it looks for a connection:
      // refuse one (if any) and let the next wakeup handle the rest.
      spareDescriptor = OwnedDescriptor()
      if let socket = try? listener.accept() {
        report(.error, "out of descriptors: refusing a new connection", .connectionRefusedNoDescriptors, cause: role, ["role": "\(role)"])
        refusal(socket, BrokerError(.limit, "the broker is out of file descriptors; try again later"))
      }
      spareDescriptor = OwnedDescriptor(open("/dev/null", O_RDONLY | O_CLOEXEC))
      return nil
    } catch {
      logger.error("cannot accept a connection", metadata: ["role": "\(role)", "error": "\(error)"])
      return nil
    }
  }

  func acceptClients() {
    acceptAll(from: clientListener, role: "client", refusal: tellClient) { socket, peer in
      guard let pidfd = takePidfd(of: socket, peer: peer) else { return }
      admitClient(socket, pidfd: pidfd, engine.clientConnected(peer, now: loopTime), vmm: nil)
    }
  }

  func acceptPlugins() {
    acceptAll(from: pluginListener, role: "plugin", refusal: tellPlugin) { admitPlugin($0, engine.pluginConnected($1, now: loopTime)) }
  }

  /// A plugin the supervisor spawned, on the broker's end of its socket pair:
  /// from here on a plugin connection like any other, except that the engine
  /// lets it in by name (its configured one) rather than by uid.
  func adoptSpawnedPlugin(_ socket: PacketSocket, peer: PeerCredentials, name: String) {
    admitPlugin(socket, engine.pluginConnected(peer, spawnedAs: name, now: loopTime))
  }

  /// Accepts every waiting connection and hands it, with its peer, to `admit`.
  func acceptAll(from listener: PacketListener, role: String, refusal: (PacketSocket, BrokerError) -> Void,
                         admit: (PacketSocket, PeerCredentials) -> Void) {
    while let socket = accept(from: listener, role: role, refusal: refusal) {
      guard let peer = try? socket.peerCredentials() else { continue }
      admit(socket, peer)
    }
  }

  /// A pidfd of the process that connected, taken at accept (a pid looked up
  /// later may name another process by then). Without one the connection is
  /// refused: as out of descriptors (a `.limit` the client may retry) when that
  /// is why, else because the process is gone (or its pid names another by now).
  func takePidfd(of socket: PacketSocket, peer: PeerCredentials) -> OwnedDescriptor? {
    switch PeerPidfd.take(of: socket.fd, peer: peer) {
    case .success(let pidfd):
      return pidfd
    case .failure(let errno) where errno == .tooManyOpenFiles || errno == .tooManyOpenFilesInSystem:
      report(.error, "out of descriptors: refusing a new connection", .connectionRefusedNoDescriptors, cause: "client", ["role": "client"])
      tellClient(socket, BrokerError(.limit, "the broker is out of file descriptors; try again later"))
    case .failure(let errno):
      let error = BrokerError(.io, "no pidfd of the connecting process (it has exited, or its pid now names another process)", errno: errno)
      report(.warning, "client refused", .clientRefused, cause: "noPidfd", ["error": "\(error)", "peer.pid": "\(peer.pid)", "pidfd.method": "\(PeerPidfd.preferred)"])
      tellClient(socket, error)
    }
    return nil
  }

  /// A client connection the engine let in (or refused: it is told why) is
  /// kept and watched, with the pidfd taken at accept.
  func admitClient(_ socket: PacketSocket, pidfd: consuming OwnedDescriptor, _ connected: Result<ClientID, BrokerError>, vmm: VMMHandshake?) {
    guard case .success(let id) = connected else {
      // A VMM reads nothing of ours: it is only disconnected (the engine logged why).
      if case .failure(let error) = connected { if vmm == nil { tellClient(socket, error) } else { finish(socket) } }
      return
    }
    let link = ClientLink(id: id, socket: socket)
    link.pidfd = pidfd
    link.vmm = vmm
    clients[id] = link
    do {
      try loop.add(socket.fd, Token(.clientSocket, id))
    } catch {
      engine.clientGone(id, BrokerError(.io, "its socket could not be watched"), now: loopTime)
    }
  }

  /// A plugin connection the engine let in (or refused: it is told why) is kept and watched.
  private func admitPlugin(_ socket: PacketSocket, _ connected: Result<PluginID, BrokerError>) {
    switch connected {
    case .failure(let error):
      tellPlugin(socket, error)
    case .success(let id):
      do {
        try loop.add(socket.fd, Token(.plugin, id))
        plugins[id] = PluginLink(id: id, socket: socket)
      } catch {
        engine.pluginGone(id, BrokerError(.io, "its socket could not be watched"), now: loopTime)
      }
    }
  }

  func tellClient(_ socket: PacketSocket, _ error: BrokerError) {
    let bytes = ClientWire.encode(BrokerReply(requestID: 0, .error(error)))
    _ = bytes.withUnsafeBytes { try? socket.send($0) }
    finish(socket)
  }

  /// Sends a plugin connection an Error, best effort (it is about to be closed).
  func tellPlugin(_ socket: PacketSocket, _ error: BrokerError) {
    _ = EventBatchEncoder.encodeControl(hello: nil, error: error).withUnsafeBytes { try? socket.send($0) }
    finish(socket)
  }

  // MARK: - Clients

  /// One packet of a client's (or VMM's) socket into `packet`, its descriptors
  /// into `receivedFDs`; nil when the receive failed (the client is failed then).
  func receive(from socket: PacketSocket, of link: ClientLink) -> PacketSocket.ReceiveResult? {
    receivedFDs.removeAll(keepingCapacity: true)
    do {
      return try socket.receive(into: packet, fds: &receivedFDs)
    } catch {
      receivedFDs.forEach(closeDescriptor)
      engine.clientFailed(link.id, error, now: loopTime)
      return nil
    }
  }

  func readClient(_ link: ClientLink) {
    if link.vmm != nil { return readVMM(link) }
    guard let socket = link.socket else { return }
    while clients[link.id] === link {
      guard let result = receive(from: socket, of: link) else { return }
      switch result {
      case .wouldBlock: return
      case .closed:
        engine.clientGone(link.id, BrokerError(.disconnected, "the client closed its connection"), now: loopTime)
        return
      case .packet(let count):
        var fds = receivedFDs
        defer { fds.forEach(closeDescriptor) }  // those no one took over
        let request: ClientRequest
        do {
          request = try ClientWire.decodeRequest(UnsafeRawBufferPointer(rebasing: packet[..<count]), arena: arena)
        } catch {
          engine.undecodableRequest(link.id, error, now: loopTime)
          return
        }
        let descriptors = attached(&fds, to: request)
        readingClient = link.id
        engine.clientRequest(link.id, request, descriptors: descriptors, now: loopTime)
        perform()  // `.adoptUffd` takes `registering` (and `registeringMemory`)
        readingClient = nil
        registering = nil
        registeringMemory = nil
      }
    }
  }

  /// What the engine needs to know of a request's descriptors. A Register's one
  /// descriptor is adopted as a userfaultfd, its features read from the kernel
  /// (not from the message); it waits in `registering` for the engine's verdict.
  /// A second descriptor is the shared-memory file of the client's shared-memory
  /// regions: checked and mapped (`SharedMemoryMapping`), in `registeringMemory` likewise.
  private func attached(_ fds: inout [CInt], to request: ClientRequest) -> AttachedDescriptors {
    guard case .register(let register) = request.body, fds.count == 1 || fds.count == 2 else {
      return fds.isEmpty ? .none : .several(fds.count)
    }
    let uffd: UserfaultFD
    do {
      uffd = try UserfaultFD(adopting: FileDescriptor(rawValue: fds[0]), features: nil, ioctls: register.ioctls)
      fds[0] = -1  // the uffd object owns (and closes) the descriptor now
    } catch {
      return .notUserfaultfd(BrokerError(.notUserfaultfd, "the attached descriptor: \(error.message)"))
    }
    registering = uffd
    guard fds.count == 2 else { return .userfaultfd(uffd.features) }
    let fd = fds[1]
    fds.removeAll()  // the mapping owns (and closes) the file now, kept or refused
    do throws(BrokerError) {
      let mapping = try SharedMemoryMapping(adopting: fd, pageSize: systemPageSize, uffd: brokerMemoryUffd)
      let handle = FileHandle(nextFile)
      nextFile += 1
      registeringMemory = (handle, mapping)
      return .userfaultfdAndFile(uffd.features, .success(SharedMemoryFile(handle: handle, size: mapping.size)))
    } catch {
      return .userfaultfdAndFile(uffd.features, .failure(error))
    }
  }

  /// The broker's own userfaultfd for its mappings of shared-memory files:
  /// user-mode only (it only ever fills), made once.
  private func brokerMemoryUffd() throws(BrokerError) -> UserfaultFD {
    if let memoryUffd { return memoryUffd }
    do {
      let uffd = try UserfaultFD.create(features: [], options: UserfaultFD.Options(userModeOnly: true))
      memoryUffd = uffd
      return uffd
    } catch {
      throw BrokerError(.internal, "the broker cannot create a userfaultfd for shared memory: \(error)")
    }
  }

  /// Fault injection for the tests (`UFFD_BROKER_CRASH_AFTER_READING=remove`):
  /// the broker kills itself right after a read that returned a REMOVE, before
  /// acting on it, the window its clients' read journals cover.
  static let crashAfterReadingRemove = getenv("UFFD_BROKER_CRASH_AFTER_READING").map { String(cString: $0) } == "remove"

  /// The journals of reads whose notices are all sent: settled (a full client
  /// socket keeps a journal open until its notices go).
  func settleJournals() {
    openJournals.removeAll { link in
      guard let journal = link.journal, journal.isOpen else { return true }
      guard clients[link.id] === link, !engine.hasUnsentNotices(link.id) else { return clients[link.id] !== link }
      journal.settle()
      return true
    }
  }

  /// Reads the client's uffd until EAGAIN and hands the engine what was read.
  func readUffd(_ link: ClientLink) {
    guard let uffd = link.uffd else { return }
    kernelEvents.removeAll(keepingCapacity: true)
    if let journal = link.journal {
      if !journal.isOpen { openJournals.append(link) }
      journal.begin()
    }
    while true {
      let fd = uffd.fileDescriptor.rawValue
      let count = link.journal?.read(fd, into: uffdEvents, max: CInt(CUFFD_READ_BATCH)) ?? Int(cuffd_read_events(fd, uffdEvents, CInt(CUFFD_READ_BATCH)))
      if Self.crashAfterReadingRemove && (0..<max(count, 0)).contains(where: { uffdEvents[$0].event == cuffd_event_remove }) { raise(SIGKILL) }
      if count == -Int(EAGAIN) || count == 0 { break }
      if count < 0 {
        let errno = Errno(rawValue: CInt(-count))
        logger.warning("client userfaultfd failed", metadata: ["client.id": "\(link.id)", "error": "\(errno)"])
        // Its events are lost: its memory can no longer be followed.
        kernelEvents.forEach { if case .fork(let ticket, _) = $0 { forks[ticket] = nil } }
        engine.clientGone(link.id, BrokerError(.io, "reading its userfaultfd failed", errno: errno), now: loopTime)
        return
      }
      for index in 0..<count { kernelEvents.append(kernelEvent(uffdEvents[index], of: link, uffd: uffd)) }
      if count < Int(CUFFD_READ_BATCH) { break }
    }
    guard !kernelEvents.isEmpty else { return }
    engine.uffdEvents(link.id, kernelEvents, now: loopTime)
  }

  private func kernelEvent(_ event: cuffd_event, of link: ClientLink, uffd: UserfaultFD) -> KernelEvent {
    switch event.event {
    case cuffd_event_pagefault:
      return .pagefault(Pagefault(address: UInt(event.a), flags: .init(rawValue: event.flags), thread: Int32(bitPattern: event.thread)))
    case cuffd_event_remove:
      return .remove(UInt(event.a)..<UInt(event.b))
    case cuffd_event_unmap:
      return .unmap(UInt(event.a)..<UInt(event.b))
    case cuffd_event_remap:
      return .remap(from: UInt(event.a), to: UInt(event.b), length: Int(event.length))
    default:  // cuffd_event_fork
      let ticket = ForkTicket(nextTicket)
      nextTicket += 1
      if let child = try? UserfaultFD(adopting: FileDescriptor(rawValue: event.fd), features: uffd.features, ioctls: uffd.ioctls) {
        forks[ticket] = child
      } else {
        closeDescriptor(event.fd)
      }
      return .fork(ticket, wipedOnFork: ProcessMappings.wipedOnFork(pid: engine.pid(of: link.id)))
    }
  }

  // MARK: - Plugins

  /// Handles one packet of a plugin. One per wakeup: epoll is level-triggered,
  /// so more wake us again, and a drain-until-EAGAIN would cost a failing
  /// recvmsg per packet.
  func readPlugin(_ link: PluginLink) {
    receivedFDs.removeAll(keepingCapacity: true)
    let result: PacketSocket.ReceiveResult
    do {
      result = try link.socket.receive(into: pluginPacket, fds: &receivedFDs)
    } catch {
      engine.pluginGone(link.id, error, tell: true, now: loopTime)
      return
    }
    switch result {
    case .wouldBlock: return
    case .closed:
      engine.pluginGone(link.id, BrokerError(.disconnected, "the plugin closed its connection"), now: loopTime)
    case .packet(let count):
      defer {  // those no delegation or store took
        receivedFDs.forEach(closeDescriptor)
        receivedFDs.removeAll(keepingCapacity: true)
      }
      do {
        try decisions.decode(UnsafeRawBufferPointer(rebasing: pluginPacket[..<count]))
        try handlePluginPacket(link)
        link.packetsApplied += 1
      } catch {
        engine.pluginGone(link.id, error, tell: true, now: loopTime)
      }
    }
  }

  private func handlePluginPacket(_ link: PluginLink) throws(BrokerError) {
    let now = loopTime
    guard engine.isWelcomed(link.id) else {
      if let fd = receivedFDs.first { link.sharedArea = try SharedArea(fd: fd) }
      try engine.pluginHello(link.id, try decisions.hello, sharedAreaSize: link.sharedArea?.bytes.count ?? 0, now: now)
      return
    }
    for index in 0..<decisions.decisionCount {
      if let decision = decisions.decision(at: index) { engine.decision(link.id, decision, now: now) }
    }
    // Delegations before region replies: a reply may activate the client, whose
    // first faults must already find the ranges its plugin handed over.
    let delegations = try decisions.delegations(descriptorCount: receivedFDs.count)
    for received in delegations {
      let delegation = received.delegation
      var file: DelegatedFile?
      if case .file(let offset) = delegation.source, let index = received.fileIndex {
        let fd = receivedFDs[index]
        receivedFDs[index] = -1  // ownership moves to the mapping (released if the engine refuses it)
        let mapping = DelegatedFileMapping(OwnedDescriptor(fd))
        let size = mapping.regularFileSize()
        if let size, offset <= UInt64(Int64.max) - UInt64(delegation.offsets.count) {
          mapping.map(offset..<offset + UInt64(delegation.offsets.count), size: size)
        }
        let handle = FileHandle(nextFile)
        nextFile += 1
        files[handle] = mapping
        file = DelegatedFile(handle: handle, isRegular: size != nil)
      }
      engine.delegation(link.id, delegation, file: file, now: now)
    }
    // Then the descriptors to keep, in order, after those of file delegations.
    let keep = try decisions.keepNames
    let firstKept = delegations.count { $0.fileIndex != nil }
    guard receivedFDs.count - firstKept >= keep.count else { throw BrokerError(.malformed, "\(keep.count) descriptors to keep, \(receivedFDs.count - firstKept) attached") }
    if !keep.isEmpty, let name = engine.name(ofPlugin: link.id) {
      for (offset, keptName) in keep.enumerated() {
        let fd = receivedFDs[firstKept + offset]
        receivedFDs[firstKept + offset] = -1  // the store owns it now, kept or closed
        try store(of: name).keep(fd, as: keptName)
      }
    }
    for reply in try decisions.regionReplies { engine.regionReply(link.id, reply, now: now) }
    for reply in decisions.storeReplies { engine.storeReply(link.id, reply, now: now) }
  }

  func store(of name: String) -> DescriptorStore {
    if let store = stores[name] { return store }
    let store = DescriptorStore()
    stores[name] = store
    return store
  }
}
