import BrokerCore
import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport
import Logging
import SystemPackage
import Userfaultfd

/// Performing the engine's actions.
extension BrokerRuntime {
  /// Performs every action the engine has, in order, feeding back the outcomes
  /// it asked for (which may bring more actions).
  func perform() {
    while engine.hasActions {
      engine.takeActions(into: &actions)
      for action in actions { perform(action) }
    }
    if !openJournals.isEmpty { settleJournals() }
  }

  private func perform(_ action: Action) {
    switch action {
    case .reply(let id, let reply):
      guard let link = clients[id], let socket = link.socket else { return }
      if link.vmm != nil { return vmmCannotBeTold(link, reply) }
      switch reply.body {
      case .ack: link.acked = true
      case .error where !link.acked:
        // A refusal before the Ack ends the connection. Its uffd goes first: while a copy
        // lives the range stays registered, and a client retrying at once would get EBUSY.
        link.uffd = nil
        if registering != nil && readingClient == id { (registering, registeringMemory) = (nil, nil) }
      default: break
      }
      // The Ack of its Register carries its read journal.
      let journal = link.journal.flatMap { journal in
        if case .ack = reply.body, !journal.handedOver { journal } else { nil }
      }
      do {
        _ = try ClientWire.encode(reply).withUnsafeBytes { (raw) throws(BrokerError) in
          if let journal { try [journal.descriptor.rawValue].withUnsafeBufferPointer { fds throws(BrokerError) in try socket.send(raw, fds: fds) } } else { try socket.send(raw) }
        }
        journal?.handOver()
      } catch {
        engine.clientGone(id, BrokerError(error), now: loopTime)
      }
    case .notify(let id, let notice):
      guard let link = clients[id], link.vmm == nil, let socket = link.socket else { return }
      let bytes = ClientWire.encode(notice)
      if (try? bytes.withUnsafeBytes { (raw) throws(BrokerError) in try socket.send(raw) }) != .sent { engine.noticeNotSent(id, notice) }
    case .keepChild(let keeper, let child, let notice):
      let sent = clients[child]?.uffd.map { uffd in
        [uffd.fileDescriptor.rawValue].withUnsafeBufferPointer { fds in
          ClientWire.encode(notice).withUnsafeBytes { raw in (try? clients[keeper]?.socket?.send(raw, fds: fds)) == .sent }
        }
      }
      if sent != true {
        logger.warning("the parent cannot keep its forked child's userfaultfd: a broker killed now leaves the child's unfilled pages reading zeros", metadata: ["client.id": "\(keeper)", "child.id": "\(child)"])
      }
    case .adoptUffd(let id):
      guard let link = clients[id] else { return registering = nil }
      link.uffd = registering
      registering = nil
      if let (handle, mapping) = registeringMemory { memoryFiles[handle] = mapping }
      registeringMemory = nil
      if link.vmm == nil && link.socket != nil {
        do {
          link.journal = try ReadJournal()
        } catch {
          // Served all the same: a broker killed mid-read then leaves the client without that read's drops.
          logger.warning("no read journal for the client", metadata: ["client.id": "\(id)", "error": "\(error)"])
        }
      }
    case .adoptChild(let ticket, let child):
      clients[child] = ClientLink(id: child, socket: PacketSocket?.none, uffd: forks.removeValue(forKey: ticket))
    case .dropChild(let ticket):
      forks[ticket] = nil
    case .failChild(let ticket, let ranges):
      if let uffd = forks.removeValue(forKey: ticket) { for range in ranges { uffd.poisonMissing(address: range.lowerBound, length: range.count) } }
    case .watch(let id):
      watch(id)
    case .watchChild(let id):
      guard let uffd = clients[id]?.uffd else { return engine.watchFailed(id, BrokerError(.internal, "the child has no userfaultfd"), now: loopTime) }
      do {
        try loop.add(uffd.fileDescriptor.rawValue, Token(.clientUffd, id))
      } catch {
        engine.watchFailed(id, error, now: loopTime)
      }
    case .close(let id):
      guard let link = clients.removeValue(forKey: id) else { return }
      if let socket = link.socket {
        loop.remove(socket.fd)
        finish(socket)
      }
      if let uffd = link.uffd { loop.remove(uffd.fileDescriptor.rawValue) }
      if link.pidfd.isValid { loop.remove(link.pidfd.rawValue) }
    case .kill(let id):
      if let link = clients[id], link.pidfd.isValid { _ = clinux_pidfd_send_signal(link.pidfd.rawValue, SIGKILL) }
    case .fill(let order):
      engine.filled(order, outcome: fill(order), now: loopTime)
    case .wake(let id, let range):
      _ = clients[id]?.uffd?.wake(address: range.lowerBound, length: range.count)
    case .writeProtect(let id, let range, let protect, let swapOut):
      guard let uffd = clients[id]?.uffd else { return }
      let result = uffd.writeProtect(address: range.lowerBound, length: range.count, protect: protect)
      if let swapOut {
        let errno: Errno? = if case .failure(let errno) = result { errno } else { nil }
        engine.swapOutProtected(id, swapOut, range: range, errno: errno, now: loopTime)
      }
    case .poisonMissing(let id, let range):
      clients[id]?.uffd?.poisonMissing(address: range.lowerBound, length: range.count)
    case .inspect(let id, let pid, let page):
      engine.inspected(id, page: page, mapping: ProcessMappings.mapping(containing: page, pid: pid), now: loopTime)
    case .probe(let id):
      guard let uffd = clients[id]?.uffd else { return }
      let exited = uffd.zero(address: BrokerEngine.probeAddress, length: systemPageSize) == .targetExited
      engine.probed(id, exited: exited, now: loopTime)
    case .send(let id, let event):
      guard let link = plugins[id] else { return }
      // A full batch, or an event after faults (a plugin applies a packet's events first), goes out first.
      if !link.events.hasRoom(for: event) { flush(link) }
      link.events.append(event)
      markDirty(link)
    case .welcome(let id, let name):
      guard let link = plugins[id] else { return }
      let store = store(of: name)
      let bytes = EventBatchEncoder.encodeControl(hello: Hello(role: .broker, name: "uffd-broker"), error: nil, kept: store.names)
      let sent = bytes.withUnsafeBytes { raw in
        store.descriptors.withUnsafeBufferPointer { fds in Result { () throws(BrokerError) in try link.socket.send(raw, fds: fds) } }
      }
      if case .failure(let error) = sent { engine.pluginGone(id, error, now: loopTime) }
    case .closePlugin(let id, let error):
      guard let link = plugins.removeValue(forKey: id) else { return }
      // Told why, a misbehaving plugin gets nothing more; otherwise (the broker
      // stops) what was queued for it (RegionClosed, Closed) still goes out.
      if let error { tellPlugin(link.socket, error) } else { flush(link) }
      loop.remove(link.socket.fd)
      finish(link.socket)
    case .killPluginProcess(let pid, let reason):
      supervisor?.killChild(pid: pid, reason: reason)
    case .releaseFile(let handle):
      files[handle] = nil
      memoryFiles[handle] = nil
    case .forgetPlugin(let name):
      stores[name] = nil
    case .log(let level, let message, let metadata):
      logger.log(level: level, message, metadata: metadata)
    }
  }

