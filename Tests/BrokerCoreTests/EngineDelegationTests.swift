import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// The engine alone (no kernel): a delegated file the runtime cannot read.
@Suite("Engine: delegated ranges")
struct EngineDelegationTests {
  @Test("a delegated file that cannot be read (EIO): the fault goes to the plugin, never parked for good")
  func unreadableFileFallsBackToPlugin() throws {
    var configuration = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0)
    configuration.plugins = [.init(name: "p", executable: "/bin/true")]
    let engine = try BrokerEngine(configuration: configuration, pageSize: 4096, now: 1, makeToken: { 1 })
    var actions: [Action] = []
    let plugin = try #require(try? engine.pluginConnected(PeerCredentials(pid: 10, uid: 0, gid: 0), now: 1).get())
    try engine.pluginHello(plugin, Hello(role: .plugin, name: "p"), sharedAreaSize: 0, now: 1)
    let client = try #require(try? engine.clientConnected(PeerCredentials(pid: 20, uid: 0, gid: 0), now: 1).get())
    let base: UInt = 0x10_0000
    engine.clientRequest(client, ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "c"))), descriptors: .none, now: 1)
    let spec = RegionSpec(id: 1, base: base, length: 16 * 4096, pageSize: 4096, plugin: "p")
    let events: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap]
    engine.clientRequest(client, ClientRequest(requestID: 2, .register(RegisterRequest(pid: 20, features: events, ioctls: [], regions: [spec]))), descriptors: .userfaultfd(events), now: 1)
    let file = DelegatedFile(handle: FileHandle(7), isRegular: true)
    engine.delegation(plugin, Delegation(clientID: client, regionID: 1, offsets: 0..<16 * 4096, source: .file(descriptor: -1, offset: 0)), file: file, now: 1)
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
