import BrokerProtocol
import Glibc
import Synchronization
import SystemPackage
import Userfaultfd

/// An error of the client SDK, with the broker's own error when it refused us.
public struct ClientError: Error, CustomStringConvertible, Sendable {
  public var message: String
  public var broker: BrokerError?
  public var errno: Errno?

  public init(_ message: String, broker: BrokerError? = nil, errno: CInt? = nil) {
    self.message = message
    self.broker = broker
    self.errno = errno.map { Errno(rawValue: $0) }
  }

  public var description: String {
    var text = message
    if let broker { text += ": \(broker)" }
    if let errno { text += " (\(errno))" }
    return text
  }
}

/// Hands a process's memory to the broker: the client side of the protocol.
///
/// `init` creates a userfaultfd in this process (it binds to this process's
/// memory, so do it before any sandboxing), registers every region's range
/// with it, connects to the broker, sends `Register` with the descriptor
/// attached and waits for the broker's Ack (or throws its Error). From then on
/// faults in the regions are served by the broker's plugins.
///
/// **This object keeps its own reference to the userfaultfd** for as long as
/// it lives. If the broker dies, faulting threads stay blocked (they are not
/// released onto zero pages): unfilled memory never silently reads as zeros.
/// Keep the client alive as long as the memory is in use; release the memory
/// (munmap) before the client.
public final class BrokerClient: @unchecked Sendable {
  // @unchecked: requests are serialized by `nextRequest`'s mutex; the rest is immutable after init.
  public let uffd: UserfaultFD
  /// The id the broker gave this client (in its logs and plugin events).
  public let clientID: UInt64
  private let socket: PacketSocket
  private let arena = WireArena(capacity: 64 << 10)
  private let nextRequest = Mutex<UInt64>(2)
  private let timeoutMilliseconds: Int

