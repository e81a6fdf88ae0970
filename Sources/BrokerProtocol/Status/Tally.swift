/// What the broker counts besides faults: each refusal, connection, disconnect
/// and failure, by kind and by cause. Tools and tests read these numbers from
/// the status instead of parsing log lines.
///
/// Keys are `kind` (every occurrence) and `kind.cause` (those with that cause),
/// e.g. `pluginDisconnected` and `pluginDisconnected.timedOut`.
public struct Tally: Codable, Sendable, Equatable {
  /// What happened; its raw value is the key.
  public enum Kind: String, Sendable, CaseIterable {
    /// Clients: a connection refused, a client registered, a client gone;
    /// a request, regions or a forked child refused.
    case clientRefused, clientRegistered, clientClosed, requestRefused, regionsRefused, forkRefused
    /// Plugins: a connection refused, connected, disconnected, failed over to its
    /// fallback, failed with its regions failing closed.
    case pluginRefused, pluginConnected, pluginDisconnected, pluginFailedOver, pluginFailedClosed
    /// A plugin's decision, delegation or store reply refused (the cause is a `Refusal`).
    case decisionRefused, delegationRefused, storeReplyRefused
    /// Failing closed: a fault poisoned, a client killed, swapped-out pages a plugin lost.
    case faultFailedClosed, clientKilled, swappedPagesLost
    /// Supervision and limits: a plugin process spawned, failed to spawn, exited,
    /// given up on (`maxRestarts`); a connection refused for want of descriptors;
    /// a control connection refused.
    case pluginSpawned, pluginSpawnFailed, pluginExited, pluginGivenUp, connectionRefusedNoDescriptors, controlRefused
    /// SIGHUP: the configuration reloaded, or the new file refused (the old one kept).
    case configReloaded, configReloadRefused
  }

  /// Every count by key (`kind` or `kind.cause`): the JSON form.
  public private(set) var counts: [String: UInt64] = [:]

  /// Nothing counted.
  public init() {}

  /// How often `kind` happened, whatever the cause.
  public subscript(_ kind: Kind) -> UInt64 { counts[kind.rawValue] ?? 0 }
  /// How often `kind` happened with `cause` (a `BrokerError.Code` name or a `Refusal`).
  public subscript(_ kind: Kind, _ cause: String) -> UInt64 { counts[kind.rawValue + "." + cause] ?? 0 }

  package mutating func count(_ kind: Kind, _ cause: String? = nil) {
    counts[kind.rawValue, default: 0] += 1
    if let cause { counts[kind.rawValue + "." + cause, default: 0] += 1 }
  }

  /// The sum of two tallies, key by key.
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
  /// A decision kind this broker does not know.
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
