/// What the broker counts besides faults: each refusal, connection, disconnect
/// and failure, by kind and by cause. Tools and tests read these numbers from
/// the status instead of parsing log lines.
///
/// Keys are `kind` (every occurrence) and `kind.cause` (those with that cause),
/// e.g. `pluginDisconnected` and `pluginDisconnected.timedOut`.
public struct Tally: Codable, Sendable, Equatable {
  public enum Kind: String, Sendable, CaseIterable {
    case clientRefused, clientRegistered, clientClosed, requestRefused, regionsRefused, forkRefused
    case pluginRefused, pluginConnected, pluginDisconnected, pluginFailedOver, pluginFailedClosed
    case decisionRefused, delegationRefused, storeReplyRefused
    case faultFailedClosed, clientKilled, swappedPagesLost
    case pluginSpawned, pluginSpawnFailed, pluginExited, pluginGivenUp, connectionRefusedNoDescriptors, controlRefused
    case configReloaded, configReloadRefused
  }

  public private(set) var counts: [String: UInt64] = [:]

  public init() {}

  public subscript(_ kind: Kind) -> UInt64 { counts[kind.rawValue] ?? 0 }
  public subscript(_ kind: Kind, _ cause: String) -> UInt64 { counts[kind.rawValue + "." + cause] ?? 0 }

  package mutating func count(_ kind: Kind, _ cause: String? = nil) {
    counts[kind.rawValue, default: 0] += 1
    if let cause { counts[kind.rawValue + "." + cause, default: 0] += 1 }
  }

  public static func + (lhs: Tally, rhs: Tally) -> Tally {
    var sum = lhs
    sum.counts.merge(rhs.counts, uniquingKeysWith: +)
    return sum
  }

  public init(from decoder: any Decoder) throws { counts = try [String: UInt64](from: decoder) }
  public func encode(to encoder: any Encoder) throws { try counts.encode(to: encoder) }
}

/// Why the broker refused a plugin's decision or delegation: the cause in its `Tally`.
public enum Refusal: String, Sendable {
  /// The fault was not sent to this plugin (or was settled already).
  case notSentToPlugin
  case unknownKind
  /// Misaligned, outside the region, or missing the faulting page.
  case badRange
  /// Shared-area bytes outside the plugin's shared area.
  case outsideSharedArea
  /// A copy whose inline bytes are not its length.
  case wrongLength
  /// Bytes the broker could not read (EFAULT).
  case unreadableBytes
  /// A delegation for a region the plugin does not serve.
  case notServed
  /// A delegation of offsets outside the region or not page-aligned.
  case badOffsets
  /// A delegated descriptor that is not a regular file or memfd.
  case badFile
}
