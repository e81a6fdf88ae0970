import BrokerProtocol
import Glibc
import LinuxSupport
import SystemPackage
import Userfaultfd

/// The client's connection to the broker, shared by the caller's requests and
/// the monitor thread (which replaces the socket on re-attach).
final class Connection: @unchecked Sendable {
  // @unchecked: `state` is only touched with `mutex` held.
  struct State {
    let uffd: UserfaultFD
    /// The file the shared-memory regions map (a duplicate this connection owns), sent after the uffd.
    let sharedMemory: CInt?
    var regions: [RegionSpec]
    let socketPath: String
    /// A uid besides root and ours that may serve `socketPath` (nil: `UFFD_BROKER_UID`, if set).
    let brokerUID: UInt32?
    let name: String
    let timeoutMilliseconds: Int
    var socket: PacketSocket?
    var clientID: UInt64 = 0
    /// How many times it attached (the first Register, then each re-attach).
    var attachments = 0
    var nextRequest: UInt64 = 1
    let arena = WireArena(capacity: 64 << 10)
    /// Where the broker last said each region lies, after an mremap or munmap
    /// moved or cut it (empty: nothing of it is left). A re-attach registers them there.
    var layouts: [UInt64: [RegionPiece]] = [:]
    /// What the broker last said each region dropped, and what no one can vouch
    /// for: a restarted broker knows nothing of it, and a re-attach tells it.
    var dropRecords: [UInt64: (dropped: [Range<UInt64>], unknown: [Range<UInt64>])] = [:]
    /// Who this client is across re-attaches: a plugin keeps its data (a swap store) under it.
    let token = UInt128.randomToken()
    /// Children this process forked, served by the broker: their uffds (the
    /// broker's copies are the only others) and where their regions lay.
    var children: [UInt64: (uffd: UserfaultFD, pieces: [RegionPiece])] = [:]
    /// The broker's read journal, from the Ack of the last Register.
    var journal: JournalView?

    /// Where `offset..<offset + length` of `region` lies now: at its base, or
    /// (after an mremap) in one of the pieces the broker said; nil if in none.
    func address(ofRegion region: RegionSpec, offset: Int, length: Int) -> UInt? {
      guard let pieces = layouts[region.id] else { return region.base + UInt(offset) }
      let start = UInt64(offset)
      return pieces.first { start >= $0.offset && start + UInt64(length) <= $0.offset + UInt64($0.length) }
        .map { $0.address + UInt(start - $0.offset) }
    }

    /// The regions as they lie now, for Register: moved ones with their pieces,
    /// gone ones left out, each with what it dropped.
    var currentRegions: [RegionSpec] {
      regions.compactMap { $0.asItLiesNow(pieces: layouts[$0.id], dropRecord: dropRecords[$0.id]) }
    }

    /// Connects, says Hello and registers the uffd with the current regions.
    mutating func attach() throws(ClientError) {
      readNotifications()  // what the old broker sent before it went
      // What it read and may not have told: the program's drops then.
      if let read = journal?.unsettledRead {
        for region in regions {
          dropRecords[region.id] = read.dropRecord(of: region, dropRecords[region.id], pieces: layouts[region.id])
        }
      }
      journal = nil
      // The broker that served the children is gone, and a new one does not
      // know them: what they never had filled fails closed instead of reading zeros.
      for child in children.values {
        for piece in child.pieces { child.uffd.poisonMissing(address: piece.address, length: piece.length) }
      }
      children.removeAll()
      socket = nil
      let fresh: PacketSocket
      do {
        fresh = try PacketSocket.connect(path: socketPath, trusting: brokerUID)
      } catch where error.code == .notAuthorized {
        throw ClientError("not registering with the broker at \(socketPath)", broker: error)
      } catch {
        throw ClientError("cannot reach the broker at \(socketPath)", broker: error)
      }
      fresh.setReceiveTimeout(milliseconds: timeoutMilliseconds)
      socket = fresh
      _ = try request(.hello(Hello(role: .client, name: name)))
      let register = RegisterRequest(pid: getpid(), features: uffd.features, ioctls: uffd.ioctls, regions: currentRegions, token: token)
      let reply = try request(.register(register), fds: [uffd.fileDescriptor.rawValue] + (sharedMemory.map { [$0] } ?? []))
      guard case .ack(let id, _) = reply else { throw ClientError("the broker answered Register with \(reply)") }
      clientID = id
      attachments += 1
    }

    /// Reads what the broker sent unasked (layouts, drop records, children) without waiting.
    mutating func readNotifications() {
      guard let socket else { return }
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
      defer { buffer.deallocate() }
      while true {
        var received: [CInt] = []
        guard case .packet(let count) = try? socket.receive(into: buffer, fds: &received) else { return }
        defer { received.forEach(closeDescriptor) }
        if let reply = try? ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: arena) {
          _ = take(reply.body, fds: &received)
        }
      }
    }

    /// Takes in what the broker sends unasked; false for anything else (a reply).
    /// A descriptor it keeps is removed from `fds`.
    mutating func take(_ body: BrokerReply.Body, fds: inout [CInt]) -> Bool {
      switch body {
      case .layout(let region, let pieces):
        layouts[region] = pieces
      case .forked(let childID, let pieces):
        guard let fd = fds.first, let child = try? UserfaultFD(adopting: FileDescriptor(rawValue: fd), features: uffd.features, ioctls: uffd.ioctls) else { return true }
        fds.removeFirst()
        children[childID] = (child, pieces)
      case .childClosed(let childID):
        children[childID] = nil
      case .dropped(let region, let dropped, let unknown):
        dropRecords[region] = (dropped, unknown)
      case .hello, .ack, .error:
        return false
      }
      return true
    }

