/// Where a round's pages go: which client and region each belongs to, which
/// plugin serves the region, and which thread touches it. Fixed for a mode
/// (the mapping's address changes every round, the layout does not).
struct Layout {
  struct Region {
    var client: Int
    /// Unique per client (BrokerClient region ids).
    var id: UInt64
    var firstPage: Int
    var pageCount: Int
    var plugin: PluginInstance?
  }

  struct Thread {
    var client: Int
    var firstPage: Int
    var pageCount: Int
  }

  let pages: Int
  let clients: Int
  let regions: [Region]
  let threads: [Thread]

  init(_ workload: Workload, pages: Int) {
    self.pages = pages
    clients = workload.clients
    var regions: [Region] = []
    var threads: [Thread] = []
    for client in 0..<workload.clients {
      let clientFirst = pages * client / workload.clients
      let clientEnd = pages * (client + 1) / workload.clients
      let clientPages = clientEnd - clientFirst
      for index in 0..<workload.regionsPerClient {
        let first = clientFirst + clientPages * index / workload.regionsPerClient
        let end = clientFirst + clientPages * (index + 1) / workload.regionsPerClient
        guard end > first else { continue }
        let plugin = workload.plugins.isEmpty ? nil : workload.plugins[index % workload.plugins.count]
        regions.append(Region(client: client, id: UInt64(index + 1), firstPage: first, pageCount: end - first, plugin: plugin))
      }
      for index in 0..<workload.threadsPerClient {
        let first = clientFirst + clientPages * index / workload.threadsPerClient
        let end = clientFirst + clientPages * (index + 1) / workload.threadsPerClient
        if end > first { threads.append(Thread(client: client, firstPage: first, pageCount: end - first)) }
      }
    }
    self.regions = regions
    self.threads = threads
  }

  func regions(ofClient client: Int) -> [Region] { regions.filter { $0.client == client } }
}
