import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone: what a peer can make the broker keep or write is bounded.
@Suite("Engine: bounds on what peers cost")
struct EngineBoundsTests {
  @Test("1,000 refusals in a second log 20 lines and one summary with the count; the tally has all 1,000")
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
    #expect(lines.count == BrokerEngine.logLinesPerSecond && lines.allSatisfy { $0.hasPrefix("refused a client") }, "\(lines.count) lines")
    // The next sweep after the second says how many were held back.
    engine.tick(now: 2 * second)
    collect()
    let summary = lines.dropFirst(BrokerEngine.logLinesPerSecond)
    #expect(summary.count == 1 && summary.first?.contains("suppressed") == true && summary.first?.contains("980") == true, "\(summary)")
    // A new second has a new budget.
    _ = engine.clientConnected(PeerCredentials(pid: 100, uid: 4242, gid: 4242), now: 2 * second + 1)
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