  /// Reads and drops what a peer sent and no one will handle: a socket closed
  /// with unread data resets the connection (ECONNRESET), and the peer would
  /// lose the Error it was just told before it could read it.
  /// Ends a connection the broker closes: no more packets either way, and
  /// what the peer sent is read and dropped. (Closed with unread packets, the
  /// socket would make the peer's next read fail with ECONNRESET before it
  /// read the Error that says why.)
  ///
  /// `shutdownFirst: false` for a connection closed right after (the control
  /// socket's): its peer sees the end only when the descriptor is gone.
  func finish(_ socket: PacketSocket, shutdownFirst: Bool = true) {
    if shutdownFirst { _ = shutdown(socket.fd, CInt(SHUT_RDWR)) }
    var fds: [CInt] = []
    for _ in 0..<256 {
      fds.removeAll(keepingCapacity: true)
      // Into `packet`, not `pluginPacket`: fills of this round may still read decisions there.
      guard case .packet = try? socket.receive(into: packet, fds: &fds) else { break }
      fds.forEach(closeDescriptor)
    }
  }

  /// A VMM reads nothing the broker sends; an error it would have been told
  /// ends it instead, since its guest would otherwise wait on its faults forever.
  private func vmmCannotBeTold(_ link: ClientLink, _ reply: BrokerReply) {
    guard case .error(let error) = reply.body, link.pidfd.isValid else { return }
    report(.error, "killing a VMM whose guest memory cannot be served", .clientKilled, cause: "vmmRefused",
           ["client.id": "\(link.id)", "vmm.pid": "\(link.vmm?.pid ?? 0)", "reason": "\(error)"])
    _ = clinux_pidfd_send_signal(link.pidfd.rawValue, SIGKILL)
  }

  /// Watches the client's uffd and process (the pidfd taken when it connected,
  /// `admitClient`: if that process is gone, its pidfd is readable at once and
  /// the client closed).
  private func watch(_ id: ClientID) {
    guard let link = clients[id], let uffd = link.uffd else { return }
    do throws(BrokerError) {
      try loop.add(uffd.fileDescriptor.rawValue, Token(.clientUffd, id))
      try loop.add(link.pidfd.rawValue, Token(.clientPidfd, id))
    } catch {
      engine.watchFailed(id, error, now: loopTime)
      return
    }
    readUffd(link)  // faults may have queued before the ack
  }

  // MARK: - Fills

