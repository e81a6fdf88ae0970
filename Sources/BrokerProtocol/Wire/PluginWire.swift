import CBrokerWire
import Userfaultfd

// The broker ↔ plugin messages are the hot path: every fault crosses them
// twice. Every packet is packed and unpacked by protobuf-c: the encoders own
// their protobuf-c structs, initialised once and reused for every batch; the
// decoders unpack into a `WireArena` (a bump allocator reset per packet).
// Nothing is allocated per fault.
//
// The four codecs' stored properties are `@exclusivity(unchecked)`: each is
// read or written for every packet (the emptiness checks in `encode` included),
// and without the attribute `uffd-bench`'s wire micro-benchmark took ~45 ns
// more per round trip (event 111 → 167 ns, decision 175 → 230 ns, medians of 12
// alternated runs; README, Benchmark). Each codec is confined to one thread.

/// Broker side: collects events into one `BrokerToPlugin` packet: page
/// faults into the packet's `Faults` arrays, other events into its `events`,
/// which a plugin applies first. So an event may not follow a fault in one
/// packet (`hasRoom(for:)` says when to send the batch first). Confined to
/// one thread (not thread-safe); reused for every batch.
public final class EventBatchEncoder {
  /// Most events in one packet.
  public let capacity: Int
  /// Events collected for the next packet, faults included.
  public var count: Int { eventCount + faultCount }
  @exclusivity(unchecked) private var eventCount = 0
  @exclusivity(unchecked) private var faultCount = 0
  @exclusivity(unchecked) private var estimatedSize = 0
  @exclusivity(unchecked) private var message = Uffdbroker__BrokerToPlugin()
  private let faults = UnsafeMutablePointer<Uffdbroker__Faults>.allocate(capacity: 1)
  private let events: UnsafeMutablePointer<Uffdbroker__Event>
  private let eventPointers: UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Event>?>
  private let faultIDs, clientIDs, regionIDs, addresses, offsets: UnsafeMutablePointer<UInt64>
  private let flags: UnsafeMutablePointer<UInt32>
  private let threadIDs: UnsafeMutablePointer<Int32>
  private let ranges: UnsafeMutablePointer<Uffdbroker__RangeEvent>
  private let remaps: UnsafeMutablePointer<Uffdbroker__Remapped>
  private let opened: UnsafeMutablePointer<Uffdbroker__RegionOpened>
  private let credentials: UnsafeMutablePointer<Uffdbroker__ClientCredentials>
  private let regionsClosed: UnsafeMutablePointer<Uffdbroker__RegionClosed>
  private let closed: UnsafeMutablePointer<Uffdbroker__Closed>
  private let stores: UnsafeMutablePointer<Uffdbroker__Store>
  private let refusals: UnsafeMutablePointer<Uffdbroker__DecisionRefused>
  /// Store payloads, alive until the batch is encoded.
  @exclusivity(unchecked) private var storeData: [[UInt8]] = []
  private let pool = CStringPool()

  /// An empty batch of at most `capacity` events.
  public init(capacity: Int = 512) {
    self.capacity = capacity
    events = .allocate(capacity: capacity)
    eventPointers = .allocate(capacity: capacity)
    (faultIDs, clientIDs, regionIDs, addresses, offsets) = (.allocate(capacity: capacity), .allocate(capacity: capacity), .allocate(capacity: capacity),
                                                             .allocate(capacity: capacity), .allocate(capacity: capacity))
    flags = .allocate(capacity: capacity)
    threadIDs = .allocate(capacity: capacity)
    ranges = .allocate(capacity: capacity)
    remaps = .allocate(capacity: capacity)
    opened = .allocate(capacity: capacity)
    credentials = .allocate(capacity: capacity)
    regionsClosed = .allocate(capacity: capacity)
    closed = .allocate(capacity: capacity)
    stores = .allocate(capacity: capacity)
    refusals = .allocate(capacity: capacity)
    for index in 0..<capacity {
      uffdbroker__store__init(stores + index)
      uffdbroker__decision_refused__init(refusals + index)
      uffdbroker__event__init(events + index)
      eventPointers[index] = events + index
      uffdbroker__range_event__init(ranges + index)
      uffdbroker__remapped__init(remaps + index)
      uffdbroker__region_opened__init(opened + index)
      uffdbroker__client_credentials__init(credentials + index)
      uffdbroker__region_closed__init(regionsClosed + index)
      uffdbroker__closed__init(closed + index)
    }
    uffdbroker__broker_to_plugin__init(&message)
    message.events = eventPointers
    uffdbroker__faults__init(faults)
    (faults.pointee.fault_id, faults.pointee.client_id, faults.pointee.region_id, faults.pointee.address, faults.pointee.offset) = (faultIDs, clientIDs, regionIDs, addresses, offsets)
    (faults.pointee.flags, faults.pointee.thread_id) = (flags, threadIDs)
  }

  deinit {
    let pointers: [UnsafeMutableRawPointer] = [
      UnsafeMutableRawPointer(events), UnsafeMutableRawPointer(eventPointers), UnsafeMutableRawPointer(faultIDs), UnsafeMutableRawPointer(clientIDs),
      UnsafeMutableRawPointer(regionIDs), UnsafeMutableRawPointer(addresses), UnsafeMutableRawPointer(offsets), UnsafeMutableRawPointer(flags),
      UnsafeMutableRawPointer(threadIDs), UnsafeMutableRawPointer(faults), UnsafeMutableRawPointer(ranges), UnsafeMutableRawPointer(remaps),
      UnsafeMutableRawPointer(opened), UnsafeMutableRawPointer(credentials), UnsafeMutableRawPointer(regionsClosed), UnsafeMutableRawPointer(closed),
      UnsafeMutableRawPointer(stores), UnsafeMutableRawPointer(refusals),
    ]
    pointers.forEach { $0.deallocate() }
  }

