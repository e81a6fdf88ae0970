import BrokerProtocol
import Glibc

/// What arrived on a hand-driven connection.
enum Arrival<Message> {
  case message(Message)
  /// The peer closed the connection.
  case closed
  /// Nothing within the timeout.
  case timedOut
}

/// Waits up to `milliseconds` for `socket` to be readable, then receives one packet.
private func receivePacket(_ socket: PacketSocket, into buffer: UnsafeMutableRawBufferPointer, fds: inout [CInt], milliseconds: Int) throws -> Arrival<Int> {
  var entry = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
  let ready = Glibc.poll(&entry, 1, Int32(milliseconds))
  guard ready > 0 else { return .timedOut }
  switch try socket.receive(into: buffer, fds: &fds) {
  case .packet(let count): return .message(count)
  case .closed: return .closed
  case .wouldBlock: return .timedOut
  }
}

/// Bytes that are not a protobuf message: wire type 7 does not exist, so the
/// very first tag is invalid; the rest is random.
func garbageBytes(count: Int) -> [UInt8] {
  var generator = SystemRandomNumberGenerator()
  return [0x07] + (1..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
}

/// A plugin written by hand in the test process: it speaks the wire protocol
/// with BrokerProtocol's `DecisionBatchEncoder` and `EventBatchDecoder` over a
/// `PacketSocket`, so a test decides exactly what the broker receives.
final class ManualPlugin {
  let name: String
  let socket: PacketSocket
  private let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  private let staging = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 4096)
  private let decoder = EventBatchDecoder()
  private let encoder = DecisionBatchEncoder()

  struct Decision {
    var faultID: UInt64
    var kind: DecisionKind
    var address: UInt
    var length: Int
    var data: [UInt8]?
  }

  /// What one broker packet carried.
  struct Batch {
    var events: [BrokerEvent]
    var error: BrokerError?
  }

  /// Connects and says Hello as `name`; throws unless the broker answers Hello.
  init(socketPath: String, name: String) throws {
    self.name = name
    socket = try PacketSocket.connect(path: socketPath)
    encoder.setHello(Hello(role: .plugin, name: name))
    try flush()
    guard case .message = try receiveRaw(milliseconds: 5000) else { throw HarnessError("no Hello from the broker") }
    if let error = decoder.error { throw error }
    guard let hello = try decoder.hello, hello.role == .broker else { throw HarnessError("the broker did not answer Hello") }
  }

  deinit {
    packet.deallocate()
    staging.deallocate()
  }

  private func receiveRaw(milliseconds: Int) throws -> Arrival<Void> {
    var fds: [CInt] = []
    defer { fds.forEach { close($0) } }
    switch try receivePacket(socket, into: packet, fds: &fds, milliseconds: milliseconds) {
    case .message(let count):
      try decoder.decode(UnsafeRawBufferPointer(rebasing: packet[..<count]))
      return .message(())
    case .closed: return .closed
    case .timedOut: return .timedOut
    }
  }

  /// The next packet from the broker, decoded.
  func receive(milliseconds: Int) throws -> Arrival<Batch> {
    switch try receiveRaw(milliseconds: milliseconds) {
    case .message:
      let events = try (0..<decoder.eventCount).map { index in try decoder.event(at: index) }
      return .message(Batch(events: events, error: decoder.error))
    case .closed: return .closed
    case .timedOut: return .timedOut
    }
  }

  /// Receives one packet and answers it in one packet: every region the
  /// packet opens is accepted, and `answer` appends decisions for its events.
  /// Returns what arrived.
  @discardableResult
  func serveOnce(milliseconds: Int, _ answer: (Batch, inout [Decision]) throws -> Void) throws -> Arrival<Batch> {
    let arrival = try receive(milliseconds: milliseconds)
    guard case .message(let batch) = arrival else { return arrival }
    var decisions: [Decision] = []
    try answer(batch, &decisions)
    let replies = batch.events.compactMap { event -> RegionReply? in
      guard case .regionOpened(let clientID, _, let region, _, _) = event else { return nil }
      return RegionReply(clientID: clientID, regionID: region.id, error: nil)
    }
    if !decisions.isEmpty || !replies.isEmpty { try send(decisions, replies: replies) }
    return arrival
  }

  /// Sends decisions, region replies, store replies and (zero-page) delegations in one packet.
  func send(_ decisions: [Decision], replies: [RegionReply] = [], storeReplies: [StoreReply] = [], delegations: [Delegation] = []) throws {
    var staged = 0
    for decision in decisions {
      var data: UnsafeRawBufferPointer?
      if let bytes = decision.data {
        let slot = UnsafeMutableRawBufferPointer(rebasing: staging[staged..<staged + bytes.count])
        slot.copyBytes(from: bytes)
        data = UnsafeRawBufferPointer(slot)
        staged += (bytes.count + 4095) / 4096 * 4096
      }
      encoder.append(faultID: decision.faultID, kind: decision.kind, address: decision.address, length: decision.length, data: data)
    }
    for reply in replies { encoder.append(reply) }
    for reply in storeReplies { encoder.append(reply) }
    for delegation in delegations { encoder.append(delegation, file: nil) }  // zero-page delegations only
    try flush()
  }

  private func flush() throws {
    let count = encoder.encode(into: packet)
    try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<count]))
    packetsSent += 1
  }

  /// Packets sent so far (Hello included): the broker has handled them all
  /// when its status says as many `packetsApplied` (`Harness.waitUntilHandled`).
  private(set) var packetsSent: UInt64 = 0

  /// Sends arbitrary bytes as one packet.
  func sendRaw(_ bytes: [UInt8]) throws {
    _ = try bytes.withUnsafeBytes { raw in try socket.send(raw) }
  }
}

