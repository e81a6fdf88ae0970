import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone (no kernel): a delegated file the runtime cannot read.
@Suite("Engine: delegated ranges")
struct EngineDelegationTests {
  @Test("a delegated file that cannot be read (EIO): the fault goes to the plugin, never parked for good")
  func unreadableFileFallsBackToPlugin() throws {
    let (engine, plugin) = try engineWithPlugin()
    var actions: [Action] = []
    let base: UInt = 0x10_0000
    let client = try registerClient(engine, pid: 20, base: base, pages: 16)
    let file = DelegatedFile(handle: FileHandle(7), isRegular: true)
    engine.delegation(plugin, Delegation(clientID: client, regionID: 1, offsets: 0..<16 * 4096, source: .file(offset: 0)), file: file, now: 1)
    engine.regionReply(plugin, RegionReply(clientID: client, regionID: 1, error: nil), now: 1)
    engine.takeActions(into: &actions)

    engine.uffdEvents(client, [.pagefault(Pagefault(address: base + 4096, flags: [], thread: 1))], now: 2)
    engine.takeActions(into: &actions)
    let orders = actions.compactMap { if case .fill(let order) = $0 { order } else { nil } }
    #expect(orders.count == 1, "the delegated range is filled by the broker first")
    let order = try #require(orders.first)
    engine.filled(order, outcome: .failed(.ioError), now: 3)
    engine.takeActions(into: &actions)
    if case .fill(let alone)? = actions.first {  // the page alone, as a range fill that stopped short is retried
      engine.filled(alone, outcome: .failed(.ioError), now: 3)
      engine.takeActions(into: &actions)
    }
    let sent = actions.contains { if case .send(plugin, .pagefault(let fault)) = $0 { fault.address == base + 4096 } else { false } }
    #expect(sent, "\(actions.map { "\($0)".prefix(120) })")
  }
}