  /// Whether no event is collected.
  public var isEmpty: Bool { count == 0 }
  /// Sent with every batch: how many of the plugin's packets the broker has applied.
  @exclusivity(unchecked) public var packetsApplied: UInt64 = 0
  /// True when one more event might not fit the packet.
  public var isFull: Bool { count == capacity || estimatedSize > PacketSocket.maxPacketSize - 16 << 10 }

  /// Whether an event of about `size` bytes (a store's payload) still fits this packet.
  public func canAppend(size: Int) -> Bool { count < capacity && estimatedSize + size + 96 <= PacketSocket.maxPacketSize - 4096 }

  /// Whether `event` may join this batch: it fits, and it is a fault or no
  /// fault came before it (a plugin applies a packet's events before its faults).
  public func hasRoom(for event: BrokerEvent) -> Bool {
    switch event {
    case .pagefault: !isFull
    case .store(let store): faultCount == 0 && canAppend(size: store.data.count)
    default: faultCount == 0 && !isFull
    }
  }

  /// Adds a page fault (the hot path: no allocation).
  public func append(_ fault: PagefaultEvent) {
    precondition(!isFull, "EventBatchEncoder overflow: check isFull")
    let index = faultCount
    faultIDs[index] = fault.faultID
    clientIDs[index] = fault.clientID
    regionIDs[index] = fault.regionID
    addresses[index] = UInt64(fault.address)
    offsets[index] = fault.offset
    flags[index] = UInt32(truncatingIfNeeded: fault.flags.rawValue)
    threadIDs[index] = fault.threadID
    faultCount += 1
    // Five fixed64s and two fixed32s; the first fault adds the arrays' framing.
    estimatedSize += index == 0 ? 48 + 64 : 48
  }

  /// Adds any event; one that is not a fault only while no fault is collected (`hasRoom(for:)`).
  public func append(_ event: BrokerEvent) {
    precondition(!isFull, "EventBatchEncoder overflow: check isFull")
    if case .pagefault(let fault) = event {
      append(fault)
      return
    }
    precondition(faultCount == 0, "EventBatchEncoder: an event after a fault must go in the next packet (check hasRoom(for:))")
    let e = events + eventCount
    switch event {
    case .pagefault:
      preconditionFailure("handled above")
    case .removed(let range), .unmapped(let range):
      let r = ranges + eventCount
      r.pointee.client_id = range.clientID
      r.pointee.region_id = range.regionID
      r.pointee.start = UInt64(range.range.lowerBound)
      r.pointee.end = UInt64(range.range.upperBound)
      r.pointee.start_offset = range.startOffset
      r.pointee.swapped_out = range.swappedOut ? 1 : 0
      if case .removed = event {
        e.pointee.kind_case = UFFDBROKER__EVENT__KIND_REMOVED
        e.pointee.removed = r
      } else {
        e.pointee.kind_case = UFFDBROKER__EVENT__KIND_UNMAPPED
        e.pointee.unmapped = r
      }
      commit(96)
    case .remapped(let remap):
      let r = remaps + eventCount
      r.pointee.client_id = remap.clientID
      r.pointee.region_id = remap.regionID
      r.pointee.from = UInt64(remap.from)
      r.pointee.to = UInt64(remap.to)
      r.pointee.length = UInt64(remap.length)
      r.pointee.new_base = UInt64(remap.newBase)
      e.pointee.kind_case = UFFDBROKER__EVENT__KIND_REMAPPED
      e.pointee.remapped = r
      commit(96)
    case .regionOpened(let clientID, let client, let region, let parent, let token):
      let o = opened + eventCount
      o.pointee.client_id = clientID
      o.pointee.pid = client.pid
      o.pointee.parent_client_id = parent
      o.pointee.token_high = token.high
      o.pointee.token_low = token.low
      o.pointee.region = pool.region(region)
      if client.isKnown {
        credentials[eventCount].uid = client.uid
        credentials[eventCount].gid = client.gid
        o.pointee.client = credentials + eventCount
      } else {
        o.pointee.client = nil
      }
      e.pointee.kind_case = UFFDBROKER__EVENT__KIND_REGION_OPENED
      e.pointee.region_opened = o
      // An Extent is at most 24 bytes on the wire, a Piece 36; the client's credentials 14.
      commit(203 + region.plugin.utf8.count + region.argument.utf8.count + 24 * region.swappedOut.count + 36 * region.pieces.count)
    case .regionClosed(let clientID, let regionID):
      let c = regionsClosed + eventCount
      c.pointee.client_id = clientID
      c.pointee.region_id = regionID
      e.pointee.kind_case = UFFDBROKER__EVENT__KIND_REGION_CLOSED
      e.pointee.region_closed = c
      commit(32)
    case .closed(let clientID, let reason):
      let c = closed + eventCount
      c.pointee.client_id = clientID
      c.pointee.reason = pool.string(reason)
      e.pointee.kind_case = UFFDBROKER__EVENT__KIND_CLOSED
      e.pointee.closed = c
      commit(48 + reason.utf8.count)
    case .store(let store):
      let s = stores + eventCount
      s.pointee.store_id = store.storeID
      s.pointee.client_id = store.clientID
      s.pointee.region_id = store.regionID
      s.pointee.offset = store.offset
      storeData.append(store.data)
      s.pointee.data = ProtobufCBinaryData(len: store.data.count, data: nil)
      e.pointee.kind_case = UFFDBROKER__EVENT__KIND_STORE
      e.pointee.store = s
      commit(96 + store.data.count)
    case .decisionRefused(let faultID, let cause, let reason):
      let r = refusals + eventCount
      r.pointee.fault_id = faultID
      r.pointee.cause = pool.string(cause)
      r.pointee.reason = pool.string(reason)
      e.pointee.kind_case = UFFDBROKER__EVENT__KIND_DECISION_REFUSED
      e.pointee.decision_refused = r
      commit(48 + cause.utf8.count + reason.utf8.count)
    }
  }

