import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone: a delegation's background stream, and its races with map events.
@Suite("Engine: delegation streams")
struct EngineStreamTests {
  let base: UInt = 0x10_0000
  static let page: UInt64 = 4096
  static let block: UInt64 = 32 * 4096

  /// An active client with 256 pages delegated from a file (`stream`, `first`).
  func streamingClient(stream: Bool = true, first: [UInt64] = []) throws -> (BrokerEngine, PluginID, ClientID) {
    let (engine, plugin) = try engineWithPlugin()
    let client = try registerClient(engine, pid: 20, base: base, pages: 256)
    let file = DelegatedFile(handle: FileHandle(7), isRegular: true)
    engine.delegation(plugin, Delegation(clientID: client, regionID: 1, offsets: 0..<256 * Self.page, source: .file(offset: 0), prefetchPages: 32,
                                         stream: stream, streamFirst: first), file: file, now: 1)
    #expect(engine.nextStreamDeadline == nil, "no stream before the client is active")
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    return (engine, plugin, client)
  }

  /// The next stream block's fill order, or nil when no stream has one due.
  func nextBlock(_ engine: BrokerEngine, now: UInt64 = 2) -> FillOrder? {
    guard let due = engine.nextStreamDeadline, due <= now else { return nil }
    engine.stream(now: now)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    let orders = actions.compactMap { if case .fill(let order) = $0 { order } else { nil } }
    #expect(orders.count <= 1)
    return orders.first
  }

  /// Drives streams to their end, every fill done: the filled address ranges in order.
  func drain(_ engine: BrokerEngine) -> [Range<UInt>] {
    var filled: [Range<UInt>] = []
    while let order = nextBlock(engine) {
      filled.append(order.range)
      engine.filled(order, outcome: .done, now: 2)
    }
    return filled
  }

  @Test("the working set's blocks first, in order, then every block once; then the stream ends")
  func order() throws {
    let (engine, _, _) = try streamingClient(first: [200 * Self.page, 5 * Self.page, 6 * Self.page])
    let filled = drain(engine)
    let blocks = filled.map { UInt64($0.lowerBound - base) / Self.block }
    #expect(Array(blocks.prefix(3)) == [6, 0, 0], "\(blocks)")
    #expect(Set(blocks.dropFirst(3)) == Set(0..<8) && blocks.count == 11)
    #expect(filled.allSatisfy { $0.count == Int(Self.block) })
    #expect(engine.nextStreamDeadline == nil)
    #expect(engine.streamedBytes == 11 * Self.block)
  }

  @Test("without `stream`, only the working set")
  func firstOnly() throws {
    let (engine, _, _) = try streamingClient(stream: false, first: [100 * Self.page])
    #expect(drain(engine) == [base + UInt(3 * Self.block)..<base + UInt(4 * Self.block)])
  }

  @Test("a range removed mid-stream is never filled again, and its faults go to the plugin")
  func removeMidStream() throws {
    let (engine, plugin, client) = try streamingClient()
    let first = try #require(nextBlock(engine))
    engine.filled(first, outcome: .done, now: 2)
    // The client drops pages 40..<100 (in blocks 1 to 3); the event is read before the next block.
    let removed = base + 40 * 4096..<base + 100 * 4096
    engine.uffdEvents(client, [.remove(removed)], now: 2)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    let rest = drain(engine)
    #expect(!rest.contains { $0.overlaps(removed) }, "\(rest)")
    #expect(rest.contains { $0.contains(base + 39 * 4096) } && rest.contains { $0.contains(base + 100 * 4096) })
    engine.uffdEvents(client, [.pagefault(Pagefault(address: base + 50 * 4096, flags: [], thread: 1))], now: 3)
    engine.takeActions(into: &actions)
    #expect(actions.contains { if case .send(plugin, .pagefault) = $0 { true } else { false } })
  }

  @Test("EAGAIN: the block again after the backoff; a partial fill: the rest past the page that stopped it")
  func retries() throws {
    let (engine, _, _) = try streamingClient()
    let first = try #require(nextBlock(engine))
    engine.filled(first, outcome: .notNow, now: 2)
    #expect(nextBlock(engine, now: 2) == nil, "not before the backoff")
    let again = try #require(nextBlock(engine, now: 2 + BrokerEngine.backoffBase))
    #expect(again.range == first.range)
    engine.filled(again, outcome: .partial(bytes: 4096 * 3), now: 3)
    let rest = try #require(nextBlock(engine, now: 3 + BrokerEngine.backoffBase))
    #expect(rest.range == first.range.lowerBound + 4 * 4096..<first.range.upperBound)
    guard case .file(_, let offset) = rest.source else { Issue.record("a file fill"); return }
    #expect(offset == 4 * Self.page)
  }

  @Test("a revoke, a client gone: the stream stops")
  func stops() throws {
    let (engine, plugin, client) = try streamingClient()
    engine.delegation(plugin, Delegation(clientID: client, regionID: 1, offsets: 64 * Self.page..<256 * Self.page, source: .zero, revoke: true), file: nil, now: 2)
    #expect(drain(engine).map { UInt64($0.lowerBound - base) / Self.block } == [0, 1])
    let (engine2, _, client2) = try streamingClient()
    engine2.clientGone(client2, BrokerError(.disconnected, "gone"), now: 2)
    #expect(nextBlock(engine2) == nil)
  }

  @Test("a forked child does not inherit its parent's stream (its faults are still served locally)")
  func forkedChild() throws {
    let (engine, plugin, parent) = try streamingClient()
    engine.uffdEvents(parent, [.fork(ForkTicket(1), wipedOnFork: [])], now: 2)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    let child = try #require(actions.lazy.compactMap { if case .adoptChild(_, let child) = $0 { child } else { nil } }.first)
    engine.regionReply(plugin, RegionReply(clientID: child, regionID: 1, error: nil), now: 2)
    engine.takeActions(into: &actions)
    var clients: Set<ClientID> = []
    while let order = nextBlock(engine) {
      clients.insert(order.client)
      engine.filled(order, outcome: .done, now: 2)
    }
    #expect(clients == [parent])
    engine.uffdEvents(child, [.pagefault(Pagefault(address: base, flags: [], thread: 1))], now: 3)
    engine.takeActions(into: &actions)
    #expect(actions.contains { if case .fill(let order) = $0 { order.client == child && order.purpose == .delegated } else { false } })
  }

  @Test("a delegation leaves out the pages the client dropped before it")
  func droppedBeforeDelegation() throws {
    let (engine, plugin) = try engineWithPlugin()
    let client = try registerClient(engine, pid: 20, base: base, pages: 64)
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    engine.uffdEvents(client, [.remove(base + 8 * 4096..<base + 16 * 4096)], now: 1)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    engine.delegation(plugin, Delegation(clientID: client, regionID: 1, offsets: 0..<64 * Self.page, source: .file(offset: 0), prefetchPages: 32, stream: true),
                      file: DelegatedFile(handle: FileHandle(7), isRegular: true), now: 2)
    let filled = drain(engine)
    #expect(filled == [base..<base + 8 * 4096, base + 16 * 4096..<base + 32 * 4096, base + 32 * 4096..<base + 64 * 4096], "\(filled)")
  }
}
