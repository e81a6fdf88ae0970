import BrokerCore
import BrokerProtocol

/// Broker restarts (`kill -9`, then started again) and what survives them as
/// designed: each connected process keeps its uffd (blocked faults stay
/// blocked, map changes wait to be read), what the ClientSDK keeps (its
/// regions, where the broker last said they lie and what they dropped, its
/// token, a copy of each forked child's uffd), and re-attaches when a broker
/// answers again (`Connection.State.attach`): it poisons what its children
/// never had and lets their uffds go (no broker knows them any more), then
/// registers its regions as they lie, with their drop records. Plugins come
/// back knowing nothing; the new broker reads what the old one left unread.
///
/// A kill may also come right after a read of faults and removes, before the
/// broker acted on it (`midRead`): the client's read journal holds them.
/// Not generated: other kills inside windows a few microseconds wide (a step is
/// atomic, so every notice of a read goes out before the next step): those the
/// README lists as failing closed or still silent, and a kill between reading a
/// move's REMAP and its trailing UNMAP (the new broker would apply that UNMAP to
/// whatever moved in since). Nor a kill, or a keeper's exit before it
/// re-attached, that leaves a forked child with no connected ancestor holding
/// its uffd (its memory then reads zeros: README, "still silent").
extension Simulation {
  func restartBroker(midRead: Bool = false) {
    let live = processes.indices.filter { !processes[$0].exited }
    guard !live.contains(where: { processes[$0].trailingUnmapQueued }) else { return }
    let held = Set(live.flatMap { keeper in processes[keeper].client.children.keys.compactMap { slots[$0] } + processes[keeper].orphans.map(\.slot) })
    guard live.allSatisfy({ processes[$0].hasSocket || held.contains($0) }) else { return }
    statistics.brokerRestarts += 1
    if midRead { readAndDie() }
    note("the broker is killed (-9) and starts again")
    for slot in live {
      // The kept children, by process: the new broker's ids mean nothing to them.
      for (child, pieces) in processes[slot].client.children.sorted(by: { $0.key < $1.key }) {
        if let childSlot = slots[child] { processes[slot].orphans.append((childSlot, pieces)) }
      }
      processes[slot].client.children.removeAll()
      processes[slot].watched = false
      if processes[slot].hasSocket && !processes[slot].registered {
        ended(slot, reason: "its broker died while it registered")  // the ClientSDK's init fails
      } else if processes[slot].hasSocket {
        processes[slot].attachment = .detached
      }
    }
    for slot in processes.indices { processes[slot].knownToBroker = false }  // an exited child not probed yet too
    slots.removeAll()
    for index in plugins.indices { dropConnection(index) }
    engine = Self.makeEngine(configuration, seed: seed &+ UInt64(statistics.brokerRestarts), now: now)
  }

  /// The broker reads a registered client's queue of faults and removes (the
  /// madvises return), into its journal, and dies before acting on it.
  private func readAndDie() {
    let ready = processes.indices.filter { slot in
      let process = processes[slot]
      return process.watched && process.registered && process.hasSocket && !process.exited && !process.queue.isEmpty
        && process.queue.allSatisfy { if case .fault = $0 { true } else if case .remove = $0 { true } else { false } }
    }
    guard let slot = ready.randomElement(using: &random) else { return }
    let messages = processes[slot].queue
    processes[slot].queue.removeAll()
    let removes = messages.compactMap { message -> Range<UInt>? in if case .remove(let range, _) = message { range } else { nil } }
    note("the broker reads client \(processes[slot].id) (\(messages.count) messages, \(removes.count) removes) and dies before acting on it")
    processes[slot].client.unsettledRead = .removes(removes)
    for message in messages { processes[slot].read(message) }
  }

  /// A process the running broker does not know re-attaches, as the ClientSDK's monitor does.
  func reattach(_ slot: Int) {
    for orphan in processes[slot].orphans { letGo(orphan.slot, poisoning: orphan.pieces) }
    processes[slot].orphans.removeAll()
    processes[slot].client.recoverUnsettledRead()
    processes[slot].attachment = .attaching
    note("client pid \(processes[slot].pid) re-attaches")
    attach(slot, regions: processes[slot].client.currentRegions)
  }

  /// A keeper lets go of a forked child's uffd that no broker reads any more:
  /// what the child never had in `pieces` (where its regions lay at the fork)
  /// is poisoned first, then its memory is no longer intercepted. The child
  /// leaves the simulation (which models registered memory only).
  ///
  /// A page it would now read as zeros where data was is a failure, except
  /// where the ClientSDK's design cannot reach (counted, `exposedByKeepers`;
  /// README): memory the child moved since the fork (the keeper knows where it
  /// lay then), and everything when a map change of the child is unread (no one
  /// reads it: UFFDIO_POISON fails with EAGAIN).
  func letGo(_ slot: Int, poisoning pieces: [RegionPiece]) {
    guard !processes[slot].exited else { return }
    let pending = processes[slot].mapChangeQueued
    for piece in pieces { statistics.failedClosed += processes[slot].poisonMissing(piece.range).count }
    let child = processes[slot]
    let exposed = child.pages.filter { $0.value.present == nil && child.expected($0.value.origin) != .zero }.keys.sorted()
    let excused = exposed.filter { pending || child.atFork[$0] != child.pages[$0]?.origin }
    statistics.exposedByKeepers += excused.count
    if let page = exposed.first(where: { !excused.contains($0) }) {
      failure = "forked child pid \(child.pid) let go after a broker restart: page 0x\(String(page, radix: 16)), where it lay at the fork, reads zeros where data was"
    }
    ended(slot, reason: child.killedBySIGBUS ? "SIGBUS at a poisoned page" : "let go by its keeper: no broker serves it")
  }
}