  /// `size` bounds the event's encoded size from above (every varint at its
  /// longest, framing included), so the batch packs without measuring it first.
  private func commit(_ size: Int) {
    eventCount += 1
    estimatedSize += size
  }

  /// Packs the batch into `buffer` (at least `PacketSocket.maxPacketSize`),
  /// returns the packet's length and empties the batch.
  public func encode(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    message.n_events = eventCount
    message.packets_applied = packetsApplied
    let f = faults
    (f.pointee.n_fault_id, f.pointee.n_client_id, f.pointee.n_region_id, f.pointee.n_address, f.pointee.n_offset, f.pointee.n_flags, f.pointee.n_thread_id) =
      (faultCount, faultCount, faultCount, faultCount, faultCount, faultCount, faultCount)
    message.faults = faultCount == 0 ? nil : f
    let written = storeData.isEmpty ? pack(into: buffer) : packWithStores(into: buffer, index: 0, storeIndex: 0)
    message.faults = nil
    storeData.removeAll(keepingCapacity: true)
    eventCount = 0
    faultCount = 0
    estimatedSize = 0
    pool.reset()
    return written
  }

  private func pack(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    // `isFull` keeps the bound well inside the buffer; measuring the batch costs
    // as much as packing it, so only debug builds check the bound.
    precondition(estimatedSize + 16 <= buffer.count, "event batch may exceed the packet buffer")
    assert(uffdbroker__broker_to_plugin__get_packed_size(&message) <= estimatedSize + 16, "event size bound too small")
    return uffdbroker__broker_to_plugin__pack(&message, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self))
  }

  /// protobuf-c's bytes for `message` (measured first: for control packets and tests).
  static func packedByProtobufC(_ message: Uffdbroker__BrokerToPlugin) -> [UInt8] {
    protobufCPacked(message, size: uffdbroker__broker_to_plugin__get_packed_size, pack: uffdbroker__broker_to_plugin__pack)
  }

  /// Points each store event at its payload for the duration of the pack.
  private func packWithStores(into buffer: UnsafeMutableRawBufferPointer, index: Int, storeIndex: Int) -> Int {
    guard index < eventCount else { return pack(into: buffer) }
    guard events[index].kind_case == UFFDBROKER__EVENT__KIND_STORE else {
      return packWithStores(into: buffer, index: index + 1, storeIndex: storeIndex)
    }
    return storeData[storeIndex].withUnsafeBufferPointer { data in
      events[index].store.pointee.data.data = UnsafeMutablePointer(mutating: data.baseAddress)
      return packWithStores(into: buffer, index: index + 1, storeIndex: storeIndex + 1)
    }
  }

  /// A `BrokerToPlugin` carrying only a Hello and/or an Error; with the Hello, the names of the descriptors
  /// kept for the plugin (`kept`, attached to the packet in that order).
  public static func encodeControl(hello: Hello?, error: BrokerError?, kept: [String] = []) -> [UInt8] {
    let pool = CStringPool()
    var message = Uffdbroker__BrokerToPlugin()
    uffdbroker__broker_to_plugin__init(&message)
    var helloMessage = Uffdbroker__Hello()
    var errorMessage = Uffdbroker__Error()
    var store = Uffdbroker__DescriptorStore()
    uffdbroker__descriptor_store__init(&store)
    return withUnsafeMutablePointer(to: &helloMessage) { h in
      withUnsafeMutablePointer(to: &errorMessage) { e in
        withUnsafeMutablePointer(to: &store) { k in
          if let hello { hello.encode(into: &h.pointee, pool: pool); message.hello = h }
          if let error { error.encode(into: &e.pointee, pool: pool); message.error = e }
          if !kept.isEmpty {
            (k.pointee.n_names, k.pointee.names) = pool.strings(kept)
            message.kept = k
          }
          return packedByProtobufC(message)
        }
      }
    }
  }
}

/// Plugin side: decodes one `BrokerToPlugin` packet. The accessors read the
/// decoded packet, valid until the next `decode`. Confined to one thread.
public final class EventBatchDecoder {
  private let arena: WireArena
  @exclusivity(unchecked) private var message: UnsafeMutablePointer<Uffdbroker__BrokerToPlugin>?

  /// A decoder unpacking into `arena` (reset by each `decode`).
  public init(arena: WireArena = WireArena()) {
    self.arena = arena
  }

  @exclusivity(unchecked) private var faultCount = 0

