import BrokerCore
import BrokerProtocol

/// A plugin serving regions by name, as a well-meaning but unreliable process:
/// it answers from what it has been told on this connection (a removed page is
/// zeros from then on), and may answer late, out of order, twice, wrongly, or
/// never; it may crash, hang, and come back knowing nothing.
///
/// It keeps the PluginSDK's contract for a forked child (`PagePlugin.regionForked`):
/// the child's region starts as a copy of the parent's as the plugin knows it
/// when it reads the RegionOpened, and is refused if the parent's is not open.
struct SimPlugin {
  /// A decision made and not sent yet: its content was decided from what the
  /// plugin knew when it was made (a late one may be stale).
  struct Answer {
    var faultID: UInt64
    var kind: DecisionKind
    var address: UInt
    /// The region's page size: each content fills one such page.
    var pageSize: Int
    var pages: [SimProcess.Content]
  }

  /// An open region: its length and page size.
  struct OpenRegion {
    var length: Int
    var pageSize: Int
  }

  let name: String
  var connection: PluginID?
  var welcomed = false
  /// Its process was killed (hung): it reconnects after a while.
  var down = false
  /// Stops answering faults until killed (a hung plugin).
  var hung = false
  /// Messages from the broker, in order, not yet read.
  var inbox: [BrokerEvent] = []
  var answers: [Answer] = []
  /// Per open (client, region): the region, and the offsets removed (zeros from then on).
  var regions: [RegionKey: OpenRegion] = [:]
  var removed: [RegionKey: Set<UInt64>] = [:]
  /// Clients it was told Closed of, and clients it saw a region of, on this connection.
  var closed: Set<ClientID> = []
  var served: Set<ClientID> = []

  struct RegionKey: Hashable {
    var client: ClientID
    var region: UInt64
  }

  init(name: String, down: Bool = false) {
    self.name = name
    self.down = down
  }

  /// Opens a region: fresh, or a forked child's copy of its parent's. Returns
  /// why it refuses (the parent's region is not open here), or nil.
  mutating func open(_ key: RegionKey, _ region: OpenRegion, forkedFrom parent: ClientID) -> String? {
    var removedHere: Set<UInt64> = []
    if parent != 0 {
      let parentKey = RegionKey(client: parent, region: key.region)
      guard regions[parentKey] != nil else { return "the parent's region \(key.region) of client \(parent) is not open here" }
      removedHere = removed[parentKey] ?? []
    }
    regions[key] = region
    removed[key] = removedHere.isEmpty ? nil : removedHere
    served.insert(key.client)
    return nil
  }

  mutating func close(_ key: RegionKey) {
    regions[key] = nil
    removed[key] = nil
  }

  /// The content the plugin would serve at `offset` now.
  func content(_ key: RegionKey, offset: UInt64) -> SimProcess.Content {
    removed[key]?.contains(offset) == true ? .zero : .data(.init(region: key.region, offset: offset))
  }
}
