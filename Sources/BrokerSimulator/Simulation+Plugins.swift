import BrokerCore
import BrokerProtocol
import Userfaultfd

/// Plugins: they connect, read what the broker sends, answer (or not), crash,
/// hang and come back knowing nothing.
extension Simulation {
  func connect(_ index: Int) {
    guard plugins[index].connection == nil, !plugins[index].down else { return }
    guard case .success(let id) = engine.pluginConnected(PeerCredentials(pid: Int32(100 + index), uid: 0, gid: 0), now: now) else { return }
    plugins[index].connection = id
    note("plugin \(plugins[index].name) connects as \(id)")
    do {
      try engine.pluginHello(id, Hello(role: .plugin, name: plugins[index].name), sharedAreaSize: 0, now: now)
    } catch {
      failure = "plugin \(plugins[index].name)'s Hello was refused: \(error)"
    }
    perform()
  }

  func pluginLifecycle(_ index: Int) {
    if plugins[index].down {
      if random.chance(30) { plugins[index].down = false }
    } else if plugins[index].connection == nil {
      connect(index)
    } else if !reliable && random.chance(20) {
      plugins[index].hung = true
      note("plugin \(plugins[index].name) hangs")
    } else if !reliable && random.chance(50) {
      statistics.pluginCrashes += 1
      note("plugin \(plugins[index].name) crashes")
      let id = plugins[index].connection!
      dropConnection(index)
      engine.pluginGone(id, BrokerError(.disconnected, "crashed"), now: now)
      perform()
    }
  }

  /// The plugin's connection is gone, and with its process all it knew
  /// (as the sample plugins: what they know lives in memory).
  func dropConnection(_ index: Int) {
    plugins[index] = SimPlugin(name: plugins[index].name, down: plugins[index].down)
  }

  /// The plugin reads some of its messages and sends some of its answers.
  func pluginWorks(_ index: Int) {
    guard let id = plugins[index].connection, plugins[index].welcomed else { return }
    let reads = reliable ? plugins[index].inbox.count : min(plugins[index].inbox.count, 1 + random.below(8))
    for _ in 0..<reads {
      guard plugins[index].connection == id else { return }
      receive(plugins[index].inbox.removeFirst(), plugin: index, connection: id)
    }
    guard !plugins[index].hung, plugins[index].connection == id else { return }
    var answers = plugins[index].answers
    plugins[index].answers.removeAll()
    if !reliable { answers.shuffle(using: &random) }
    for answer in answers {
      if !reliable && random.chance(30) {
        plugins[index].answers.append(answer)  // later
        continue
      }
      send(answer, plugin: index, connection: id)
      if !reliable && random.chance(3) { send(answer, plugin: index, connection: id) }  // twice
    }
    perform()
    for buffer in buffers { buffer.deallocate() }
    buffers.removeAll()
  }

