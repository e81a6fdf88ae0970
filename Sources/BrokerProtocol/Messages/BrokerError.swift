import SystemPackage

/// An error of the broker protocol: the wire's `ErrorCode` (sent to peers as
/// an `Error` message) plus the transport failures that never go on the wire.
public struct BrokerError: Error, Equatable, Sendable, CustomStringConvertible {
  public enum Code: Int32, Sendable, CaseIterable {
    case unspecified = 0
    case malformed = 1
    case version = 2
    case notAuthorized = 3
    case notUserfaultfd = 4
    case badRegion = 5
    case unknownPlugin = 6
    case pluginRefused = 7
    case limit = 8
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

  public var code: Code
  public var message: String
  public var errno: Errno?

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
