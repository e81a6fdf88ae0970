import LinuxSupport
import Userfaultfd

/// The protocol version this build speaks (`Hello.version`).
public let brokerProtocolVersion: UInt32 = 2

/// This build's version, as every executable's `--version` says it.
public let uffdBrokerVersion = "0.7.0 (protocol \(brokerProtocolVersion))"

/// Who is speaking on a connection.
public enum Role: Int32, Sendable {
  /// A process whose memory is brokered (ClientSDK).
  case client = 1
  /// A process that decides faults (PluginSDK).
  case plugin = 2
  /// The broker, answering either.
  case broker = 3
}

/// The first message on every connection, in both directions.
public struct Hello: Equatable, Sendable {
  /// The sender's protocol version (`brokerProtocolVersion`); the broker refuses another with `version`.
  public var version: UInt32
  /// Who sends it.
  public var role: Role
  /// A plugin: the plugin name it serves. A client: a label for logs.
  public var name: String

  /// A Hello of this build's protocol version.
  public init(role: Role, name: String, version: UInt32 = brokerProtocolVersion) {
    self.version = version
    self.role = role
    self.name = name
  }
}

/// A range of a client's memory, served by one plugin.
public struct RegionSpec: Equatable, Hashable, Sendable {
  /// Chosen by the client; unique per client.
  public var id: UInt64
  /// Where the region started when the client registered it (page aligned).
  public var base: UInt
  /// Its length in bytes (a whole number of pages).
  public var length: Int
  /// Its page size: the system's, or a huge page size for hugetlbfs.
  public var pageSize: Int
  /// The plugin that serves the region.
  public var plugin: String
  /// For the plugin: a file path, a store key...
  public var argument: String
  /// For the plugin: where the region starts in its backing.
  public var backingOffset: UInt64
  /// Region offsets a swap-out released whose only copy the plugin holds (see
  /// `Region.swapped_out` in the proto): what a re-attaching client released, or
  /// what a plugin must still hold when a region is opened again.
  public var swappedOut: [Range<UInt64>]
  /// Where the region lies now, when an mremap moved or cut it (a client
  /// re-attaching says so); empty: all of it at `base`.
  public var pieces: [RegionPiece]
  /// Region offsets the client dropped itself (a client re-attaching says what
  /// the broker last told it, `BrokerReply.Body.dropped`): they read as zeros.
  public var dropped: [Range<UInt64>]
  /// Region offsets whose content no one can vouch for (a cover of drops too
  /// many to list, swapped-out pages a plugin lost): their faults fail closed.
  public var unknown: [Range<UInt64>]
  /// How its memory is backed (see `Backing`).
  public var backing: Backing = .anonymous

  /// How a region's memory is backed, which decides how the broker fills it.
  public enum Backing: Hashable, Sendable {
    /// Private anonymous memory (or hugetlbfs): filled with `UFFDIO_COPY`.
    case anonymous
    /// A mapping of the client's shared-memory file (a memfd, attached to its
    /// Register), registered missing and minor: the broker fills the file's page
    /// cache at `fileOffset` (the file offset of the region's first byte) and
    /// maps it with `UFFDIO_CONTINUE`, so every mapping of the file shares it.
    case sharedMemory(fileOffset: UInt64)
  }

  /// Whether the region maps the client's shared-memory file.
  public var isSharedMemory: Bool { backing != .anonymous }

  /// The longest plugin name and argument a broker accepts: every region
  /// event must fit one packet however long the client made them.
  public static let maxPluginNameBytes = 255
  /// The longest argument a broker accepts.
  public static let maxArgumentBytes = 4096
  /// Extents each record of a region (`swappedOut`, `dropped`, `unknown`) may
  /// carry, so that a client's Register with every region fits one packet: a
  /// longer `swappedOut` is coarsened (the gaps merged in), a longer `dropped`
  /// becomes `unknown`, coarsened.
  public static let maxExtents = 32
  /// Pieces a region may be re-registered in (a region cut finer cannot re-attach).
  public static let maxPieces = 256