  private func send(_ answer: SimPlugin.Answer, plugin index: Int, connection: PluginID) {
    guard plugins[index].connection == connection else { return }
    let pageSize = answer.pageSize
    let length = answer.pages.count * pageSize
    var data = UnsafeRawBufferPointer(start: nil, count: 0)
    if answer.kind == .copy {
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 16)
      buffers.append(buffer)
      for (page, content) in answer.pages.enumerated() { Self.encode(content, into: UnsafeMutableRawBufferPointer(rebasing: buffer[page * pageSize..<(page + 1) * pageSize])) }
      data = UnsafeRawBufferPointer(buffer)
    }
    note("plugin \(plugins[index].name) answers fault \(answer.faultID): \(answer.kind) 0x\(String(answer.address, radix: 16)) + \(answer.pages.count) pages \(answer.pages)")
    engine.decision(connection, DecodedDecision(faultID: answer.faultID, kind: answer.kind, address: answer.address, length: answer.kind == .retry ? 0 : length, data: data), now: now)
  }

  private func receive(_ event: BrokerEvent, plugin index: Int, connection: PluginID) {
    let client = event.clientID
    if plugins[index].closed.contains(client) {
      failure = "plugin \(plugins[index].name) got \(event) for client \(client) after Closed"
      return
    }
    if case .pagefault = event {} else { note("plugin \(plugins[index].name) reads \(describe(event))") }
    switch event {
    case .regionOpened(_, _, let region, let parent, _):
      let refusal = plugins[index].open(.init(client: client, region: region.id), .init(length: region.length, pageSize: region.pageSize), forkedFrom: parent)
      if let refusal {
        note("plugin \(plugins[index].name) refuses region \(region.id) of client \(client): \(refusal)")
      } else if parent != 0, let slot = slots[client], let forkedAt = processes[slot].forkedAt,
                now < forkedAt + configuration.registrationTimeout.nanoseconds {
        processes[slot].acceptedRegions.insert(region.id)
      }
      if refusal == nil && parent == 0 && random.chance(40) { delegate(region, of: client, plugin: connection) }
      engine.regionReply(connection, RegionReply(clientID: client, regionID: region.id, error: refusal.map { BrokerError(.pluginRefused, $0) }), now: now)
      perform()
    case .removed(let range):
      let key = SimPlugin.RegionKey(client: client, region: range.regionID)
      guard let region = plugins[index].regions[key] else { break }  // as the PluginSDK: a region it does not have
      for offset in stride(from: range.startOffset, to: range.startOffset + UInt64(range.range.count), by: region.pageSize) {
        plugins[index].removed[key, default: []].insert(offset)
      }
    case .regionClosed(_, let region):
      plugins[index].close(.init(client: client, region: region))
    case .closed:
      plugins[index].closed.insert(client)
      for key in plugins[index].regions.keys where key.client == client { plugins[index].close(key) }
    case .pagefault(let fault):
      decide(fault, plugin: index)
    case .unmapped, .remapped, .decisionRefused:
      break
    case .store:
      failure = "plugin \(plugins[index].name) got a store, and no client swaps out here"
    }
  }

  /// Hands part of a region to the broker, as a file holding the region's data
  /// at region offsets (the file's handle is the region's id), often streamed,
  /// a few blocks first. Sent with the RegionReply, before the plugin reads the
  /// records of pages the client dropped (as the snapshot plugin does).
  private func delegate(_ region: RegionSpec, of client: ClientID, plugin: PluginID) {
    let pages = region.length / region.pageSize
    let first = UInt64(random.below(pages)) * UInt64(region.pageSize)
    let end = first + UInt64(1 + random.below(pages - Int(first) / region.pageSize)) * UInt64(region.pageSize)
    let working = (0..<random.below(4)).map { _ in UInt64(random.below(pages)) * UInt64(region.pageSize) }
    let delegation = Delegation(clientID: client, regionID: region.id, offsets: first..<end, source: .file(offset: first),
                                prefetchPages: 1 + random.below(8), stream: random.chance(70), streamFirst: working)
    note("plugin delegates region \(region.id) of client \(client) offsets \(first / 4096)..<\(end / 4096)p, stream \(delegation.stream), first \(working.map { $0 / 4096 })")
    engine.delegation(plugin, delegation, file: DelegatedFile(handle: FileHandle(region.id), isRegular: true), now: now)
  }

  /// The broker fills one block of a delegation stream, if one is due (as its loop does after each pass over the ready inputs).
  func streamBlock() {
    guard let due = engine.nextStreamDeadline, due <= now else { return }
    engine.stream(now: now)
    perform()
  }

  /// What the plugin answers a fault with, decided from what it knows now.
  private func decide(_ fault: PagefaultEvent, plugin index: Int) {
    let key = SimPlugin.RegionKey(client: fault.clientID, region: fault.regionID)
    guard let region = plugins[index].regions[key] else {
      failure = "plugin \(plugins[index].name) got a fault of region \(fault.regionID) of client \(fault.clientID), which is not open on it"
      return
    }
    let (length, pageSize) = (region.length, region.pageSize)
    let roll = reliable ? 99 : random.below(100)
    if roll < 4 {
      plugins[index].answers.append(.init(faultID: fault.faultID, kind: .retry, address: fault.address, pageSize: pageSize, pages: []))
      return
    }
    if roll < 6 {
      // Misaligned: refused (and counted).
      plugins[index].answers.append(.init(faultID: fault.faultID, kind: .zero, address: fault.address + 8, pageSize: pageSize, pages: [.zero]))
      return
    }
    if roll < 7 && pageSize > Self.smallPageSize {
      // One small page of a huge page: not a whole page of the region, refused (and counted).
      plugins[index].answers.append(.init(faultID: fault.faultID, kind: .copy, address: fault.address, pageSize: Self.smallPageSize,
                                          pages: [plugins[index].content(key, offset: fault.offset)]))
      return
    }
    // A prefetch around the page, inside the region's offsets.
    let before = roll < 40 ? min(UInt64(random.below(4)), fault.offset / UInt64(pageSize)) : 0
    let after = roll < 40 ? min(UInt64(random.below(4)), (UInt64(length) - fault.offset) / UInt64(pageSize) - 1) : 0
    let first = fault.offset - before * UInt64(pageSize)
    let contents = (0...(before + after)).map { page in plugins[index].content(key, offset: first + page * UInt64(pageSize)) }
    let kind: DecisionKind = contents.allSatisfy { $0 == .zero } && random.chance(50) ? .zero : .copy
    plugins[index].answers.append(.init(faultID: fault.faultID, kind: kind, address: fault.address - UInt(before) * UInt(pageSize), pageSize: pageSize, pages: contents))
  }

  /// Writes `content` into `page` (its first 16 bytes say all: a huge page is not written through).
  static func encode(_ content: SimProcess.Content, into page: UnsafeMutableRawBufferPointer) {
    UnsafeMutableRawBufferPointer(rebasing: page[..<16]).initializeMemory(as: UInt8.self, repeating: 0)
    if case .data(let origin) = content {
      page.storeBytes(of: origin.region, toByteOffset: 0, as: UInt64.self)
      page.storeBytes(of: origin.offset, toByteOffset: 8, as: UInt64.self)
    }
  }

  static func decode(_ page: UnsafeRawBufferPointer) -> SimProcess.Content {
    let region = page.load(fromByteOffset: 0, as: UInt64.self)
    return region == 0 ? .zero : .data(.init(region: region, offset: page.load(fromByteOffset: 8, as: UInt64.self)))
  }
}
