import BrokerCore
import BrokerProtocol
import Userfaultfd

/// The simulation as the engine's runtime: every action is performed on the models.
extension Simulation {
  func perform() {
    while engine.hasActions {
      engine.takeActions(into: &actions)
      for action in actions { perform(action) }
    }
  }

  func perform(_ action: Action) {
    switch action {
    case .reply(let id, let reply):
      guard let slot = slots[id] else { return }
      switch reply.body {
      case .ack where !processes[slot].registered:
        processes[slot].registered = true
        note("client \(id) registered")
      case .ack where processes[slot].attachment == .attaching:
        processes[slot].attachment = .attached
        note("client \(id) re-attached")
      case .error(let error):
        note("client \(id) told: \(error)")
      default:
        processes[slot].client.take(reply.body)
      }
    case .notify(let id, let notice):
      if let slot = slots[id] { processes[slot].client.take(notice.body) }
    case .keepChild(let keeper, _, let notice):
      if let slot = slots[keeper] { processes[slot].client.take(notice.body) }
    case .watch(let id), .watchChild(let id):
      if let slot = slots[id] { processes[slot].watched = true }
    case .adoptChild(let ticket, let child):
      adoptChild(ticket, id: child)
    case .dropChild(let ticket):
      droppedChild(ticket, poisoning: nil)
    case .failChild(let ticket, let ranges):
      droppedChild(ticket, poisoning: ranges)
    case .probe(let id):
      guard let slot = slots[id] else { return }
      engine.probed(id, exited: processes[slot].exited, now: now)
    case .close(let id):
      // Its uffd is closed: the kernel releases its threads (the process is ending, or was refused).
      guard let slot = slots[id] else { return }
      processes[slot].knownToBroker = false
      if processes[slot].attachment == .attaching {
        processes[slot].attachment = .detached  // a re-attach refused: the client tries again
      } else {
        ended(slot, reason: "closed by the broker")
      }
    case .poisonMissing(let id, let range):
      guard let slot = slots[id], !processes[slot].exited else { return }
      poisoned(processes[slot].poisonMissing(range), of: slot, why: "the broker poisoned what its child never had")
    case .fill(let order):
      fill(order)
    case .wake(let id, let range):
      guard let slot = slots[id], !processes[slot].exited else { return }
      note("wake client \(id) \(describe(range))")
      processes[slot].wake(range, now: now)
      reapIfKilled(slot)
    case .inspect(let id, _, let page):
      // The kernel's maps name the mapping of any address in it (a huge page's too).
      let mapping = slots[id].flatMap { processes[$0].mapping(containing: page & ~(processes[$0].pageSize - 1)) }
      engine.inspected(id, page: page, mapping: mapping, now: now)
    case .send(let id, let event):
      guard let index = plugins.firstIndex(where: { $0.connection == id }) else { return }
      plugins[index].inbox.append(event)
    case .welcome(let id, _):
      if let index = plugins.firstIndex(where: { $0.connection == id }) { plugins[index].welcomed = true }
    case .closePlugin(let id, let error):
      guard let index = plugins.firstIndex(where: { $0.connection == id }) else { return }
      note("broker closes plugin \(plugins[index].name)\(error.map { ": \($0)" } ?? "")")
      dropConnection(index)
    case .killPluginProcess(let pid, _):
      let index = Int(pid) - 100
      note("broker kills plugin \(plugins[index].name)")
      plugins[index].down = true
      dropConnection(index)
    case .kill(let id):
      failure = "client \(id) killed (no schedule here calls for it)"
    case .log(let level, let message, let metadata):
      note("log \(level): \(message) \(metadata.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))")
    case .releaseFile(let file):
      sharedFiles.remove(file)
    case .adoptUffd, .forgetPlugin:
      break
    case .writeProtect:
      failure = "unexpected \(action): no client swaps out here"
    }
  }

