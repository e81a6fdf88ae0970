import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone: what a peer can make the broker keep or write is bounded.
@Suite("Engine: bounds on what peers cost")
struct EngineBoundsTests {
  @Test("Refusals in a second: 5 lines from one uid, 20 from all, then a summary per uid with its count; the tally has every one")
  func refusalsRateLimited() throws {
    let configuration = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0)
    let engine = try BrokerEngine(configuration: configuration, pageSize: 4096, now: 1, makeToken: { 1 })
    var actions: [Action] = []
    var lines: [String] = []
    func collect() {
      engine.takeActions(into: &actions)
      for case .log(_, let message, let metadata) in actions { lines.append("\(message) \(metadata.sorted { $0.key < $1.key })") }
    }
    let second: UInt64 = 1_000_000_000
    for index in 0..<1_000 {
      _ = engine.clientConnected(PeerCredentials(pid: 100, uid: 4242, gid: 4242), now: 1 + UInt64(index) * 100_000)
      collect()
    }
    #expect(engine.tally[.clientRefused, "notAuthorized"] == 1_000)
    #expect(lines.count == BrokerEngine.logLinesPerSecondPerPeer && lines.allSatisfy { $0.hasPrefix("refused a client") }, "\(lines.count) lines")
    // Another peer in the same second still has its lines: one uid cannot hide the others'.
    _ = engine.clientConnected(PeerCredentials(pid: 101, uid: 4343, gid: 4343), now: second / 2)
    collect()
    #expect(lines.last?.contains("4343") == true, "\(lines.suffix(1))")
    // Many peers together get the kind's budget, no more.
    for uid in UInt32(5000)..<5100 {
      _ = engine.clientConnected(PeerCredentials(pid: 102, uid: uid, gid: uid), now: second / 2 + 1)
      collect()
    }
    #expect(lines.count == BrokerEngine.logLinesPerSecond, "\(lines.count) lines")
    // The next sweep after the second says how many were held back, per peer.
    engine.tick(now: 3 * second)
    collect()
    let summaries = lines.dropFirst(BrokerEngine.logLinesPerSecond)
    #expect(summaries.allSatisfy { $0.contains("suppressed") } && summaries.contains { $0.contains("995") && $0.contains("4242") }, "\(summaries)")
    #expect(summaries.count == 1 + 100 - (BrokerEngine.logLinesPerSecond - BrokerEngine.logLinesPerSecondPerPeer - 1), "\(summaries.count) summaries")
    // A new second has a new budget.
    _ = engine.clientConnected(PeerCredentials(pid: 100, uid: 4242, gid: 4242), now: 3 * second + 1)
    collect()
    #expect(lines.last?.hasPrefix("refused a client") == true)
  }

  @Test("Events kept for an absent plugin: a client's Closed replaces everything kept of it before")
  func missedEventsOfAClosedClientCompacted() throws {
    let (engine, plugin) = try engineWithPlugin()
    var actions: [Action] = []
    let clients = try (0..<2).map { index in
      let base = UInt(0x10_0000) * UInt(index + 1)
      let client = try registerClient(engine, pid: 20 + Int32(index), base: base, pages: 64)
      engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
      return (id: client, base: base)
    }
    engine.pluginGone(plugin, BrokerError(.disconnected, "crashed"), now: 2)
    for (id, base) in clients {
      for page in 0..<64 { engine.uffdEvents(id, [.remove(base + UInt(page) * 4096..<base + UInt(page + 1) * 4096)], now: 3) }
    }
    engine.takeActions(into: &actions)
    #expect(engine.status().plugin("p")?.missedEvents == 128)
    engine.clientGone(clients[0].id, BrokerError(.disconnected, "exited"), now: 4)
    // The other client's 64 drops, and the first one's Closed.
    #expect(engine.status().plugin("p")?.missedEvents == 65)
  }

  @Test("Events kept for an absent plugin are capped: past the cap the client that keeps changing its memory is killed (no event is dropped), and its Closed is still told")
  func missedEventsCapped() throws {
    let (engine, plugin) = try engineWithPlugin()
    engine.maxMissedEvents = 16
    var actions: [Action] = []
    let base: UInt = 0x10_0000
    let client = try registerClient(engine, pid: 20, base: base, pages: 64)
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    engine.pluginGone(plugin, BrokerError(.disconnected, "crashed"), now: 2)
    engine.takeActions(into: &actions)
    for page in 0..<16 { engine.uffdEvents(client, [.remove(base + UInt(page) * 4096..<base + UInt(page + 1) * 4096)], now: 3) }
    engine.takeActions(into: &actions)
    #expect(!actions.contains { if case .kill = $0 { true } else { false } })
    engine.uffdEvents(client, [.remove(base + 16 * 4096..<base + 17 * 4096)], now: 3)
    engine.takeActions(into: &actions)
    #expect(actions.contains { if case .kill(client) = $0 { true } else { false } }, "\(actions)")
    #expect(engine.tally[.clientKilled] == 1 && engine.status().plugin("p")?.missedEvents == 16)
    // Its end replaces what was kept of it.
    engine.clientGone(client, BrokerError(.disconnected, "killed"), now: 4)
    #expect(engine.status().plugin("p")?.missedEvents == 1)
  }

  @Test("Forked children count toward their uid's maxClientsPerUID: past it a child is not served and what it never had fails closed")
  func forkedChildrenCountPerUID() throws {
    let (engine, plugin) = try engineWithPlugin { $0.maxClientsPerUID = 2 }
    var actions: [Action] = []
    let parent = try registerClient(engine, pid: 20, base: 0x10_0000, pages: 4)
    engine.regionReply(plugin, RegionReply(clientID: parent, regionID: 1, error: nil), now: 1)
    engine.uffdEvents(parent, [.fork(ForkTicket(1), wipedOnFork: [])], now: 2)
    engine.takeActions(into: &actions)
    #expect(actions.contains { if case .adoptChild(ForkTicket(1), _) = $0 { true } else { false } })
    engine.uffdEvents(parent, [.fork(ForkTicket(2), wipedOnFork: [])], now: 3)
    engine.takeActions(into: &actions)
    #expect(actions.contains { if case .failChild(ForkTicket(2), _) = $0 { true } else { false } })
    #expect(engine.tally[.forkRefused, "limit"] == 1)
    // A new connection of that uid is refused too.
    #expect(throws: BrokerError.self) { try engine.clientConnected(PeerCredentials(pid: 30, uid: 0, gid: 0), now: 4).get() }
  }

  @Test("maxInFlightPerPlugin: faults past the bound wait parked, unsent, however long; each answer makes room for one more; the status counts what is out")
  func inFlightBoundPerPlugin() throws {
    let (engine, plugin) = try engineWithPlugin { $0.maxInFlightPerPlugin = 2 }
    var actions: [Action] = []
    let base: UInt = 0x10_0000
    let client = try registerClient(engine, pid: 20, base: base, pages: 8)
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    engine.takeActions(into: &actions)
    func sent() -> [PagefaultEvent] {
      engine.takeActions(into: &actions)
      return actions.compactMap { if case .send(plugin, .pagefault(let fault)) = $0 { fault } else { nil } }
    }
    engine.uffdEvents(client, (0..<4).map { .pagefault(Pagefault(address: base + UInt($0) * 4096, flags: [], thread: 1)) }, now: 2)
    let first = sent()
    #expect(first.map(\.address) == [base, base + 4096])
    #expect(engine.status().plugin("p")?.faultsInFlight == 2 && engine.status().plugin("p")?.faultsParked == 2)
    // Time alone sends nothing more while both are out (a plugin answering later may hold them up to its deadline, 5 s).
    let second: UInt64 = 1_000_000_000
    for step in 1...29 { engine.tick(now: 2 + UInt64(step) * second / 10) }
    #expect(sent().isEmpty)
    // One answer: one more goes out at its next backoff deadline.
    engine.decision(plugin, DecodedDecision(faultID: first[1].faultID, kind: .zero, address: first[1].address, length: 4096, data: UnsafeRawBufferPointer(start: nil, count: 0)), now: 3 * second)
    engine.takeActions(into: &actions)
    let fill = try #require(actions.compactMap { if case .fill(let order) = $0 { order } else { nil } }.first)
    engine.filled(fill, outcome: .done, now: 3 * second)
    engine.tick(now: 3 * second + 100_000_000)
    #expect(sent().count == 1)
    #expect(engine.status().plugin("p")?.faultsInFlight == 2 && engine.status().plugin("p")?.faultsParked == 1)
  }
}