  /// This region as a re-attaching client registers it: where it lies now
  /// (`pieces`, from the broker's `Layout` notices) and what it dropped; nil
  /// when nothing of it is left.
  public func asItLiesNow(pieces layout: [RegionPiece]?, dropRecord: (dropped: [Range<UInt64>], unknown: [Range<UInt64>])?) -> RegionSpec? {
    var current = self
    if let dropRecord { (current.dropped, current.unknown) = dropRecord }
    guard let layout else { return current }
    guard !layout.isEmpty else { return nil }
    current.pieces = layout
    return current
  }

  /// A region as a client first registers it (`swappedOut`, `pieces`, `dropped`
  /// and `unknown` are for re-attaching).
  public init(id: UInt64, base: UInt, length: Int, pageSize: Int = systemPageSize, plugin: String, argument: String = "", backingOffset: UInt64 = 0,
              swappedOut: [Range<UInt64>] = [], pieces: [RegionPiece] = [], dropped: [Range<UInt64>] = [], unknown: [Range<UInt64>] = [],
              backing: Backing = .anonymous) {
    self.backing = backing
    self.swappedOut = swappedOut
    self.pieces = pieces
    self.dropped = dropped
    self.unknown = unknown
    self.id = id
    self.base = base
    self.length = length
    self.pageSize = pageSize
    self.plugin = plugin
    self.argument = argument
    self.backingOffset = backingOffset
  }

  /// The addresses it was registered at: `base..<base + length`.
  public var range: Range<UInt> { base..<base + UInt(length) }
}

/// Where part of a region lies: region offsets `offset..<offset + length` at `address`.
public struct RegionPiece: Equatable, Hashable, Sendable {
  /// Where the piece lies in the client.
  public var address: UInt
  /// The region offset of its first byte.
  public var offset: UInt64
  /// Its length in bytes.
  public var length: Int

  /// Region offsets `offset..<offset + length` at `address`.
  public init(address: UInt, offset: UInt64, length: Int) {
    self.address = address
    self.offset = offset
    self.length = length
  }

  /// The piece's addresses: `address..<address + length`.
  public var range: Range<UInt> { address..<address + UInt(length) }
}

/// Client → broker: the userfaultfd (attached) and its regions.
public struct RegisterRequest: Equatable, Sendable {
  /// The client's pid (the broker checks it against SO_PEERCRED).
  public var pid: Int32
  /// The features the uffd's `UFFDIO_API` granted (the broker trusts the kernel's word over this).
  public var features: UserfaultFD.Features
  /// The ioctls the uffd supports.
  public var ioctls: UserfaultFD.Ioctls
  /// The regions registered with the uffd, each naming its plugin.
  public var regions: [RegionSpec]
  /// The client's identity across re-attaches (0: none).
  public var token: UInt128

  /// A Register; the uffd travels beside it, attached to the packet.
  public init(pid: Int32, features: UserfaultFD.Features, ioctls: UserfaultFD.Ioctls, regions: [RegionSpec], token: UInt128 = 0) {
    self.pid = pid
    self.features = features
    self.ioctls = ioctls
    self.regions = regions
    self.token = token
  }
}

extension UInt128 {
  /// A client token: 128 bits from the system's random source (never 0).
  public static func randomToken() -> UInt128 {
    var generator = SystemRandomNumberGenerator()
    return UInt128(generator.next() as UInt64) << 64 | UInt128(generator.next() as UInt64) | 1
  }

  init(high: UInt64, low: UInt64) { self = UInt128(high) << 64 | UInt128(low) }
  var high: UInt64 { UInt64(truncatingIfNeeded: self >> 64) }
  var low: UInt64 { UInt64(truncatingIfNeeded: self) }
}