  /// A fill as the kernel would do it, now and then refused with EAGAIN or cut short.
  private func fill(_ order: FillOrder) {
    guard let slot = slots[order.client], !processes[slot].exited else {
      return engine.filled(order, outcome: .targetExited, now: now)
    }
    let range = order.range
    if order.pageCache != nil { return fillSharedMemory(order, slot: slot) }
    let content: (UInt) -> SimProcess.Content
    switch (order.kind, order.source) {
    case (.zero, _), (.copy, .zeros): content = { _ in .zero }
    case (.poison, _): content = { _ in .poison }
    case (.copy, .bytes(let bytes)):
      content = { page in Self.decode(UnsafeRawBufferPointer(rebasing: bytes[Int(page - range.lowerBound)..<Int(page - range.lowerBound) + order.pageSize])) }
    case (.copy, .file(let file, let offset)):
      // A delegated file holds its region's data at region offsets (`delegate`).
      content = { page in .data(.init(region: file.rawValue, offset: offset + UInt64(page - range.lowerBound))) }
    default:
      failure = "unexpected fill \(order.kind) from \(order.source)"
      return
    }
    let roll = reliable ? 100 : random.below(100)
    if roll < 2 {
      note("fill \(describe(range)): EAGAIN (injected)")
      return engine.filled(order, outcome: .notNow, now: now)
    }
    if roll == 2, case .decision = order.purpose, case .bytes = order.source {
      // The kernel could not read the plugin's bytes (a shared area it cannot back: a hugetlb pool run dry).
      note("fill \(describe(range)): EFAULT (injected)")
      statistics.unreadableFills += 1
      return engine.filled(order, outcome: .failed(.badAddress), now: now)
    }
    do {
      let outcome = try processes[slot].fill(range, content: content, injectPartial: !reliable && random.chance(3))
      statistics.fills += 1
      if case .stream = order.purpose, outcome == .done { statistics.streamedBlocks += 1 }
      note("fill client \(order.client) \(describe(range)) \(order.kind): \(outcome)")
      engine.filled(order, outcome: outcome, now: now)
      if order.kind == .poison, outcome == .done { poisoned([order.page], of: slot, why: "\(order.purpose)") }
    } catch {
      guard case .wrongContent(let page, let got, let expected) = error else { return }
      failure = "client \(order.client) page 0x\(String(page, radix: 16)) filled with \(got), must read \(expected)"
    }
  }

  /// A fill of a clone's shared memory, as the runtime and the kernel do it:
  /// the bytes go into the snapshot file's cache where it has no page (a page
  /// there is kept), then the range is mapped (`UFFDIO_CONTINUE`). Bytes that
  /// are not the file's at that offset would reach every clone: a failure.
  private func fillSharedMemory(_ order: FillOrder, slot: Int) {
    guard let cache = order.pageCache, sharedFiles.contains(cache.file), let shared = processes[slot].sharedRegion else {
      failure = "client \(order.client): a page-cache fill through a file it did not attach, or one released"
      return
    }
    let range = order.range
    let pageSize = UInt64(order.pageSize)
    let fileOffset = { (page: UInt) in cache.offset + UInt64(page - range.lowerBound) }
    if !reliable && random.below(100) < 2 {
      note("fill \(describe(range)): EAGAIN (injected)")
      return engine.filled(order, outcome: .notNow, now: now)
    }
    var stored: [UInt64] = []
    for page in stride(from: range.lowerBound, to: range.upperBound, by: order.pageSize) where !snapshotCache.contains(fileOffset(page)) {
      let content: SimProcess.Content
      switch order.source {
      case .pageCache:
        // CONTINUE of a page the cache lacks: EFAULT, as the kernel says.
        note("continue \(describe(range)): EFAULT (not in the cache)")
        return engine.filled(order, outcome: .failed(.badAddress), now: now)
      case .zeros: content = .zero
      case .bytes(let bytes):
        let start = Int(page - range.lowerBound)
        content = Self.decode(UnsafeRawBufferPointer(rebasing: bytes[start..<start + order.pageSize]))
      case .file(let file, let offset):
        // A delegated file holds its region's data at region offsets (`delegate`).
        content = .data(.init(region: file.rawValue, offset: offset + UInt64(page - range.lowerBound)))
      default:
        failure = "unexpected shared-memory fill from \(order.source)"
        return
      }
      let due = SimProcess.Content.data(.init(region: shared, offset: fileOffset(page)))
      guard content == due else {
        failure = "client \(order.client): the snapshot file's page at \(fileOffset(page) / pageSize) filled with \(content), must hold \(due)"
        return
      }
      stored.append(fileOffset(page))
    }
    snapshotCache.formUnion(stored)
    do {
      let outcome = try processes[slot].fill(range, content: { page in .data(.init(region: shared, offset: fileOffset(page))) }, injectPartial: !reliable && random.chance(3))
      statistics.fills += 1
      note("continue client \(order.client) \(describe(range)) (\(stored.count) pages into the file): \(outcome)")
      engine.filled(order, outcome: outcome, now: now)
    } catch {
      guard case .wrongContent(let page, let got, let expected) = error else { return }
      failure = "client \(order.client) page 0x\(String(page, radix: 16)) mapped \(got) from the file, must read \(expected)"
    }
  }
}
