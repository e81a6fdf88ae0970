import SystemPackage

/// An error of the broker protocol: the wire's `ErrorCode` (sent to peers as
/// an `Error` message) plus the transport failures that never go on the wire.
public struct BrokerError: Error, Equatable, Sendable, CustomStringConvertible {
  /// Why: the wire's `ErrorCode`, and the transport's own codes (100 and up).
  public enum Code: Int32, Sendable, CaseIterable {
    /// No code given (an older or careless peer).
    case unspecified = 0
    /// A message that does not decode or breaks the protocol's rules (or a bad
    /// configuration value, a path with no safe default).
    case malformed = 1
    /// A Hello of another protocol version or the wrong role.
    case version = 2
    /// The peer's credentials are not allowed (SO_PEERCRED), or the peer is not whom it claims.
    case notAuthorized = 3
    /// The descriptor sent with Register is not a usable userfaultfd.
    case notUserfaultfd = 4
    /// A region or range that is misaligned, not known, not live, or cannot be
    /// served as asked (a swap-out of memory that cannot be write-protected, say).
    case badRegion = 5
    /// A region names a plugin that is neither configured nor connected, or has failed.
    case unknownPlugin = 6
    /// The plugin refused (a region, a store, a file), or went away before answering.
    case pluginRefused = 7
    /// A configured limit is reached (clients, regions, descriptors): a later try may succeed.
    case limit = 8
    /// The broker failed for a reason of its own.
    case `internal` = 9
    /// A packet larger than the limit, or with too many descriptors.
    case tooLarge = 10
    /// A plugin sent more invalid decisions than the broker tolerates.
    case invalidDecisions = 11
    /// A plugin of that name is already connected (or, at start, a broker already serves a socket path).
    case nameTaken = 12
    /// No Hello (or Register) in time; no answer within the deadline.
    case timedOut = 13
    /// The peer closed the connection (transport only).
    case disconnected = 100
    /// A socket call failed (transport only).
    case io = 101
    /// The broker is stopping (transport only).
    case stopping = 103

    /// The code of a `name`.
    public init?(name: String) {
      guard let code = Self.allCases.first(where: { $0.name == name }) else { return nil }
      self = code
    }

    /// A stable name: the key of the broker's status counters.
    public var name: String {
      switch self {
      case .unspecified: "unspecified"
      case .malformed: "malformed"
      case .version: "version"
      case .notAuthorized: "notAuthorized"
      case .notUserfaultfd: "notUserfaultfd"
      case .badRegion: "badRegion"
      case .unknownPlugin: "unknownPlugin"
      case .pluginRefused: "pluginRefused"
      case .limit: "limit"
      case .internal: "internal"
      case .tooLarge: "tooLarge"
      case .invalidDecisions: "invalidDecisions"
      case .nameTaken: "nameTaken"
      case .disconnected: "disconnected"
      case .io: "io"
      case .timedOut: "timedOut"
      case .stopping: "stopping"
      }
    }
  }

  /// Why, for code to act on.
  public var code: Code
  /// What happened, for a person.
  public var message: String
  /// The errno of the system call that failed, when one did (never sent on the wire).
  public var errno: Errno?

  /// An error of `code`, caused by a system call's `errno` if one failed.
  public init(_ code: Code, _ message: String, errno: Errno? = nil) {
    self.code = code
    self.message = message
    self.errno = errno
  }

  /// Any error as a broker error: untyped APIs (Data, Foundation) rethrow ours as `any Error`.
  public init(_ error: any Error) {
    self = error as? BrokerError ?? BrokerError(.io, "\(error)")
  }

  public var description: String {
    errno.map { "\(message) (\($0))" } ?? message
  }
}
