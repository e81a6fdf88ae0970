import BrokerProtocol
import Testing
import Userfaultfd
@testable import BrokerCore

/// An engine with plugin "p" (configured) connected; times start at 1.
func engineWithPlugin(_ configure: (inout BrokerConfiguration) -> Void = { _ in }) throws -> (engine: BrokerEngine, plugin: PluginID) {
  var configuration = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0)
  configuration.plugins = [.init(name: "p", executable: "/bin/true")]
  configure(&configuration)
  let engine = try BrokerEngine(configuration: configuration, pageSize: 4096, hugePageSizes: [2 << 20], now: 1, makeToken: { 1 })
  let plugin = try #require(try? engine.pluginConnected(PeerCredentials(pid: 10, uid: 0, gid: 0), now: 1).get())
  try engine.pluginHello(plugin, Hello(role: .plugin, name: "p"), sharedAreaSize: 0, now: 1)
  return (engine, plugin)
}

/// A client of pid `pid` that connects, says Hello and registers region 1 of
/// `pages` pages (of `pageSize` bytes) at `base` on plugin "p"; the plugin has not answered yet.
func registerClient(_ engine: BrokerEngine, pid: Int32, base: UInt, pages: Int, pageSize: Int = 4096) throws -> ClientID {
  let client = try #require(try? engine.clientConnected(PeerCredentials(pid: pid, uid: 0, gid: 0), now: 1).get())
  engine.clientRequest(client, ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "c"))), descriptors: .none, now: 1)
  let spec = RegionSpec(id: 1, base: base, length: pages * pageSize, pageSize: pageSize, plugin: "p")
  let events: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap]
  let register = RegisterRequest(pid: pid, features: events, ioctls: [], regions: [spec])
  engine.clientRequest(client, ClientRequest(requestID: 2, .register(register)), descriptors: .userfaultfd(events), now: 1)
  return client
}
