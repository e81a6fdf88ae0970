import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone (no kernel): regions mapping a client's shared-memory file.
@Suite("Engine: shared memory")
struct EngineSharedMemoryTests {
  static let base: UInt = 0x10_0000
  static let file = FileHandle(9)
  static let fileOffset: UInt64 = 8 * 4096
  static let features: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap, .minorShmem]

  /// Registers region 1 (16 pages, `backing`) with `attached` (default: a 64-page file); returns the client and the actions.
  private func register(_ engine: BrokerEngine, backing: RegionSpec.Backing = .sharedMemory(fileOffset: fileOffset), pageSize: Int = 4096, base: UInt = base,
                        features: UserfaultFD.Features = features, attached: Result<SharedMemoryFile, BrokerError>? = .success(SharedMemoryFile(handle: file, size: 64 * 4096)),
                        dropped: [Range<UInt64>] = []) throws -> (ClientID, [Action]) {
    let client = try #require(try? engine.clientConnected(PeerCredentials(pid: 20, uid: 0, gid: 0), now: 1).get())
    engine.clientRequest(client, ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "c"))), descriptors: .none, now: 1)
    let spec = RegionSpec(id: 1, base: base, length: 16 * pageSize, pageSize: pageSize, plugin: "p", dropped: dropped, backing: backing)
    let register = RegisterRequest(pid: 20, features: features, ioctls: [], regions: [spec])
    let descriptors: AttachedDescriptors = if let attached { .userfaultfdAndFile(features, attached) } else { .userfaultfd(features) }
    engine.clientRequest(client, ClientRequest(requestID: 2, .register(register)), descriptors: descriptors, now: 1)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    return (client, actions)
  }

  /// A client whose shared-memory region 1 is open.
  private func sharedClient() throws -> (engine: BrokerEngine, plugin: PluginID, client: ClientID) {
    let (engine, plugin) = try engineWithPlugin()
    let (client, _) = try register(engine)
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    return (engine, plugin, client)
  }

  private func refusal(_ actions: [Action]) -> String? {
    actions.lazy.compactMap { if case .reply(_, let reply) = $0, case .error(let error) = reply.body { error.message } else { nil } }.first
  }

  private func fills(_ actions: [Action]) -> [FillOrder] {
    actions.compactMap { if case .fill(let order) = $0 { order } else { nil } }
  }

  private func sentFaults(_ actions: [Action]) -> [PagefaultEvent] {
    actions.compactMap { if case .send(_, .pagefault(let fault)) = $0 { fault } else { nil } }
  }

  @Test("Register is refused for what the broker cannot fill right: no file, a file and no shared region, no minor_shmem, a region past the file, huge pages")
  func unfitRegistrationsRefused() throws {
    let cases: [(backing: RegionSpec.Backing, pageSize: Int, features: UserfaultFD.Features, attached: Result<SharedMemoryFile, BrokerError>?, reason: String)] = [
      (.sharedMemory(fileOffset: 0), 4096, Self.features, nil, "carries no shared-memory file"),
      (.anonymous, 4096, Self.features, .success(SharedMemoryFile(handle: Self.file, size: 1 << 20)), "no region is shared memory"),
      (.sharedMemory(fileOffset: 0), 4096, [.eventRemove, .eventUnmap, .eventRemap], .success(SharedMemoryFile(handle: Self.file, size: 1 << 20)), "lacks minor_shmem"),
      (.sharedMemory(fileOffset: 60 * 4096), 4096, Self.features, .success(SharedMemoryFile(handle: Self.file, size: 64 * 4096)), "inside the shared-memory file"),
      (.sharedMemory(fileOffset: 0), 2 << 20, Self.features, .success(SharedMemoryFile(handle: Self.file, size: 64 << 20)), "hugetlbfs minor faults"),
      (.sharedMemory(fileOffset: 0), 4096, Self.features, .failure(BrokerError(.badRegion, "the shared-memory file is not a memfd or tmpfs file")), "not a memfd"),
    ]
    for item in cases {
      let (engine, _) = try engineWithPlugin()
      let (_, actions) = try register(engine, backing: item.backing, pageSize: item.pageSize, base: 0x4000_0000, features: item.features, attached: item.attached)
      let message = refusal(actions)
      #expect(message?.contains(item.reason) == true, "\(item.reason): \(message ?? "not refused")")
      #expect(!actions.contains { if case .adoptUffd = $0 { true } else { false } }, "a refused Register adopts nothing")
    }
  }

  @Test("a missing fault goes to the plugin; its copy and its zeros fill the file's cache at the mapped offset, then map it")
  func missingFillsThePageCache() throws {
    let (engine, plugin, client) = try sharedClient()
    var actions: [Action] = []
    engine.uffdEvents(client, [.pagefault(Pagefault(address: Self.base + 3 * 4096, flags: [.write], thread: 1)),
                               .pagefault(Pagefault(address: Self.base + 5 * 4096, flags: [], thread: 2))], now: 2)
    engine.takeActions(into: &actions)
    let faults = sentFaults(actions)
    #expect(faults.count == 2)
    let bytes = [UInt8](repeating: 7, count: 2 * 4096)
    bytes.withUnsafeBytes { data in
      engine.decision(plugin, DecodedDecision(faultID: faults[0].faultID, kind: .copy, address: Self.base + 2 * 4096, length: 2 * 4096, data: data), now: 3)
    }
    engine.takeActions(into: &actions)
    let copy = try #require(fills(actions).first)
    #expect(copy.kind == .copy && copy.range == Self.base + 2 * 4096..<Self.base + 4 * 4096)
    #expect(copy.pageCache == FillOrder.PageCache(file: Self.file, offset: Self.fileOffset + 2 * 4096))
    // A prefetch that stopped short (a page mapped already): the faulting page alone, at its own file offset.
    engine.filled(copy, outcome: .alreadyPresent, now: 3)
    engine.takeActions(into: &actions)
    let alone = try #require(fills(actions).first)
    #expect(alone.range == Self.base + 3 * 4096..<Self.base + 4 * 4096 && alone.pageCache?.offset == Self.fileOffset + 3 * 4096)

    engine.decision(plugin, DecodedDecision(faultID: faults[1].faultID, kind: .zero, address: 0, length: 0, data: UnsafeRawBufferPointer(start: nil, count: 0)), now: 4)
    engine.takeActions(into: &actions)
    let zero = try #require(fills(actions).first)
    guard case .zeros = zero.source else { Issue.record("source \(zero.source)"); return }
    #expect(zero.kind == .copy && zero.pageCache?.offset == Self.fileOffset + 5 * 4096, "shmem has no UFFDIO_ZEROPAGE: zeros are copied into the cache")
  }

  @Test("a minor fault is mapped from the cache with no plugin asked, and counted")
  func minorFaultMapped() throws {
    let (engine, _, client) = try sharedClient()
    var actions: [Action] = []
    engine.uffdEvents(client, [.pagefault(Pagefault(address: Self.base + 4 * 4096 + 12, flags: [.minor], thread: 1))], now: 2)
    engine.takeActions(into: &actions)
    #expect(sentFaults(actions).isEmpty)
    let order = try #require(fills(actions).first)
    guard case .pageCache = order.source else { Issue.record("source \(order.source)"); return }
    #expect(order.purpose == .minor && order.range == Self.base + 4 * 4096..<Self.base + 5 * 4096 && order.pageCache?.offset == Self.fileOffset + 4 * 4096)
    engine.filled(order, outcome: .done, now: 3)
    #expect(engine.statistics.minorFaultsResolved == 1 && engine.statistics.faultsResolved == 1 && engine.statistics.faultsSent == 0)
  }

  @Test("a minor fault whose page left the cache (EFAULT) becomes a missing fault for the plugin; another failure fails closed")
  func minorFaultFallsBack() throws {
    let (engine, _, client) = try sharedClient()
    var actions: [Action] = []
    engine.uffdEvents(client, [.pagefault(Pagefault(address: Self.base, flags: [.minor], thread: 1)),
                               .pagefault(Pagefault(address: Self.base + 4096, flags: [.minor], thread: 2))], now: 2)
    engine.takeActions(into: &actions)
    let orders = fills(actions)
    #expect(orders.count == 2)
    engine.filled(orders[0], outcome: .failed(.badAddress), now: 3)
    engine.filled(orders[1], outcome: .failed(.invalidArgument), now: 3)
    engine.takeActions(into: &actions)
    let poison = try #require(fills(actions).first)
    #expect(poison.kind == .poison && poison.range.lowerBound == Self.base + 4096 && poison.pageCache == nil)
    engine.tick(now: 200_000_000)
    engine.takeActions(into: &actions)
    let sent = try #require(sentFaults(actions).first)
    #expect(sent.address == Self.base && !sent.flags.contains(.minor))
  }

  @Test("a remove event in shared memory is no drop: the page reads its file again, so the plugin is not told to serve zeros")
  func removeIsNoDrop() throws {
    let (engine, _, client) = try sharedClient()
    var actions: [Action] = []
    engine.uffdEvents(client, [.remove(Self.base..<Self.base + 4 * 4096)], now: 2)
    engine.takeActions(into: &actions)
    #expect(!actions.contains { if case .send(_, .removed) = $0 { true } else { false } }, "\(actions)")
    #expect(!actions.contains { if case .notify = $0 { true } else { false } }, "no drop record for the client")
  }

  @Test("a re-attach's drop record of shared memory is ignored: the plugin is not told to serve zeros there")
  func droppedRecordIgnored() throws {
    let (engine, _) = try engineWithPlugin()
    let (_, actions) = try register(engine, dropped: [0..<4 * 4096])
    #expect(actions.contains { if case .send(_, .regionOpened) = $0 { true } else { false } })
    #expect(!actions.contains { if case .send(_, .removed) = $0 { true } else { false } }, "\(actions)")
  }

  @Test("shared-memory regions are refused in AddRegions and swap-outs")
  func addAndSwapRefused() throws {
    let (engine, _, client) = try sharedClient()
    var actions: [Action] = []
    let spec = RegionSpec(id: 2, base: Self.base + 0x10_0000, length: 4096, plugin: "p", backing: .sharedMemory(fileOffset: 0))
    engine.clientRequest(client, ClientRequest(requestID: 3, .addRegions([spec])), descriptors: .none, now: 2)
    engine.takeActions(into: &actions)
    #expect(refusal(actions)?.contains("registered with Register") == true)
    engine.clientRequest(client, ClientRequest(requestID: 4, .swapOut(regionID: 1, offset: 0, length: 4096)), descriptors: .none, now: 2)
    engine.takeActions(into: &actions)
    #expect(refusal(actions)?.contains("not swapped out") == true)
  }

  @Test("the file is released with the last client mapping it")
  func fileReleasedWithClient() throws {
    let (engine, _, client) = try sharedClient()
    var actions: [Action] = []
    engine.clientGone(client, BrokerError(.disconnected, "gone"), now: 2)
    engine.takeActions(into: &actions)
    #expect(actions.contains { if case .releaseFile(Self.file) = $0 { true } else { false } })
  }
}