/// A client connection driven by hand: requests encoded with `ClientWire`,
/// descriptors attached as the test likes.
final class ManualClient {
  let socket: PacketSocket
  private let arena = WireArena(capacity: 64 << 10)
  private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)

  init(socketPath: String) throws {
    socket = try PacketSocket.connect(path: socketPath)
  }

  deinit { buffer.deallocate() }

  func send(_ request: ClientRequest, fds: [CInt] = []) throws {
    let bytes = ClientWire.encode(request)
    try sendRaw(bytes, fds: fds)
  }

  func sendRaw(_ bytes: [UInt8], fds: [CInt] = []) throws {
    _ = try bytes.withUnsafeBytes { raw in
      try fds.withUnsafeBufferPointer { fdBuffer in try socket.send(raw, fds: fdBuffer) }
    }
  }

  /// The broker's next reply.
  func receive(milliseconds: Int = 5000) throws -> Arrival<BrokerReply> {
    var fds: [CInt] = []
    defer { fds.forEach { close($0) } }
    switch try receivePacket(socket, into: buffer, fds: &fds, milliseconds: milliseconds) {
    case .message(let count): return .message(try ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: arena))
    case .closed: return .closed
    case .timedOut: return .timedOut
    }
  }

  /// Hello, and the broker's Hello back.
  func hello() throws {
    try send(ClientRequest(requestID: 0, .hello(Hello(role: .client, name: "manual-client"))))
    guard case .message(let reply) = try receive(), case .hello(let hello) = reply.body, hello.role == .broker else {
      throw HarnessError("the broker did not answer the client's Hello")
    }
  }
}

/// The fixture's page content (a copy of Tests/Fixtures/broker-fixture/Pattern.swift):
/// each 8-byte word is a function of its offset in the region's backing.
enum Pattern {
  static func word(backingOffset: UInt64, wordIndex: Int) -> UInt64 {
    (backingOffset &+ UInt64(wordIndex) &* 8 &+ 1) &* 0x9E37_79B9_7F4A_7C15
  }

  static func page(backingOffset: UInt64, pageSize: Int = 4096) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: pageSize)
    bytes.withUnsafeMutableBytes { raw in
      let words = raw.bindMemory(to: UInt64.self)
      for index in 0..<words.count { words[index] = word(backingOffset: backingOffset, wordIndex: index) }
    }
    return bytes
  }
}
