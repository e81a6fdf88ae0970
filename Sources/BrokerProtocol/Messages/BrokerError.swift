import SystemPackage

/// An error of the broker protocol: the wire's `ErrorCode` (sent to peers as
/// an `Error` message) plus the transport failures that never go on the wire.
public struct BrokerError: Error, Equatable, Sendable, CustomStringConvertible {
  public enum Code: Int32, Sendable {
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
    /// The peer closed the connection (transport only).
    case disconnected = 100
    /// A socket call failed (transport only).
    case io = 101
    /// No answer within the deadline (transport only).
    case timedOut = 102
  }

  public var code: Code
  public var message: String
  public var errno: Errno?

  public init(_ code: Code, _ message: String, errno: Errno? = nil) {
    self.code = code
    self.message = message
    self.errno = errno
  }

  public var description: String {
    errno.map { "\(message) (\($0))" } ?? message
  }
}
