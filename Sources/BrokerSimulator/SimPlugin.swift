import BrokerCore
import BrokerProtocol

/// A plugin serving regions by name, as a well-meaning but unreliable process:
/// it answers from what it has been told on this connection (a removed page is
/// zeros from then on), and may answer late, out of order, twice, wrongly, or
/// never; it may crash, hang, and come back knowing nothing.
struct SimPlugin {
  /// A decision made and not sent yet: its content was decided from what the
  /// plugin knew when it was made (a late one may be stale).
  struct Answer {
    var faultID: UInt64
    var kind: DecisionKind
    var address: UInt
    var pages: [SimProcess.Content]
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
  /// Per (client, region): region length, and offsets removed (zeros from then on).
  var regions: [RegionKey: Int] = [:]
  var removed: Set<RegionOffset> = []
  /// Clients it was told Closed of, and clients it saw a region of, on this connection.
  var closed: Set<ClientID> = []
  var served: Set<ClientID> = []

  struct RegionKey: Hashable {
    var client: ClientID
    var region: UInt64
  }

  struct RegionOffset: Hashable {
    var client: ClientID
    var region: UInt64
    var offset: UInt64
  }

  init(name: String, down: Bool = false) {
    self.name = name
    self.down = down
  }

  /// The content the plugin would serve at `offset` now.
  func content(client: ClientID, region: UInt64, offset: UInt64) -> SimProcess.Content {
    removed.contains(RegionOffset(client: client, region: region, offset: offset)) ? .zero : .data(.init(region: region, offset: offset))
  }
}
