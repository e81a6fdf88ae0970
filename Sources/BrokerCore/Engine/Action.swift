import BrokerProtocol
import Logging
import Userfaultfd

/// A client of the broker: a process that connected, or a forked child it adopted.
public typealias ClientID = UInt64
/// One connection of a plugin process.
public typealias PluginID = UInt64

/// A file a plugin delegated, held open by the runtime; the engine names it only.
public struct FileHandle: Hashable, Sendable {
  public let rawValue: UInt64
  public init(_ rawValue: UInt64) { self.rawValue = rawValue }
}

/// A forked child's userfaultfd, held by the runtime until the engine names its client.
public struct ForkTicket: Hashable, Sendable {
  public let rawValue: UInt64
  public init(_ rawValue: UInt64) { self.rawValue = rawValue }
}

/// One event read from a client's userfaultfd, as the engine sees it.
public enum KernelEvent: Sendable {
  case pagefault(Pagefault)
  case remove(Range<UInt>)
  case unmap(Range<UInt>)
  case remap(from: UInt, to: UInt, length: Int)
  /// The client forked; the child's uffd waits in the runtime under `ticket`.
  /// `wipedOnFork`: the parent's `MADV_WIPEONFORK` mappings at the time.
  case fork(ForkTicket, wipedOnFork: [Range<UInt>])
}

/// A fill of a client's memory: `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` or
/// `UFFDIO_POISON` over `range`; for shared memory (`pageCache`), the bytes
/// added to the file's page cache, then `UFFDIO_CONTINUE`. The runtime performs it and hands the outcome
/// back with `BrokerEngine.filled(_:outcome:)`; the rest of the order is the
/// engine's own continuation (which fault it settles, and why).
///
/// Not `Sendable`: its bytes are valid only while the input that made it is handled, on the engine's thread.
public struct FillOrder {
  public enum Source {
    /// Nothing to read: zero and poison.
    case none
    /// Bytes of the plugin packet being handled.
    case bytes(UnsafeRawBufferPointer)
    /// Bytes at `offset` of the plugin's shared area (bounds checked by the engine).
    case sharedArea(PluginID, offset: UInt64)
    /// Bytes at `offset` of a delegated file; past its end they read as zeros.
    case file(FileHandle, offset: UInt64)
    /// Zeros, copied page by page (a zero page that must be writable or write-protected).
    case zeros
    /// Nothing to write: the page is in the shared-memory file's cache already
    /// (a minor fault), and only needs mapping (`UFFDIO_CONTINUE`).
    case pageCache
  }

  /// Where a fill of shared memory goes first: the client's shared-memory
  /// file, at `offset` (the file offset of `range.lowerBound`). The runtime
  /// adds the source's bytes to the file's page cache (keeping any page it
  /// has already), then maps the range with `UFFDIO_CONTINUE`.
  public struct PageCache: Sendable, Equatable {
    /// The client's shared-memory file, as the runtime holds it.
    public var file: FileHandle
    /// The file offset of the fill's first byte.
    public var offset: UInt64
  }

  /// Why the engine fills: what the outcome means for the fault.
  public enum Purpose: Sendable, Equatable {
    /// A plugin's decision.
    case decision(PluginID)
    /// A delegated range, served by the broker itself.
    case delegated
    /// A block of a delegated range filled in the background (no fault waits
    /// for it; `fault` names none): region `regionID` from region offset `offset`.
    case stream(regionID: UInt64, offset: UInt64)
    /// New memory (a grown tail, a `DONTUNMAP` source): zeros.
    case newMemory
    /// A fault the broker cannot serve, failed closed (SIGBUS at the access).
    case failClosed(String)
    /// A fault of a plugin that failed for good, poisoned as its policy says.
    case pluginFailed
    /// A minor fault of shared memory: its page is in the file's cache already.
    case minor
  }

  public var client: ClientID
  /// `.copy`, `.zero` or `.poison`.
  public var kind: DecisionKind
  public var range: Range<UInt>
  public var source: Source
  /// Write-protect what is filled (a swap-out covers part of it).
  public var writeProtect: Bool
  /// Shared memory: the file whose page cache is filled, then mapped (nil: anonymous memory, filled directly).
  public var pageCache: PageCache?
  /// The ledger id of the fault this fill answers.
  var fault: FaultLedger.ID
  /// The faulting page, inside `range`.
  public internal(set) var page: UInt
  /// The page size of the region filled: `range` is whole pages of it.
  public internal(set) var pageSize: Int
  public internal(set) var purpose: Purpose