  /// Decodes a packet; malformed bytes (fault arrays of unequal lengths among them) throw `.malformed`.
  public func decode(_ bytes: UnsafeRawBufferPointer) throws(BrokerError) {
    message = nil
    faultCount = 0
    let decoded = try arena.unpack(bytes, what: "a broker message", with: uffdbroker__broker_to_plugin__unpack)
    if let f = decoded.pointee.faults?.pointee {
      let count = f.n_fault_id
      guard f.n_client_id == count, f.n_region_id == count, f.n_address == count, f.n_offset == count, f.n_flags == count, f.n_thread_id == count else {
        throw BrokerError(.malformed, "the faults' arrays differ in length")
      }
      faultCount = count
    }
    message = decoded
  }

  /// The packet's Hello, if it has one; a malformed one throws `.malformed`.
  public var hello: Hello? {
    get throws(BrokerError) { try message?.pointee.hello.map { (h) throws(BrokerError) in try Hello(decoding: h) } }
  }
  /// The packet's Error, if the broker sent one (it closes the connection after it).
  public var error: BrokerError? { message?.pointee.error.map { BrokerError(decoding: $0) } }
  /// With the broker's Hello: the names of the descriptors it kept for this plugin, in the order attached.
  public var keptNames: [String] {
    get throws(BrokerError) {
      guard let message else { return [] }
      return try decodeStoreNames(message.pointee.kept)
    }
  }
  /// The number of events in the packet (`event(at:)` takes 0 up to it).
  public var eventCount: Int { (message?.pointee.n_events ?? 0) + faultCount }
  /// How many of the plugin's packets the broker had applied when it sent this one.
  public var packetsApplied: UInt64 { message?.pointee.packets_applied ?? 0 }

  /// The event at `index`; an event with no (or an unknown) kind throws `.malformed`.
  public func event(at index: Int) throws(BrokerError) -> BrokerEvent {
    guard let m = message else { throw BrokerError(.malformed, "event \(index) is missing") }
    // The packet's events first, then its faults.
    if index >= m.pointee.n_events, index - m.pointee.n_events < faultCount, let f = m.pointee.faults?.pointee {
      let i = index - m.pointee.n_events
      return .pagefault(PagefaultEvent(
        faultID: f.fault_id[i], clientID: f.client_id[i], regionID: f.region_id[i], address: UInt(f.address[i]),
        offset: f.offset[i], flags: .init(rawValue: UInt64(f.flags[i])), threadID: f.thread_id[i]))
    }
    guard index < m.pointee.n_events, let e = m.pointee.events[index]?.pointee else {
      throw BrokerError(.malformed, "event \(index) is missing")
    }
    switch e.kind_case {
    case UFFDBROKER__EVENT__KIND_REMOVED: return .removed(RangeEvent(e.removed.pointee))
    case UFFDBROKER__EVENT__KIND_UNMAPPED: return .unmapped(RangeEvent(e.unmapped.pointee))
    case UFFDBROKER__EVENT__KIND_REMAPPED:
      let r = e.remapped.pointee
      // `Int(_:)` would trap on a length past Int.max (found by fuzzing).
      guard r.length <= UInt64(Int.max) else { throw BrokerError(.malformed, "event \(index): Remapped length too large") }
      return .remapped(RemapEvent(clientID: r.client_id, regionID: r.region_id, from: UInt(r.from), to: UInt(r.to), length: Int(r.length), newBase: UInt(r.new_base)))
    case UFFDBROKER__EVENT__KIND_REGION_OPENED:
      let o = e.region_opened.pointee
      guard let region = o.region else { throw BrokerError(.malformed, "RegionOpened without a region") }
      // Absent, or either id the sentinel no process has: both unknown (so it re-encodes as it decoded).
      var client = PeerCredentials(pid: o.pid, uid: PeerCredentials.unknown, gid: PeerCredentials.unknown)
      if let ids = o.client?.pointee, ids.uid != PeerCredentials.unknown, ids.gid != PeerCredentials.unknown {
        client.uid = ids.uid
        client.gid = ids.gid
      }
      return .regionOpened(clientID: o.client_id, client: client, region: try RegionSpec(decoding: region), forkedFrom: o.parent_client_id,
                           token: UInt128(high: o.token_high, low: o.token_low))
    case UFFDBROKER__EVENT__KIND_REGION_CLOSED:
      return .regionClosed(clientID: e.region_closed.pointee.client_id, regionID: e.region_closed.pointee.region_id)
    case UFFDBROKER__EVENT__KIND_CLOSED:
      return .closed(clientID: e.closed.pointee.client_id, reason: String(cString: e.closed.pointee.reason))
    case UFFDBROKER__EVENT__KIND_DECISION_REFUSED:
      let r = e.decision_refused.pointee
      return .decisionRefused(faultID: r.fault_id, cause: String(cString: r.cause), reason: String(cString: r.reason))
    case UFFDBROKER__EVENT__KIND_STORE:
      let s = e.store.pointee
      return .store(StoreEvent(storeID: s.store_id, clientID: s.client_id, regionID: s.region_id, offset: s.offset, data: Array(UnsafeBufferPointer(start: s.data.data, count: s.data.len))))
    default:
      throw BrokerError(.malformed, "event \(index) has no kind")
    }
  }
}

extension RangeEvent {
  init(_ m: Uffdbroker__RangeEvent) {
    self.init(clientID: m.client_id, regionID: m.region_id, range: UInt(m.start)..<UInt(max(m.start, m.end)), startOffset: m.start_offset, swappedOut: m.swapped_out != 0)
  }
}