    /// Sends one request and waits for its reply; an Error reply throws.
    mutating func request(_ body: ClientRequest.Body, fds: [CInt] = []) throws(ClientError) -> BrokerReply.Body {
      guard let socket else { throw ClientError("not connected to the broker") }
      let id = nextRequest
      nextRequest += 1
      let bytes = ClientWire.encode(ClientRequest(requestID: id, body))
      let sent = bytes.withUnsafeBytes { raw in
        fds.withUnsafeBufferPointer { fdBuffer in Result { () throws(BrokerError) in try socket.send(raw, fds: fdBuffer) } }
      }
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
      defer { buffer.deallocate() }
      if case .failure(let error) = sent {
        // A broker that refuses a connection sends why, then shuts it: the send
        // fails (EPIPE), but the Error is there to read.
        if let refusal = queuedError(socket, buffer) { throw ClientError("the broker refused the connection", broker: refusal) }
        throw ClientError("cannot send to the broker", broker: error)
      }
      while true {
        var received: [CInt] = []
        let result: PacketSocket.ReceiveResult
        do {
          result = try socket.receive(into: buffer, fds: &received, blocking: true)
        } catch {
          throw ClientError("cannot read the broker's reply", broker: error)
        }
        defer { received.forEach(closeDescriptor) }
        switch result {
        case .wouldBlock: throw ClientError("the broker did not answer", broker: BrokerError(.timedOut, "no reply within \(timeoutMilliseconds) ms"))
        case .closed: throw ClientError("the broker closed the connection")
        case .packet(let count):
          let reply: BrokerReply
          do {
            reply = try ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: arena)
          } catch {
            throw ClientError("the broker's reply is malformed", broker: error)
          }
          if take(reply.body, fds: &received) { continue }
          // The late reply to a request that timed out earlier answers that request, not this one
          // (id 0: the broker refuses the connection itself, before reading any request).
          guard reply.requestID == id || reply.requestID == 0 else { continue }
          if case .error(let error) = reply.body { throw ClientError("the broker refused the request", broker: error) }
          if case .register = body, case .ack = reply.body, !received.isEmpty { journal = JournalView(adopting: received.removeFirst()) }
          return reply.body
        }
      }
    }

    /// An Error the broker sent before it shut the connection, if one is waiting
    /// (behind notices or late replies, which are handled as usual).
    private mutating func queuedError(_ socket: PacketSocket, _ buffer: UnsafeMutableRawBufferPointer) -> BrokerError? {
      while true {
        var received: [CInt] = []
        defer { received.forEach(closeDescriptor) }
        guard case .packet(let count)? = try? socket.receive(into: buffer, fds: &received),
              let reply = try? ClientWire.decodeReply(UnsafeRawBufferPointer(rebasing: buffer[..<count]), arena: arena)
        else { return nil }
        if take(reply.body, fds: &received) { continue }
        if case .error(let error) = reply.body { return error }
      }
    }
  }

  private var mutex = pthread_mutex_t()
  /// Signalled when `attachments` grows.
  private var attached = pthread_cond_t()
  private var state: State

  init(uffd: UserfaultFD, sharedMemory: CInt?, regions: [RegionSpec], socketPath: String, brokerUID: UInt32?, name: String, timeoutMilliseconds: Int) {
    state = State(uffd: uffd, sharedMemory: sharedMemory, regions: regions, socketPath: socketPath, brokerUID: brokerUID, name: name, timeoutMilliseconds: timeoutMilliseconds)
    pthread_mutex_init(&mutex, nil)
    var attributes = pthread_condattr_t()
    pthread_condattr_init(&attributes)
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
    pthread_cond_init(&attached, &attributes)
    pthread_condattr_destroy(&attributes)
  }

  deinit {
    if let fd = state.sharedMemory { closeDescriptor(fd) }
    pthread_cond_destroy(&attached)
    pthread_mutex_destroy(&mutex)
  }

  func withLock<Result, Failure: Error>(_ body: (inout State) throws(Failure) -> Result) throws(Failure) -> Result {
    pthread_mutex_lock(&mutex)
    let before = state.attachments
    defer {
      if state.attachments != before { pthread_cond_broadcast(&attached) }
      pthread_mutex_unlock(&mutex)
    }
    return try body(&state)
  }

  /// Waits until it has attached more than `count` times; false if `milliseconds` passed first.
  func waitForAttachment(beyond count: Int, milliseconds: Int) -> Bool {
    var deadline = timespec()
    clock_gettime(CLOCK_MONOTONIC, &deadline)
    let nanoseconds = Int(deadline.tv_nsec) + (milliseconds % 1000) * 1_000_000
    deadline.tv_sec += milliseconds / 1000 + nanoseconds / 1_000_000_000
    deadline.tv_nsec = nanoseconds % 1_000_000_000
    pthread_mutex_lock(&mutex)
    defer { pthread_mutex_unlock(&mutex) }
    while state.attachments <= count {
      if pthread_cond_timedwait(&attached, &mutex, &deadline) == ETIMEDOUT { return state.attachments > count }
    }
    return true
  }
}