  /// The same fill of the faulting page alone: a range fill that stopped short
  /// (EEXIST at a neighbour, a partial copy) says nothing of the faulting page.
  func alone() -> FillOrder {
    var order = self
    let skip = page - range.lowerBound
    order.range = page..<page + UInt(pageSize)
    order.pageCache?.offset += UInt64(skip)
    switch source {
    case .none, .zeros, .pageCache: break
    case .bytes(let bytes): order.source = .bytes(UnsafeRawBufferPointer(rebasing: bytes[Int(skip)..<Int(skip) + pageSize]))
    case .sharedArea(let plugin, let offset): order.source = .sharedArea(plugin, offset: offset + UInt64(skip))
    case .file(let file, let offset): order.source = .file(file, offset: offset + UInt64(skip))
    }
    return order
  }
}

/// What the engine asks of the runtime. The runtime performs the actions in
/// order, right after the input that produced them; those that have an outcome
/// the engine needs (a fill, a write-protect, an inspection) are answered by an
/// input of their own before the next action is taken.
public enum Action {
  // MARK: Clients
  /// Send on the client's socket; a failure is `clientGone`.
  case reply(ClientID, BrokerReply)
  /// Send the client something it keeps (a layout, a drop record); a full socket is `noticeNotSent`.
  case notify(ClientID, BrokerReply)
  /// Send `keeper` the fork notice with a copy of `child`'s uffd attached (best effort).
  case keepChild(keeper: ClientID, child: ClientID, notice: BrokerReply)
  /// The Register's descriptor (a userfaultfd) becomes the client's.
  case adoptUffd(ClientID)
  /// The uffd held under `ticket` becomes the forked child's.
  case adoptChild(ForkTicket, child: ClientID)
  /// Let go of a fork's uffd no client took.
  case dropChild(ForkTicket)
  /// Poison what the fork's child never had filled in `ranges`, then let its uffd go.
  case failChild(ForkTicket, [Range<UInt>])
  /// Start reading the client's uffd and watching the process that connected (its pidfd); a failure is `watchFailed`.
  case watch(ClientID)
  /// Start reading a forked child's uffd (it has no pidfd); a failure is `watchFailed`.
  case watchChild(ClientID)
  /// Forget the client: stop watching, close its socket, uffd and pidfd.
  case close(ClientID)
  /// SIGKILL through the client's pidfd (never a recycled pid).
  case kill(ClientID)

  // MARK: The client's memory
  /// Answered by `filled(_:outcome:)`.
  case fill(FillOrder)
  case wake(ClientID, Range<UInt>)
  /// Write-protect or unprotect; the protection a swap-out begins with is answered by `swapOutProtected`.
  case writeProtect(ClientID, Range<UInt>, protect: Bool, swapOut: SwapOutStart?)
  /// Poison every page of `range` not filled yet (a child that can no longer be served).
  case poisonMissing(ClientID, Range<UInt>)
  /// Read which mapping of process `pid` holds `page`; answered by `inspected`.
  case inspect(ClientID, pid: Int32, page: UInt)
  /// Whether a forked child (no pidfd) still lives; answered by `probed` when it is gone.
  case probe(ClientID)

  // MARK: Plugins
  /// Queue the event for the plugin (sent in batches); a failure is `pluginGone`.
  case send(PluginID, BrokerEvent)
  /// The plugin's Hello was accepted as `name`: answer Hello, with the descriptors kept for that name.
  case welcome(PluginID, name: String)
  /// Disconnect the plugin, telling it `error` first if there is one.
  case closePlugin(PluginID, tell: BrokerError?)
  /// Kill the spawned plugin process `pid` (it stopped answering).
  case killPluginProcess(pid: Int32, reason: String)
  /// The engine no longer needs a delegated file, or a shared-memory file.
  case releaseFile(FileHandle)
  /// A plugin name no one needs any more is forgotten: what the runtime keeps for it goes too.
  case forgetPlugin(name: String)

  // MARK: Observability
  case log(Logger.Level, Logger.Message, Logger.Metadata)
}