/// Plugin side: collects decisions (and region replies) into one `PluginToBroker`
/// packet. Confined to one thread; reused for every batch.
public final class DecisionBatchEncoder {
  /// Most decisions in one packet.
  public let capacity: Int
  /// Decisions collected for the next packet.
  public var count: Int { inlineCount + batchCount }
  /// Decisions with inline bytes (a `Decision` each) and without (the `Decisions` arrays).
  @exclusivity(unchecked) private var inlineCount = 0
  @exclusivity(unchecked) private var batchCount = 0
  @exclusivity(unchecked) private var payloadBytes = 0
  @exclusivity(unchecked) private var message = Uffdbroker__PluginToBroker()
  private let batch = UnsafeMutablePointer<Uffdbroker__Decisions>.allocate(capacity: 1)
  private let decisions: UnsafeMutablePointer<Uffdbroker__Decision>
  private let decisionPointers: UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Decision>?>
  private let batchIDs, batchAddresses, batchLengths, batchOffsets: UnsafeMutablePointer<UInt64>
  private let batchKinds: UnsafeMutablePointer<Uffdbroker__DecisionKind>
  @exclusivity(unchecked) private var replies: [RegionReply] = []
  @exclusivity(unchecked) private var storeReplies: [StoreReply] = []
  @exclusivity(unchecked) private var delegations: [(delegation: Delegation, file: CInt?)] = []
  @exclusivity(unchecked) private var hello: Hello?
  /// Descriptors for the broker's store: name and descriptor (closed after the send by the caller).
  @exclusivity(unchecked) private var keeps: [(name: String, fd: CInt)] = []

  /// An empty batch of at most `capacity` decisions.
  public init(capacity: Int = 512) {
    self.capacity = capacity
    decisions = .allocate(capacity: capacity)
    decisionPointers = .allocate(capacity: capacity)
    for index in 0..<capacity {
      uffdbroker__decision__init(decisions + index)
      decisionPointers[index] = decisions + index
    }
    uffdbroker__plugin_to_broker__init(&message)
    message.decisions = decisionPointers
    (batchIDs, batchAddresses, batchLengths, batchOffsets) = (.allocate(capacity: capacity), .allocate(capacity: capacity), .allocate(capacity: capacity), .allocate(capacity: capacity))
    batchKinds = .allocate(capacity: capacity)
    uffdbroker__decisions__init(batch)
    (batch.pointee.fault_id, batch.pointee.kind, batch.pointee.address, batch.pointee.length, batch.pointee.shared_offset) =
      (batchIDs, batchKinds, batchAddresses, batchLengths, batchOffsets)
  }

  deinit {
    decisions.deallocate()
    decisionPointers.deallocate()
    for pointer in [UnsafeMutableRawPointer(batchIDs), UnsafeMutableRawPointer(batchAddresses), UnsafeMutableRawPointer(batchLengths),
                    UnsafeMutableRawPointer(batchOffsets), UnsafeMutableRawPointer(batchKinds), UnsafeMutableRawPointer(batch)] {
      pointer.deallocate()
    }
  }

  /// Whether nothing is collected (no decision, reply, delegation, Hello or kept descriptor).
  public var isEmpty: Bool { count == 0 && replies.isEmpty && storeReplies.isEmpty && delegations.isEmpty && hello == nil && keeps.isEmpty }

  /// Descriptors to attach to the packet `encode` makes (one per file delegation, in order).
  @exclusivity(unchecked) public private(set) var descriptors: [CInt] = []

  /// Whether a decision carrying `dataLength` bytes still fits this packet.
  public func canAppend(dataLength: Int) -> Bool {
    count < capacity && payloadBytes + dataLength + Self.decisionBound * (count + 1) <= PacketSocket.maxPacketSize - 4096
  }

  /// A decision's encoded size, its bytes aside, at most (every varint at its longest, framing included).
  static let decisionBound = 96

  /// protobuf-c's bytes for `message` (measured first: for tests).
  static func packedByProtobufC(_ message: Uffdbroker__PluginToBroker) -> [UInt8] {
    protobufCPacked(message, size: uffdbroker__plugin_to_broker__get_packed_size, pack: uffdbroker__plugin_to_broker__pack)
  }

  /// Adds a decision. `data` is borrowed until `encode` (it is copied into the
  /// packet there); or `sharedOffset` names where the bytes lie in the shared area.
  /// One without inline bytes (zero, retry, poison, a copy from the shared area) goes into the packet's `Decisions` arrays.
  public func append(faultID: UInt64, kind: DecisionKind, address: UInt, length: Int, data: UnsafeRawBufferPointer? = nil, sharedOffset: UInt64? = nil) {
    precondition(canAppend(dataLength: data?.count ?? 0), "DecisionBatchEncoder overflow: check canAppend")
    // Into the arrays when they say it all: no inline bytes, and a shared offset exactly for a copy.
    if data == nil && (kind == .copy) == (sharedOffset != nil) {
      batchIDs[batchCount] = faultID
      batchKinds[batchCount] = Uffdbroker__DecisionKind(rawValue: UInt32(kind.rawValue))
      batchAddresses[batchCount] = UInt64(address)
      batchLengths[batchCount] = UInt64(length)
      batchOffsets[batchCount] = sharedOffset ?? 0
      batchCount += 1
      return
    }
    let d = decisions + inlineCount
    d.pointee.fault_id = faultID
    d.pointee.kind = Uffdbroker__DecisionKind(rawValue: UInt32(kind.rawValue))
    d.pointee.address = UInt64(address)
    d.pointee.length = UInt64(length)
    d.pointee.data.len = data?.count ?? 0
    d.pointee.data.data = UnsafeMutablePointer(mutating: data?.baseAddress?.assumingMemoryBound(to: UInt8.self))
    d.pointee.shared = sharedOffset == nil ? 0 : 1
    d.pointee.shared_offset = sharedOffset ?? 0
    inlineCount += 1
    payloadBytes += data?.count ?? 0
  }

