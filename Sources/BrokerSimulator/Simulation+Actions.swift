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
      case .error(let error):
        note("client \(id) told: \(error)")
      default:
        break
      }
    case .watch(let id, _):
      if let slot = slots[id] { processes[slot].watched = true }
    case .close(let id):
      // Its uffd is closed: the kernel releases its threads (the process is ending, or was refused).
      guard let slot = slots[id] else { return }
      if !processes[slot].exited { note("client \(id) closed by the broker") }
      processes[slot].exited = true
    case .fill(let order):
      fill(order)
    case .wake(let id, let range):
      guard let slot = slots[id], !processes[slot].exited else { return }
      note("wake client \(id) \(describe(range))")
      processes[slot].wake(range, now: now)
    case .inspect(let id, _, let page):
      let mapping = slots[id].flatMap { processes[$0].mapping(containing: page) }
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
    case .adoptUffd, .notify, .releaseFile:
      break
    case .keepChild, .adoptChild, .dropChild, .failChild, .watchChild, .probe, .writeProtect, .poisonMissing:
      failure = "unexpected \(action): no client forks or swaps out here"
    }
  }

  /// A fill as the kernel would do it, now and then refused with EAGAIN or cut short.
  private func fill(_ order: FillOrder) {
    guard let slot = slots[order.client], !processes[slot].exited else {
      return engine.filled(order, outcome: .targetExited, now: now)
    }
    let range = order.range
    let content: (UInt) -> SimProcess.Content
    switch (order.kind, order.source) {
    case (.zero, _), (.copy, .zeros): content = { _ in .zero }
    case (.poison, _): content = { _ in .poison }
    case (.copy, .bytes(let bytes)):
      content = { page in Self.decode(UnsafeRawBufferPointer(rebasing: bytes[Int(page - range.lowerBound)..<Int(page - range.lowerBound) + Int(self.pageSize)])) }
    default:
      failure = "unexpected fill \(order.kind) from \(order.source)"
      return
    }
    if !reliable && random.chance(2) {
      note("fill \(describe(range)): EAGAIN (injected)")
      return engine.filled(order, outcome: .notNow, now: now)
    }
    do {
      let outcome = try processes[slot].fill(range, content: content, injectPartial: !reliable && random.chance(3))
      statistics.fills += 1
      note("fill client \(order.client) \(describe(range)) \(order.kind): \(outcome)")
      if order.kind == .poison, outcome == .done {
        failure = "client \(order.client) page 0x\(String(order.page, radix: 16)) poisoned (\(order.purpose))"
      }
      engine.filled(order, outcome: outcome, now: now)
    } catch {
      guard case .wrongContent(let page, let got, let expected) = error else { return }
      failure = "client \(order.client) page 0x\(String(page, radix: 16)) filled with \(got), must read \(expected)"
    }
  }
}
