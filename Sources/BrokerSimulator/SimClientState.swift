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
  /// What its read journal holds after a broker killed mid-read (nil: settled).
  var unsettledRead: UnsettledRead?

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

  /// Before a re-attach: the drops of a read the broker died with, as `Connection.State.attach`.
  mutating func recoverUnsettledRead() {
    guard let read = unsettledRead else { return }
    for region in regions { dropRecords[region.id] = read.dropRecord(of: region, dropRecords[region.id], pieces: layouts[region.id]) }
    unsettledRead = nil
  }

  /// The regions as they lie now, for a Register: as `Connection.State.currentRegions`.
  var currentRegions: [RegionSpec] {
    regions.compactMap { $0.asItLiesNow(pieces: layouts[$0.id], dropRecord: dropRecords[$0.id]) }
  }
}