  /// Adds the answer to a `regionOpened`.
  public func append(_ reply: RegionReply) { replies.append(reply) }
  /// Adds the answer to a `StoreEvent`.
  public func append(_ reply: StoreReply) { storeReplies.append(reply) }
  /// A delegation; a file delegation's `file` is attached to the packet (it stays open here),
  /// and a file delegation without one is a programming error (it would serve zeros).
  public func append(_ delegation: Delegation, file: CInt?) {
    if case .file = delegation.source, !delegation.revoke { precondition(file != nil, "a file delegation needs its file") }
    delegations.append((delegation, file))
  }
  /// File delegations collected (each needs a descriptor on the packet).
  public var descriptorCount: Int {
    delegations.reduce(0) { count, entry in Self.attached(entry) == nil ? count : count + 1 }
  }

  /// The descriptor a delegation attaches: a file delegation's file (not a revocation's).
  private static func attached(_ entry: (delegation: Delegation, file: CInt?)) -> CInt? {
    guard case .file = entry.delegation.source, !entry.delegation.revoke else { return nil }
    return entry.file
  }
  /// Puts `hello` in the next packet (the connection's first).
  public func setHello(_ hello: Hello) { self.hello = hello }
  /// Asks the broker to keep `fd` as `name` (the descriptor is attached after those of file delegations).
  public func keep(_ fd: CInt, as name: String) { keeps.append((name, fd)) }

  /// Packs everything collected into `buffer`, returns the length, and empties the batch.
  public func encode(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    message.n_decisions = inlineCount
    (batch.pointee.n_fault_id, batch.pointee.n_kind, batch.pointee.n_address, batch.pointee.n_length, batch.pointee.n_shared_offset) =
      (batchCount, batchCount, batchCount, batchCount, batchCount)
    message.batch = batchCount == 0 ? nil : batch
    defer { message.batch = nil }
    let written: Int
    descriptors.removeAll(keepingCapacity: true)
    if replies.isEmpty && storeReplies.isEmpty && delegations.isEmpty && hello == nil && keeps.isEmpty {
      // Only decisions: `canAppend` bounded the size, so it is not measured first.
      let bound = payloadBytes + Self.decisionBound * count + 16
      precondition(bound <= buffer.count, "decision batch may exceed the packet buffer")
      assert(uffdbroker__plugin_to_broker__get_packed_size(&message) <= bound, "decision size bound too small")
      written = uffdbroker__plugin_to_broker__pack(&message, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self))
    } else {
      let pool = CStringPool()
      var helloMessage = Uffdbroker__Hello()
      let replyMessages = UnsafeMutablePointer<Uffdbroker__RegionReply>.allocate(capacity: max(replies.count, 1))
      let replyPointers = UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__RegionReply>?>.allocate(capacity: max(replies.count, 1))
      let errors = UnsafeMutablePointer<Uffdbroker__Error>.allocate(capacity: max(replies.count, 1))
      let storeMessages = UnsafeMutablePointer<Uffdbroker__StoreReply>.allocate(capacity: max(storeReplies.count, 1))
      let storePointers = UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__StoreReply>?>.allocate(capacity: max(storeReplies.count, 1))
      let storeErrors = UnsafeMutablePointer<Uffdbroker__Error>.allocate(capacity: max(storeReplies.count, 1))
      defer {
        replyMessages.deallocate()
        replyPointers.deallocate()
        errors.deallocate()
        storeMessages.deallocate()
        storePointers.deallocate()
        storeErrors.deallocate()
      }
      for (index, reply) in storeReplies.enumerated() {
        uffdbroker__store_reply__init(storeMessages + index)
        storeMessages[index].store_id = reply.storeID
        if let error = reply.error {
          error.encode(into: &storeErrors[index], pool: pool)
          storeMessages[index].error = storeErrors + index
        }
        storePointers[index] = storeMessages + index
      }
      message.n_store_replies = storeReplies.count
      message.store_replies = storePointers
      let delegationMessages = UnsafeMutablePointer<Uffdbroker__Delegation>.allocate(capacity: max(delegations.count, 1))
      let delegationPointers = UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Delegation>?>.allocate(capacity: max(delegations.count, 1))
      defer {
        delegationMessages.deallocate()
        delegationPointers.deallocate()
      }
      for (index, entry) in delegations.enumerated() {
        let delegation = entry.delegation
        let d = delegationMessages + index
        uffdbroker__delegation__init(d)
        d.pointee.client_id = delegation.clientID
        d.pointee.region_id = delegation.regionID
        d.pointee.offset = delegation.offsets.lowerBound
        d.pointee.length = UInt64(delegation.offsets.count)
        d.pointee.prefetch_pages = UInt32(clamping: delegation.prefetchPages)
        d.pointee.revoke = delegation.revoke ? 1 : 0
        d.pointee.stream = delegation.stream ? 1 : 0
        (d.pointee.n_stream_first, d.pointee.stream_first) = pool.integers(delegation.streamFirst)
        if !delegation.revoke, case .zero = delegation.source { d.pointee.kind = UFFDBROKER__DELEGATION_KIND__DELEGATE_ZERO }
        if case .file(let offset) = delegation.source, let file = Self.attached(entry) {
          d.pointee.kind = UFFDBROKER__DELEGATION_KIND__DELEGATE_FILE
          d.pointee.file_offset = offset
          descriptors.append(file)
        }
        delegationPointers[index] = d
      }
      message.n_delegations = delegations.count
      message.delegations = delegationPointers
      for (index, reply) in replies.enumerated() {
        uffdbroker__region_reply__init(replyMessages + index)
        replyMessages[index].client_id = reply.clientID
        replyMessages[index].region_id = reply.regionID
        if let error = reply.error {
          error.encode(into: &errors[index], pool: pool)
          replyMessages[index].error = errors + index
        }
        (replyMessages[index].n_lost, replyMessages[index].lost) = pool.extents(reply.lost)
        replyPointers[index] = replyMessages + index
      }
      message.n_region_replies = replies.count
      message.region_replies = replyPointers
      var store = Uffdbroker__DescriptorStore()
      uffdbroker__descriptor_store__init(&store)
      descriptors += keeps.map(\.fd)
      written = withUnsafeMutablePointer(to: &helloMessage) { h in
        withUnsafeMutablePointer(to: &store) { k in
          if let hello {
            hello.encode(into: &h.pointee, pool: pool)
            message.hello = h
          }
          if !keeps.isEmpty {
            (k.pointee.n_names, k.pointee.names) = pool.strings(keeps.map(\.name))
            message.keep = k
          }
          return pack(into: buffer)
        }
      }
      message.keep = nil
      keeps.removeAll(keepingCapacity: true)
      message.hello = nil
      message.n_region_replies = 0
      message.region_replies = nil
      message.n_store_replies = 0
      message.store_replies = nil
      message.n_delegations = 0
      message.delegations = nil
      replies.removeAll(keepingCapacity: true)
      storeReplies.removeAll(keepingCapacity: true)
      delegations.removeAll(keepingCapacity: true)
      hello = nil
    }
    for index in 0..<inlineCount { decisions[index].data = ProtobufCBinaryData(len: 0, data: nil) }
    inlineCount = 0
    batchCount = 0
    payloadBytes = 0
    return written
  }

  private func pack(into buffer: UnsafeMutableRawBufferPointer) -> Int {
    let size = uffdbroker__plugin_to_broker__get_packed_size(&message)
    precondition(size <= buffer.count, "decision batch of \(size) bytes exceeds the packet buffer")
    return uffdbroker__plugin_to_broker__pack(&message, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self))
  }
}

