import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone (no kernel): a region of 2 MiB pages.
@Suite("Engine: huge pages")
struct EngineHugePageTests {
  static let huge = 2 << 20
  static let base: UInt = 0x4000_0000

  /// An engine with a client whose region 1 is four huge pages at `base`, opened by plugin "p".
  private func hugeClient() throws -> (engine: BrokerEngine, plugin: PluginID, client: ClientID) {
    let (engine, plugin) = try engineWithPlugin { $0.maxInvalidDecisions = 100 }
    let client = try registerClient(engine, pid: 20, base: Self.base, pages: 4, pageSize: Self.huge)
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    var actions: [Action] = []
    engine.takeActions(into: &actions)
    return (engine, plugin, client)
  }

  private func sentFaults(_ actions: [Action]) -> [PagefaultEvent] {
    actions.compactMap { if case .send(_, .pagefault(let fault)) = $0 { fault } else { nil } }
  }

  private func fills(_ actions: [Action]) -> [FillOrder] {
    actions.compactMap { if case .fill(let order) = $0 { order } else { nil } }
  }

  @Test("faults anywhere in a huge page are one fault at its start; the plugin's copy must be the whole huge page")
  func faultsRoundedAndCopiesWhole() throws {
    let (engine, plugin, client) = try hugeClient()
    var actions: [Action] = []
    let page = Self.base + UInt(Self.huge)
    engine.uffdEvents(client, [.pagefault(Pagefault(address: page + 0x1_2345, flags: [], thread: 1)),
                               .pagefault(Pagefault(address: page + 0x10_0000, flags: [], thread: 2))], now: 2)
    engine.takeActions(into: &actions)
    let faults = sentFaults(actions)
    #expect(faults.count == 1 && faults.first?.address == page && faults.first?.offset == UInt64(Self.huge), "\(faults)")
    let fault = try #require(faults.first)

    // One small page of it: refused, and the fault asked again.
    let small = [UInt8](repeating: 1, count: 4096)
    small.withUnsafeBytes { bytes in
      engine.decision(plugin, DecodedDecision(faultID: fault.faultID, kind: .copy, address: page, length: 4096, data: bytes), now: 3)
    }
    engine.takeActions(into: &actions)
    #expect(fills(actions).isEmpty)
    #expect(engine.tally[.decisionRefused, "badRange"] == 1)
    engine.tick(now: 200_000_000)
    engine.takeActions(into: &actions)
    let again = try #require(sentFaults(actions).first)
    #expect(again.address == page)

    // The whole huge page: one fill of 2 MiB.
    let whole = [UInt8](repeating: 2, count: Self.huge)
    whole.withUnsafeBytes { bytes in
      engine.decision(plugin, DecodedDecision(faultID: again.faultID, kind: .copy, address: page, length: Self.huge, data: bytes), now: 201_000_000)
    }
    engine.takeActions(into: &actions)
    let order = try #require(fills(actions).first)
    #expect(order.range == page..<page + UInt(Self.huge) && order.pageSize == Self.huge && order.kind == .copy)
  }

  @Test("a zero decision for a huge page is a copy of zeros (hugetlbfs has no UFFDIO_ZEROPAGE)")
  func zeroIsCopied() throws {
    let (engine, plugin, client) = try hugeClient()
    var actions: [Action] = []
    engine.uffdEvents(client, [.pagefault(Pagefault(address: Self.base + 5, flags: [], thread: 1))], now: 2)
    engine.takeActions(into: &actions)
    let fault = try #require(sentFaults(actions).first)
    engine.decision(plugin, DecodedDecision(faultID: fault.faultID, kind: .zero, address: Self.base, length: 0, data: UnsafeRawBufferPointer(start: nil, count: 0)), now: 3)
    engine.takeActions(into: &actions)
    let order = try #require(fills(actions).first)
    guard case .zeros = order.source else { Issue.record("source \(order.source)"); return }
    #expect(order.kind == .copy && order.range == Self.base..<Self.base + UInt(Self.huge))
  }
}