/// A message from a client to the broker.
public struct ClientRequest: Equatable, Sendable {
  /// What the client asks.
  public enum Body: Equatable, Sendable {
    /// The connection's first message.
    case hello(Hello)
    /// The uffd (attached to the packet) and its regions; once per connection, after Hello.
    case register(RegisterRequest)
    /// More regions of the same uffd (registered with it first).
    case addRegions([RegionSpec])
    /// Regions to forget, by id (unregistered from the uffd first).
    case removeRegions([UInt64])
    /// Swap-out step 1: the broker write-protects the range (see the schema for the protocol).
    case swapOut(regionID: UInt64, offset: UInt64, length: Int)
    /// Swap-out step 2: bytes of a chunk of the range, for the region's plugin to keep.
    case swapOutData(regionID: UInt64, offset: UInt64, data: [UInt8])
    /// Swap-out step 3: the client dropped the pages that were not busy; unprotect the range.
    case swapOutDone(regionID: UInt64, offset: UInt64, length: Int)
  }
  /// Echoed in the reply.
  public var requestID: UInt64
  /// The request.
  public var body: Body

  /// Request `requestID` (chosen by the client) asking `body`.
  public init(requestID: UInt64, _ body: Body) {
    self.requestID = requestID
    self.body = body
  }
}

/// A message from the broker to a client.
public struct BrokerReply: Equatable, Sendable {
  /// What the broker answers or tells unasked.
  public enum Body: Equatable, Sendable {
    /// The answer to the client's Hello.
    case hello(Hello)
    /// Success. After a SwapOut, `busyOffsets` names the pages written meanwhile (keep them).
    case ack(clientID: UInt64, busyOffsets: [UInt64] = [])
    /// The request (or the connection, with request id 0) is refused; its code says why.
    case error(BrokerError)
    /// Unsolicited: where region `regionID` lies now, after an mremap or munmap.
    case layout(regionID: UInt64, pieces: [RegionPiece])
    /// Unsolicited: a forked child served as `childID` (its uffd attached), and where its regions lie.
    case forked(childID: UInt64, pieces: [RegionPiece])
    /// Unsolicited: the forked child `childID` is gone.
    case childClosed(childID: UInt64)
    /// Unsolicited: what the client dropped of region `regionID` so far, whole,
    /// and what no one can vouch for; kept to re-attach with (`RegionSpec.dropped`, `.unknown`).
    case dropped(regionID: UInt64, dropped: [Range<UInt64>], unknown: [Range<UInt64>])
  }
  /// The request it answers; 0 for what the broker sends unasked or when it refuses the connection.
  public var requestID: UInt64
  /// The answer.
  public var body: Body

  /// A reply to `requestID` (0: unasked).
  public init(requestID: UInt64, _ body: Body) {
    self.requestID = requestID
    self.body = body
  }
}

// MARK: - Broker → plugin events

/// A client thread faulted in a region the plugin serves.
public struct PagefaultEvent: Equatable, Sendable {
  /// The broker's id of the fault; the plugin's decision names it.
  public var faultID: UInt64
  /// The client that faulted.
  public var clientID: UInt64
  /// The region it faulted in (the client's id of it).
  public var regionID: UInt64
  /// Page aligned.
  public var address: UInt
  /// `address` minus the region's base.
  public var offset: UInt64
  /// Why the thread faulted (a write, say).
  public var flags: Pagefault.Flags
  /// The faulting thread (0 when not reported).
  public var threadID: Int32

  /// A fault event as the broker sends it.
  public init(faultID: UInt64, clientID: UInt64, regionID: UInt64, address: UInt, offset: UInt64, flags: Pagefault.Flags, threadID: Int32) {
    self.faultID = faultID
    self.clientID = clientID
    self.regionID = regionID
    self.address = address
    self.offset = offset
    self.flags = flags
    self.threadID = threadID
  }
}

/// Pages of a region were removed (MADV_DONTNEED) or unmapped (munmap).
public struct RangeEvent: Equatable, Sendable {
  /// The client whose pages they were.
  public var clientID: UInt64
  /// The region they belong to.
  public var regionID: UInt64
  /// The addresses, in the client, within the region.
  public var range: Range<UInt>
  /// `range.lowerBound` minus the region's base.
  public var startOffset: UInt64
  /// Removed by a swap-out: the plugin holds the pages' content (it stored them).
  public var swappedOut: Bool

  /// A remove or unmap of `range`, which starts at region offset `startOffset`.
  public init(clientID: UInt64, regionID: UInt64, range: Range<UInt>, startOffset: UInt64, swappedOut: Bool = false) {
    self.clientID = clientID
    self.regionID = regionID
    self.range = range
    self.startOffset = startOffset
    self.swappedOut = swappedOut
  }
}