/// A decision as decoded by the broker. `data` points into the decoder's
/// arena and is valid until the next `decode`.
public struct DecodedDecision: Equatable {
  /// The fault it answers.
  public var faultID: UInt64
  /// nil for a kind this build does not know (the broker refuses it).
  public var kind: DecisionKind?
  /// Where the range starts in the client.
  public var address: UInt
  /// The range's length (0: the faulting page alone).
  public var length: Int
  /// A copy's inline bytes (empty when they lie in the shared area).
  public var data: UnsafeRawBufferPointer
  /// Where the bytes lie in the plugin's shared area, instead of `data`.
  public var sharedOffset: UInt64?

  /// Equal fields and equal bytes (wherever they lie).
  public static func == (a: DecodedDecision, b: DecodedDecision) -> Bool {
    a.faultID == b.faultID && a.kind == b.kind && a.address == b.address && a.length == b.length
      && a.sharedOffset == b.sharedOffset && a.data.elementsEqual(b.data)
  }

  /// A decision with these fields (`data` borrowed, not copied).
  public init(faultID: UInt64, kind: DecisionKind?, address: UInt, length: Int, data: UnsafeRawBufferPointer, sharedOffset: UInt64? = nil) {
    self.faultID = faultID
    self.kind = kind
    self.address = address
    self.length = length
    self.data = data
    self.sharedOffset = sharedOffset
  }

  /// From the wire's values: a length or address this platform cannot hold makes it a decision of no known kind (refused).
  init(faultID: UInt64, kind: UInt32, address: UInt64, length: UInt64, data: UnsafeRawBufferPointer, sharedOffset: UInt64?) {
    self.faultID = faultID
    guard length <= UInt64(Int.max), address <= UInt64(UInt.max) else {
      self.kind = nil
      self.address = 0
      self.length = 0
      self.data = UnsafeRawBufferPointer(start: nil, count: 0)
      self.sharedOffset = nil
      return
    }
    self.kind = DecisionKind(rawValue: Int32(bitPattern: kind))
    self.address = UInt(address)
    self.length = Int(length)
    self.data = data
    self.sharedOffset = sharedOffset
  }
}

/// Broker side: decodes one `PluginToBroker` packet into its arena. The
/// accessors read the decoded packet, valid until the next `decode`. Confined to one thread.
public final class DecisionBatchDecoder {
  private let arena: WireArena
  @exclusivity(unchecked) private var message: UnsafeMutablePointer<Uffdbroker__PluginToBroker>?

  /// A decoder unpacking into `arena` (reset by each `decode`).
  public init(arena: WireArena = WireArena()) {
    self.arena = arena
  }

  @exclusivity(unchecked) private var batchCount = 0