  private func fill(_ order: FillOrder) -> IoctlOutcome {
    guard let uffd = clients[order.client]?.uffd else { return .targetExited }
    let range = order.range
    if let cache = order.pageCache, order.kind != .poison {
      guard let memory = memoryFiles[cache.file] else { return .failed(.badFileDescriptor) }
      // Into the file's page cache first (kept where a page is there already), then mapped.
      let stored = store(order, into: memory, at: cache.offset)
      guard stored == .done else { return stored }
      return uffd.continue(address: range.lowerBound, length: range.count)
    }
    switch order.kind {
    case .zero:
      return uffd.zero(address: range.lowerBound, length: range.count)
    case .poison:
      return uffd.poison(address: range.lowerBound, length: range.count)
    case .retry:
      return .notNow
    case .copy:
      // A page at a time for zeros (a small or a huge one).
      return withBytes(of: order.source, count: range.count, zeroChunk: order.pageSize) { bytes, at in
        uffd.copy(to: range.lowerBound + UInt(at), from: bytes.baseAddress!, length: bytes.count, writeProtect: order.writeProtect)
      }
    }
  }

  /// Adds what `order` fills to a shared-memory file's page cache at `offset`
  /// (zeros in chunks as large as the zero page: pages already there are kept).
  private func store(_ order: FillOrder, into memory: SharedMemoryMapping, at offset: UInt64) -> IoctlOutcome {
    if case .pageCache = order.source { return .done }
    return withBytes(of: order.source, count: order.range.count, zeroChunk: zeroPage.count) { bytes, at in
      memory.store(bytes, at: offset + UInt64(at), pageSize: systemPageSize)
    }
  }

  /// Hands `write` the `count` bytes `source` names, with where they go (a byte
  /// offset into the fill): all at once, or zeros `zeroChunk` bytes at a time
  /// (the first chunk not filled says why).
  private func withBytes(of source: FillOrder.Source, count: Int, zeroChunk: Int, _ write: (UnsafeRawBufferPointer, Int) -> IoctlOutcome) -> IoctlOutcome {
    switch source {
    case .none, .pageCache:
      return .failed(.invalidArgument)
    case .bytes(let bytes):
      return write(bytes, 0)
    case .zeros:
      for at in stride(from: 0, to: count, by: zeroChunk) {
        let outcome = write(UnsafeRawBufferPointer(rebasing: zeroPage[..<min(zeroChunk, count - at)]), at)
        if !outcome.isResolved { return outcome }
      }
      return .done
    case .sharedArea(let plugin, let offset):
      guard let area = plugins[plugin]?.sharedArea, offset + UInt64(count) <= UInt64(area.bytes.count) else { return .notNow }
      return write(UnsafeRawBufferPointer(rebasing: area.bytes[Int(offset)..<Int(offset) + count]), 0)
    case .file(let handle, let offset):
      // A file that cannot be read sends the fault to its plugin (the engine's answer to EIO).
      guard let file = files[handle] else { return .failed(.ioError) }
      if let mapped = file.bytes(at: offset..<offset + UInt64(count)) {
        let outcome = write(mapped, 0)
        // The file shrank under the mapping: what is gone now reads as zeros.
        guard case .failed(.badAddress) = outcome else { return outcome }
      }
      guard let read = file.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: localBuffer[..<count])) else { return .failed(.ioError) }
      return write(read, 0)
    }
  }

  // MARK: - Sending to plugins

  private func markDirty(_ link: PluginLink) {
    if !link.isDirty {
      link.isDirty = true
      dirtyPlugins.append(link)
    }
  }

  func flushPlugins() {
    for link in dirtyPlugins {
      link.isDirty = false
      if plugins[link.id] === link { flush(link) }
    }
    dirtyPlugins.removeAll(keepingCapacity: true)
  }

  private func flush(_ link: PluginLink) {
    guard !link.events.isEmpty else { return }
    link.events.packetsApplied = link.packetsApplied
    let count = link.events.encode(into: packet)
    send(UnsafeRawBufferPointer(rebasing: packet[..<count]), to: link)
  }

  private func send(_ bytes: UnsafeRawBufferPointer, to link: PluginLink) {
    if link.backlog.isEmpty {
      do {
        if try link.socket.send(bytes) == .sent { return }
      } catch {
        return engine.pluginGone(link.id, BrokerError(error), now: loopTime)
      }
      loop.modify(link.socket.fd, Token(.plugin, link.id), events: clinux_epollin | clinux_epollout)
    }
    // The plugin is not reading: keep order by queueing behind what is waiting.
    link.backlog.append(bytes)
    if link.backlog.bytes > 64 << 20 { engine.pluginGone(link.id, BrokerError(.limit, "it stopped reading its events"), now: loopTime) }
  }

  func drainBacklog(_ link: PluginLink) {
    while let first = link.backlog.first {
      do {
        guard try first.withUnsafeBytes({ (raw) throws(BrokerError) in try link.socket.send(raw) }) == .sent else { return }
      } catch {
        return engine.pluginGone(link.id, BrokerError(error), now: loopTime)
      }
      link.backlog.removeFirst()
    }
    loop.modify(link.socket.fd, Token(.plugin, link.id), events: clinux_epollin)
  }
}
