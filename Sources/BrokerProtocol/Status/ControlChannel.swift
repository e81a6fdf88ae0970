import FoundationEssentials
import LinuxSupport

/// The broker's control socket, for its owner and root: the peer sends one
/// packet, a command; the broker answers with JSON in one or more packets of
/// at most `replyPacketSize` bytes and closes the connection. The commands:
/// - `status`: a `BrokerStatus`.
/// - a `VMSocketCommand` as JSON: opens or closes a Firecracker-style socket
///   for one VM; answered with a `VMSocketReply`.
/// A refused or unknown command is answered `{"error": CODE, "message": TEXT}`.
public enum ControlChannel {
  /// The command that asks for a `BrokerStatus`.
  public static let statusCommand = "status"
  /// The largest packet of a reply; a reader's buffer must hold one.
  public static let replyPacketSize = 64 << 10
  /// The most a reply may be (a status lists every client: this is thousands).
  public static let maxReplySize = 64 << 20

  /// The answer to a command the broker does not serve.
  public struct Refusal: Codable, Sendable {
    /// The `BrokerError.Code` name (`notAuthorized`, say).
    public var error: String
    /// Why, for a person.
    public var message: String

    /// The refusal that sends `error`.
    public init(_ error: BrokerError) {
      self.error = error.code.name
      self.message = error.message
    }
  }

  /// The status of the broker listening at `socketPath` (nil: `SocketPaths.control`),
  /// if it runs as root, as us, or as `brokerUID` (nil: `UFFD_BROKER_UID`).
  public static func status(socketPath: String? = nil, brokerUID: UInt32? = nil, timeoutMilliseconds: Int = 5000) throws(BrokerError) -> BrokerStatus {
    let reply = try request(statusCommand, socketPath: socketPath, brokerUID: brokerUID, timeoutMilliseconds: timeoutMilliseconds)
    do {
      return try JSONDecoder().decode(BrokerStatus.self, from: Data(reply))
    } catch {
      throw BrokerError(.malformed, "the broker's status is not the JSON expected: \(error)")
    }
  }

  /// Opens or closes a socket for one VM (`VMSocketCommand`) at the broker
  /// listening at `socketPath`; a refusal is thrown.
  public static func vmSocket(_ command: VMSocketCommand, socketPath: String? = nil, brokerUID: UInt32? = nil) throws(BrokerError) -> VMSocketReply {
    let json: Data
    do { json = try JSONEncoder().encode(command) } catch { throw BrokerError(.internal, "the command could not be encoded: \(error)") }
    let reply = try request(String(decoding: json, as: UTF8.self), socketPath: socketPath, brokerUID: brokerUID)
    do {
      return try JSONDecoder().decode(VMSocketReply.self, from: Data(reply))
    } catch {
      throw BrokerError(.malformed, "the broker's reply is not the JSON expected: \(error)")
    }
  }

  /// Sends `command` and returns the reply's JSON bytes; a refusal is thrown,
  /// and so is a listener that is not root or ours (`PacketSocket.connect(path:trusting:)`).
  public static func request(_ command: String, socketPath: String? = nil, brokerUID: UInt32? = nil, timeoutMilliseconds: Int = 5000) throws(BrokerError) -> [UInt8] {
    let path = if let socketPath { socketPath } else { try SocketPaths.control }
    let socket = try PacketSocket.connect(path: path, trusting: brokerUID)
    socket.setReceiveTimeout(milliseconds: timeoutMilliseconds)
    let bytes = Array(command.utf8)
    let sent = bytes.withUnsafeBytes { (raw) -> Result<PacketSocket.SendResult, BrokerError> in Result { () throws(BrokerError) in try socket.send(raw) } }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: replyPacketSize, alignment: 8)
    defer { buffer.deallocate() }
    // A refused connection fails the send (EPIPE), but the refusal is there to read.
    if case .failure(let error) = sent, error.code != .disconnected { throw error }
    var reply: [UInt8] = []
    var fds: [CInt] = []
    defer { fds.forEach(closeDescriptor) }
    while true {
      switch try socket.receive(into: buffer, fds: &fds, blocking: true) {
      case .packet(let count): reply += buffer[..<count]
      case .closed:
        if let refusal = try? JSONDecoder().decode(Refusal.self, from: Data(reply)) {
          throw BrokerError(BrokerError.Code(name: refusal.error) ?? .malformed, refusal.message)
        }
        if case .failure(let error) = sent { throw error }
        return reply
      case .wouldBlock: throw BrokerError(.timedOut, "the broker did not answer within \(timeoutMilliseconds) ms")
      }
      guard reply.count <= maxReplySize, fds.isEmpty else { throw BrokerError(.tooLarge, "the broker's reply is larger than \(maxReplySize) bytes") }
    }
  }
}

/// An orchestrator's request for a Firecracker-style handler socket for one VM
/// (`open`): the broker listens at `vm-NAME.sock` beside its client socket,
/// serves the one VMM that connects there with `plugin` and `argument` (see
/// `BrokerConfiguration.FirecrackerSocket`), then removes the socket. `close`
/// removes one no VMM has used.
public struct VMSocketCommand: Codable, Sendable, Equatable {
  /// What to do with the VM's socket.
  public enum Action: String, Codable, Sendable {
    /// Listen for the VM's VMM.
    case open
    /// Stop listening (a socket no VMM used).
    case close
  }
  /// Always `vmSocket`: tells this command from others on the wire.
  public var command = "vmSocket"
  /// Open or close.
  public var action: Action
  /// 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
  public var name: String
  /// The plugin that serves the VM's memory (`open`).
  public var plugin: String?
  /// For the plugin: the snapshot's memory file, say (`open`).
  public var argument: String?

  /// A command for the VM `name`.
  public init(_ action: Action, name: String, plugin: String? = nil, argument: String? = nil) {
    (self.action, self.name, self.plugin, self.argument) = (action, name, plugin, argument)
  }

  /// Whether `name` may name a VM's socket (it becomes part of a path).
  public static func isValidName(_ name: String) -> Bool {
    (1...64).contains(name.utf8.count) && !name.hasPrefix(".")
      && name.utf8.allSatisfy { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }
  }
}

/// The broker's answer to a `VMSocketCommand`: where the VM's socket is (or was).
public struct VMSocketReply: Codable, Sendable, Equatable {
  /// The VM's socket: point its VMM's Uffd memory backend here.
  public var path: String
  /// A reply naming `path`.
  public init(path: String) { self.path = path }
}