  /// Decodes a packet; malformed bytes (decision arrays of unequal lengths
  /// among them) throw `.malformed`. The decisions' bytes are copied into the
  /// arena (`bytes` may be reused at once).
  public func decode(_ bytes: UnsafeRawBufferPointer) throws(BrokerError) {
    message = nil
    batchCount = 0
    let decoded = try arena.unpack(bytes, what: "a plugin message", with: uffdbroker__plugin_to_broker__unpack)
    if let b = decoded.pointee.batch?.pointee {
      let count = b.n_fault_id
      guard b.n_kind == count, b.n_address == count, b.n_length == count, b.n_shared_offset == count else {
        throw BrokerError(.malformed, "the decisions' arrays differ in length")
      }
      batchCount = count
    }
    message = decoded
  }

  /// The packet's Hello, if it has one; a malformed one throws `.malformed`.
  public var hello: Hello? {
    get throws(BrokerError) { try message?.pointee.hello.map { (h) throws(BrokerError) in try Hello(decoding: h) } }
  }
  /// The number of decisions in the packet.
  public var decisionCount: Int { (message?.pointee.n_decisions ?? 0) + batchCount }
  /// Names of descriptors to keep in the broker's store, attached after those of file delegations.
  public var keepNames: [String] {
    get throws(BrokerError) {
      guard let message else { return [] }
      return try decodeStoreNames(message.pointee.keep)
    }
  }

  /// The decision at `index`; nil past the end.
  public func decision(at index: Int) -> DecodedDecision? {
    guard let m = message else { return nil }
    if index >= m.pointee.n_decisions, index - m.pointee.n_decisions < batchCount, let b = m.pointee.batch?.pointee {
      let i = index - m.pointee.n_decisions
      let kind = b.kind[i].rawValue
      return DecodedDecision(faultID: b.fault_id[i], kind: kind, address: b.address[i], length: b.length[i], data: UnsafeRawBufferPointer(start: nil, count: 0),
                             sharedOffset: kind == UFFDBROKER__DECISION_KIND__DECISION_COPY.rawValue ? b.shared_offset[i] : nil)
    }
    guard index < m.pointee.n_decisions, let d = m.pointee.decisions[index]?.pointee else { return nil }
    return DecodedDecision(faultID: d.fault_id, kind: d.kind.rawValue, address: d.address, length: d.length,
                           data: UnsafeRawBufferPointer(start: d.data.data, count: d.data.len), sharedOffset: d.shared != 0 ? d.shared_offset : nil)
  }

  /// The packet's delegations; file delegations take the packet's first
  /// `descriptorCount` attached descriptors in order, each naming its index
  /// (throws `.malformed` if there are fewer than they need).
  public func delegations(descriptorCount: Int) throws(BrokerError) -> [ReceivedDelegation] {
    guard let m = message, m.pointee.n_delegations > 0 else { return [] }
    var result: [ReceivedDelegation] = []
    var next = 0
    for index in 0..<m.pointee.n_delegations {
      guard let d = m.pointee.delegations[index]?.pointee else { continue }
      guard d.length <= UInt64(Int.max), d.offset <= UInt64.max - d.length else { throw BrokerError(.malformed, "delegation range overflows") }
      var source = Delegation.Source.zero
      var fileIndex: Int?
      if !(d.revoke != 0) {
        switch d.kind {
        case UFFDBROKER__DELEGATION_KIND__DELEGATE_ZERO: source = .zero
        case UFFDBROKER__DELEGATION_KIND__DELEGATE_FILE:
          guard next < descriptorCount else { throw BrokerError(.malformed, "a file delegation without its descriptor") }
          source = .file(offset: d.file_offset)
          fileIndex = next
          next += 1
        default: throw BrokerError(.malformed, "unknown delegation kind \(d.kind.rawValue)")
        }
      }
      let first = d.n_stream_first == 0 ? [] : Array(UnsafeBufferPointer(start: d.stream_first, count: d.n_stream_first))
      let delegation = Delegation(clientID: d.client_id, regionID: d.region_id, offsets: d.offset..<d.offset + d.length, source: source,
                                  prefetchPages: Int(d.prefetch_pages), revoke: d.revoke != 0, stream: d.stream != 0, streamFirst: first)
      result.append(ReceivedDelegation(delegation, fileIndex: fileIndex))
    }
    return result
  }

  /// The packet's answers to `StoreEvent`s.
  public var storeReplies: [StoreReply] {
    guard let m = message, m.pointee.n_store_replies > 0 else { return [] }
    return (0..<m.pointee.n_store_replies).compactMap { index in
      guard let r = m.pointee.store_replies[index]?.pointee else { return nil }
      return StoreReply(storeID: r.store_id, error: r.error.map { BrokerError(decoding: $0) })
    }
  }

  /// The packet's answers to `regionOpened` events.
  public var regionReplies: [RegionReply] {
    get throws(BrokerError) {
      guard let m = message, m.pointee.n_region_replies > 0 else { return [] }
      var replies: [RegionReply] = []
      for index in 0..<m.pointee.n_region_replies {
        guard let r = m.pointee.region_replies[index]?.pointee else { continue }
        let lost = try decodeExtents(r.n_lost, r.lost, of: "the reply for region \(r.region_id)")
        replies.append(RegionReply(clientID: r.client_id, regionID: r.region_id, error: r.error.map { BrokerError(decoding: $0) }, lost: lost))
      }
      return replies
    }
  }
}