/// mremap moved part or all of a region.
public struct RemapEvent: Equatable, Sendable {
  /// The client that moved it.
  public var clientID: UInt64
  /// The region moved.
  public var regionID: UInt64
  /// Where the moved part was.
  public var from: UInt
  /// Where it is now.
  public var to: UInt
  /// How many bytes moved.
  public var length: Int
  /// Where the region starts now.
  public var newBase: UInt

  /// A move of `length` bytes of the region from `from` to `to`.
  public init(clientID: UInt64, regionID: UInt64, from: UInt, to: UInt, length: Int, newBase: UInt) {
    self.clientID = clientID
    self.regionID = regionID
    self.from = from
    self.to = to
    self.length = length
    self.newBase = newBase
  }
}

/// An event the broker sends a plugin.
public enum BrokerEvent: Equatable, Sendable {
  /// A fault to decide; answer with a decision naming its `faultID`.
  case pagefault(PagefaultEvent)
  /// The client dropped pages (MADV_DONTNEED; or a swap-out, `swappedOut`).
  case removed(RangeEvent)
  /// The client unmapped part of the region.
  case unmapped(RangeEvent)
  /// The client moved part or all of the region (mremap).
  case remapped(RemapEvent)
  /// A client registered a region this plugin serves; answer with a region reply.
  /// `client`: its pid (0 for a forked child) and the uid and gid of its
  /// connection (SO_PEERCRED; a forked child has its parent's), or
  /// `PeerCredentials.unknown` ids when the broker did not send them.
  /// `forkedFrom` (non-zero): the client is a child forked from that client,
  /// and the region holds what the parent's held at the fork.
  case regionOpened(clientID: UInt64, client: PeerCredentials, region: RegionSpec, forkedFrom: UInt64 = 0, token: UInt128 = 0)
  /// The region is gone (removed by the client, or the client is gone): nothing more comes for it.
  case regionClosed(clientID: UInt64, regionID: UInt64)
  /// The client is gone; last for that client.
  case closed(clientID: UInt64, reason: String)
  /// Keep these bytes of the region (a swap-out); answer with a `StoreReply`.
  case store(StoreEvent)
  /// A decision (`faultID`) or delegation (`faultID` 0) this plugin sent was
  /// refused, not applied: `cause` is a `Refusal`'s name, `reason` says why for
  /// people. A refused decision's fault is delivered again.
  case decisionRefused(faultID: UInt64, cause: String, reason: String)
}

extension BrokerEvent {
  /// The client the event is about.
  public var clientID: UInt64 {
    switch self {
    case .pagefault(let fault): return fault.clientID
    case .removed(let range), .unmapped(let range): return range.clientID
    case .remapped(let remap): return remap.clientID
    case .regionOpened(let clientID, _, _, _, _), .regionClosed(let clientID, _), .closed(let clientID, _): return clientID
    case .store(let store): return store.clientID
    case .decisionRefused: return 0  // about the plugin, not a client
    }
  }
}

/// Bytes of a region for the plugin to keep (a swap-out chunk).
public struct StoreEvent: Equatable, Sendable {
  /// The broker's id of the store; the `StoreReply` names it.
  public var storeID: UInt64
  /// The client swapping out.
  public var clientID: UInt64
  /// The region the bytes belong to.
  public var regionID: UInt64
  /// The region offset of the first byte (page aligned).
  public var offset: UInt64
  /// The pages' content, a whole number of pages.
  public var data: [UInt8]

  /// A store of `data` at region offset `offset`.
  public init(storeID: UInt64, clientID: UInt64, regionID: UInt64, offset: UInt64, data: [UInt8]) {
    self.storeID = storeID
    self.clientID = clientID
    self.regionID = regionID
    self.offset = offset
    self.data = data
  }
}

/// Bounds of a plugin's descriptor store in the broker (`DescriptorStore` in the proto).
public enum DescriptorStoreLimits {
  /// Descriptors kept per plugin name: all of them ride on the broker's Hello
  /// packet, which carries at most 8 (`CLINUX_MAX_FDS`; a ninth once made the
  /// Hello unsendable and the reconnecting plugin was dropped).
  public static let descriptors = 8
  /// Bytes of one descriptor's name.
  public static let nameBytes = 64
}