  /// The features the broker needs to keep memory exact while the client changes its mappings.
  public static let features: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap, .threadID]

  /// Registers `regions` with the broker at `socketPath`. Throws if the broker
  /// is unreachable, refuses (unknown plugin, bad region, not authorized...), or
  /// does not answer within `timeoutMilliseconds`.
  public init(regions: [RegionSpec], socketPath: String = SocketPaths.client, name: String = "client", timeoutMilliseconds: Int = 10_000) throws(ClientError) {
    self.timeoutMilliseconds = timeoutMilliseconds
    do {
      uffd = try UserfaultFD.create(features: Self.features)
    } catch {
      throw ClientError("cannot create a userfaultfd: \(error)")
    }
    try Self.register(regions, with: uffd)
    do {
      socket = try PacketSocket.connect(path: socketPath)
    } catch {
      throw ClientError("cannot reach the broker at \(socketPath)", broker: error)
    }
    socket.setReceiveTimeout(milliseconds: timeoutMilliseconds)
    _ = try Self.exchange(socket, arena, ClientRequest(requestID: 0, .hello(Hello(role: .client, name: name))), fds: [])
    let register = RegisterRequest(pid: getpid(), features: uffd.features, ioctls: uffd.ioctls, regions: regions)
    let reply = try Self.exchange(socket, arena, ClientRequest(requestID: 1, .register(register)), fds: [uffd.fileDescriptor.rawValue])
    guard case .ack(let id, _) = reply else { throw ClientError("the broker answered Register with \(reply)") }
    clientID = id
  }

  /// Adds regions (registering their ranges with this client's uffd first).
  public func addRegions(_ regions: [RegionSpec]) throws(ClientError) {
    try Self.register(regions, with: uffd)
    _ = try request(.addRegions(regions))
  }

  /// Missing faults go to the broker; write-protect mode lets it swap pages out
  /// without losing a concurrent write.
  private static func register(_ regions: [RegionSpec], with uffd: UserfaultFD) throws(ClientError) {
    for region in regions {
      do {
        try uffd.register(address: region.base, length: region.length, mode: [.missing, .writeProtect])
      } catch {
        throw ClientError("cannot register region \(region.id): \(error)")
      }
    }
  }

  /// What a swap-out did.
  public struct SwapOutReport: Sendable, Equatable {
    /// Pages now held (compressed) by the plugin and released here.
    public var pagesDropped: Int
    /// Pages written during the swap-out: kept resident, their writes intact.
    public var pagesKept: Int
  }

  /// Swaps out `length` bytes of `region` from `offset` (page aligned): the
  /// region's plugin stores their content and the memory is released
  /// (MADV_DONTNEED); the next touch of a page faults it back in from the
  /// plugin. Other threads may keep reading and writing the range meanwhile:
  /// a page written during the swap-out is kept resident, and no write is lost.
  public func swapOut(_ region: RegionSpec, offset: Int = 0, length: Int? = nil) throws(ClientError) -> SwapOutReport {
    let length = length ?? region.length - offset
    let pageSize = systemPageSize
    guard offset >= 0, length > 0, offset % pageSize == 0, length % pageSize == 0, offset + length <= region.length else {
      throw ClientError("swap-out of \(length) bytes at offset \(offset) is not a page-aligned part of region \(region.id)")
    }
    _ = try request(.swapOut(regionID: region.id, offset: UInt64(offset), length: length))
    var report = SwapOutReport(pagesDropped: 0, pagesKept: 0)
    var failure: ClientError?
    let chunk = 128 << 10
    var bytes = [UInt8](repeating: 0, count: chunk)
    var start = offset
    while start < offset + length {
      let count = min(chunk, offset + length - start)
      let source = UnsafeRawPointer(bitPattern: region.base + UInt(start))!
      // The range is write-protected: what is read here stays the page's content until the drop.
      bytes.withUnsafeMutableBytes { $0.baseAddress!.copyMemory(from: source, byteCount: count) }
      let reply: BrokerReply.Body
      do {
        reply = try request(.swapOutData(regionID: region.id, offset: UInt64(start), data: Array(bytes[..<count])))
      } catch {
        failure = error
        break
      }
      guard case .ack(_, let busyOffsets) = reply else { break }
      let busy = Set(busyOffsets)
      var page = start
      while page < start + count {
        // Drop runs of pages nobody wrote to; a busy page stays.
        if busy.contains(UInt64(page)) {
          report.pagesKept += 1
          page += pageSize
          continue
        }
        var end = page + pageSize
        while end < start + count && !busy.contains(UInt64(end)) { end += pageSize }
        madvise(UnsafeMutableRawPointer(bitPattern: region.base + UInt(page)), end - page, MADV_DONTNEED)
        report.pagesDropped += (end - page) / pageSize
        page = end
      }
      start += count
    }
    // Always end the swap-out: it unprotects the range and releases held writers.
    _ = try request(.swapOutDone(regionID: region.id, offset: UInt64(offset), length: length))
    if let failure { throw failure }
    return report
  }

  /// Removes regions from the broker, then unregisters their ranges (their pages stay as they are).
  public func removeRegions(_ regions: [RegionSpec]) throws(ClientError) {
    _ = try request(.removeRegions(regions.map(\.id)))
    for region in regions { try? uffd.unregister(address: region.base, length: region.length) }
  }

  private func request(_ body: ClientRequest.Body) throws(ClientError) -> BrokerReply.Body {
    let result: Result<BrokerReply.Body, ClientError> = nextRequest.withLock { next in
      let id = next
      next += 1
      return Result { () throws(ClientError) in try Self.exchange(socket, arena, ClientRequest(requestID: id, body), fds: []) }
    }
    return try result.get()
  }

  private static func exchange(_ socket: PacketSocket, _ arena: WireArena, _ request: ClientRequest, fds: [CInt]) throws(ClientError) -> BrokerReply.Body {
    let bytes = ClientWire.encode(request)
    let sent = bytes.withUnsafeBytes { raw in
      fds.withUnsafeBufferPointer { fdBuffer in Result { () throws(BrokerError) in try socket.send(raw, fds: fdBuffer) } }
    }
    if case .failure(let error) = sent { throw ClientError("cannot send to the broker", broker: error) }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
    defer { buffer.deallocate() }
    var received: [CInt] = []
    let result: PacketSocket.ReceiveResult
    do {
      result = try socket.receive(into: buffer, fds: &received, blocking: true)
    } catch {
      throw ClientError("cannot read the broker's reply", broker: error)
    }
    received.forEach(closeDescriptor)
    switch result {
    case .wouldBlock: throw ClientError("the broker did not answer", broker: BrokerError(.timedOut, "no reply"))
    case .closed: throw ClientError("the broker closed the connection")
    case .packet(let count):
      let reply: BrokerReply
      do {
        reply = try ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: arena)
      } catch {
        throw ClientError("the broker's reply is malformed", broker: error)
      }
      if case .error(let error) = reply.body { throw ClientError("the broker refused the request", broker: error) }
      return reply.body
    }
  }
}
