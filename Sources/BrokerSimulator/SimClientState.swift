import BrokerCore
import BrokerProtocol

/// What the ClientSDK keeps of a connected process to re-attach to a restarted
/// broker (`Connection.State`): its regions as registered, where the broker
/// last said each lies and what it dropped, its token, and the copies of its
/// forked children's uffds with where their regions lay at the fork.
struct SimClientState {
  var regions: [RegionSpec] = []
  var layouts: [UInt64: [RegionPiece]] = [:]
  var dropRecords: [UInt64: (dropped: [Range<UInt64>], unknown: [Range<UInt64>])] = [:]
  var token: UInt128 = 0
  var children: [ClientID: [RegionPiece]] = [:]

  /// Takes in a notice the broker sent unasked.
  mutating func take(_ body: BrokerReply.Body) {
    switch body {
    case .layout(let region, let pieces): layouts[region] = pieces
    case .dropped(let region, let dropped, let unknown): dropRecords[region] = (dropped, unknown)
    case .forked(let child, let pieces): children[child] = pieces
    case .childClosed(let child): children[child] = nil
    case .hello, .ack, .error: break
    }
  }

  /// The regions as they lie now, for a Register: as `Connection.State.currentRegions`.
  var currentRegions: [RegionSpec] {
    regions.compactMap { $0.asItLiesNow(pieces: layouts[$0.id], dropRecord: dropRecords[$0.id]) }
  }
}