/// A range of a region the plugin hands to the broker to serve by itself (the
/// broker-local fast path), or takes back (`revoke`).
public struct Delegation: Equatable, Sendable {
  /// Where the broker takes the delegated pages' content from.
  public enum Source: Equatable, Sendable {
    /// Zero pages.
    case zero
    /// Bytes of a regular file or memfd, from `offset` in it. The file
    /// travels as a descriptor attached to the packet, beside the message
    /// (`DecisionBatchEncoder.append(_:file:)`, `ReceivedDelegation.fileIndex`).
    case file(offset: UInt64)
  }
  /// The client whose region it is.
  public var clientID: UInt64
  /// The region.
  public var regionID: UInt64
  /// The region offsets delegated (page aligned, inside the region).
  public var offsets: Range<UInt64>
  /// Zeros, or a file's bytes.
  public var source: Source
  /// Pages of an aligned block filled per fault (1: just the faulting page).
  public var prefetchPages: Int
  /// Takes `offsets` back: their faults come to the plugin again.
  public var revoke: Bool
  /// Fill all of `offsets` in the background too (after `streamFirst`).
  public var stream: Bool
  /// Region offsets whose blocks the broker fills first in the background, in order (a working set).
  public var streamFirst: [UInt64]

  /// A delegation (or, with `revoke`, its withdrawal) of `offsets` of a region.
  public init(clientID: UInt64, regionID: UInt64, offsets: Range<UInt64>, source: Source, prefetchPages: Int = 1, revoke: Bool = false,
              stream: Bool = false, streamFirst: [UInt64] = []) {
    self.clientID = clientID
    self.regionID = regionID
    self.offsets = offsets
    self.source = source
    self.prefetchPages = prefetchPages
    self.revoke = revoke
    self.stream = stream
    self.streamFirst = streamFirst
  }
}

/// A delegation as the broker received it: its file (a file delegation's) is
/// the packet's attached descriptor at `fileIndex`, the receiver's to take.
public struct ReceivedDelegation: Equatable, Sendable {
  /// The delegation as sent.
  public var delegation: Delegation
  /// The index of its file among the packet's descriptors; nil for zeros or a revoke.
  public var fileIndex: Int?

  /// A received `delegation` whose file is the packet's descriptor at `fileIndex`.
  public init(_ delegation: Delegation, fileIndex: Int?) {
    self.delegation = delegation
    self.fileIndex = fileIndex
  }
}

/// A plugin's answer to a `StoreEvent`.
public struct StoreReply: Equatable, Sendable {
  /// The `StoreEvent` it answers.
  public var storeID: UInt64
  /// nil: stored.
  public var error: BrokerError?

  /// The answer to store `storeID`: nil `error` for stored.
  public init(storeID: UInt64, error: BrokerError?) {
    self.storeID = storeID
    self.error = error
  }
}

// MARK: - Plugin → broker decisions

/// What a plugin wants done for a fault.
public enum DecisionKind: Int32, Sendable {
  /// Fill the range with the decision's bytes.
  case copy = 1
  /// Fill the range with zero pages.
  case zero = 2
  /// Not ready: deliver the fault again later.
  case retry = 3
  /// The content is lost: accesses to the range get SIGBUS (fail closed).
  case poison = 4
}

/// A plugin's answer to a region it was asked to serve.
public struct RegionReply: Equatable, Sendable {
  /// The client of the region opened.
  public var clientID: UInt64
  /// The region.
  public var regionID: UInt64
  /// nil: accepted.
  public var error: BrokerError?
  /// Of the region's `swappedOut` extents, those the plugin no longer holds.
  public var lost: [Range<UInt64>]

  /// The answer to a `regionOpened`: nil `error` for accepted.
  public init(clientID: UInt64, regionID: UInt64, error: BrokerError?, lost: [Range<UInt64>] = []) {
    self.clientID = clientID
    self.regionID = regionID
    self.error = error
    self.lost = lost
  }
}
