import BrokerProtocol
import Glibc
import Userfaultfd

/// A region of a client's memory that this plugin serves. Made by the
/// `PluginRunner` and used on its thread only.
public final class PluginRegion {
  /// The broker's id of the client (a forked child has its own); it changes
  /// when the client re-attaches to a restarted broker (`clientToken` does not).
  public let clientID: UInt64
  /// Who the client is: its pid (0 for a forked child) and the uid and gid
  /// its connection had (SO_PEERCRED, as the broker saw them; a forked child
  /// has its parent's). The plugin acts for this client: anything it serves
  /// from a file the client named must be something the client could read
  /// itself (`ClientFiles`, `PeerCredentials.checkMayRead`). Unknown
  /// (`isKnown` false) from a broker too old to send them.
  public let client: PeerCredentials
  /// The client process (for logs; the broker has checked it with SO_PEERCRED).
  public var pid: Int32 { client.pid }
  /// The client's identity across broker restarts (its client id changes, this
  /// does not): the key for data a plugin keeps beyond the broker's life.
  /// Secret to the client, the broker and its plugins.
  public let clientToken: UInt128
  /// As the client registered it: id, base, length, page size, argument, backing offset.
  public let spec: RegionSpec
  /// Where region offset 0 is now (differs from `spec.base` after an mremap).
  public internal(set) var base: UInt
  /// Whatever the plugin wants to keep per region (an open file, a store...).
  public var context: AnyObject?
  /// Delegations to send with the next batch.
  /// With the duplicate of a file delegation's file (closed once sent).
  var pendingDelegations: [(delegation: Delegation, file: CInt?)] = []

  /// Hands `offsets` (default: the whole region) to the broker to serve with
  /// zero pages by itself: no round trip per fault. You are still told of
  /// removes, unmaps and remaps; a removed or unmapped part comes back to you.
  ///
  /// Delegations are sent with the plugin's next packet; call these from a
  /// `PagePlugin` method, on the runner's thread. Offsets must be page aligned
  /// and inside the region, or the broker refuses the delegation (and counts it).
  public func delegateZeroPages(_ offsets: Range<UInt64>? = nil) {
    pendingDelegations.append((Delegation(clientID: clientID, regionID: spec.id, offsets: offsets ?? 0..<UInt64(length), source: .zero), nil))
  }

  /// Hands `offsets` (default: the whole region) to the broker to serve from
  /// `fd` (a regular file or memfd; the broker gets its own duplicate) with
  /// region offset `offsets.lowerBound` at `fileOffset`. Past the end of the
  /// file pages read as zeros. `prefetchPages` (≤ 32) fills an aligned block per fault.
  /// `stream`: the broker also fills the range in the background while the
  /// client runs, the blocks around `streamFirst` (region offsets, in order) first.
  /// `fd` stays the caller's; if it cannot be duplicated (EMFILE), nothing is delegated.
  public func delegate(_ offsets: Range<UInt64>? = nil, file fd: CInt, fileOffset: UInt64, prefetchPages: Int = 1,
                       stream: Bool = false, streamFirst: [UInt64] = []) {
    let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
    guard copy >= 0 else { return }
    pendingDelegations.append((Delegation(clientID: clientID, regionID: spec.id, offsets: offsets ?? 0..<UInt64(length),
                                          source: .file(offset: fileOffset), prefetchPages: prefetchPages, stream: stream, streamFirst: streamFirst), copy))
  }

  /// Takes back a delegated range: its faults come to the plugin again.
  public func revokeDelegation(_ offsets: Range<UInt64>? = nil) {
    pendingDelegations.append((Delegation(clientID: clientID, regionID: spec.id, offsets: offsets ?? 0..<UInt64(length), source: .zero, revoke: true), nil))
  }

  init(clientID: UInt64, client: PeerCredentials, spec: RegionSpec, clientToken: UInt128) {
    self.clientID = clientID
    self.client = client
    self.clientToken = clientToken
    self.spec = spec
    self.base = spec.base
  }

  /// The region's page size (`spec.pageSize`).
  public var pageSize: Int { spec.pageSize }
  /// The region's length in bytes (`spec.length`); offsets run from 0 to it.
  public var length: Int { spec.length }
}

/// A page fault to decide.
public struct PluginFault: Sendable {
  /// The broker's id of the fault (its decision names it).
  public var faultID: UInt64
  /// Aligned to the region's page (`PluginRegion.pageSize`: a huge page's start
  /// in a huge-page region), in the client's address space.
  public var address: UInt
  /// Offset of the faulting page in the region (stable across mremap).
  public var offset: UInt64
  /// Why the thread faulted (`.write` for a write access).
  public var flags: Pagefault.Flags
  /// The faulting thread's id in the client (0 when the kernel did not report it).
  public var threadID: Int32
  /// Whether the access was a write.
  public var isWrite: Bool { flags.contains(.write) }
}

/// A plugin's answer to a fault.
public enum PluginDecision: Equatable, Sendable {
  /// Fill the faulting page with the first `pageSize` bytes of the buffer.
  case copy
  /// Fill `length` bytes of the region from `offset` (page aligned, containing
  /// the faulting page) with the first `length` bytes of the buffer: prefetch.
  /// `length` must not exceed the buffer (the runner traps).
  case copyRange(offset: UInt64, length: Int)
  /// Map a zero page at the faulting page.
  case zero
  /// Zero pages over a range of the region (containing the faulting page).
  case zeroRange(offset: UInt64, length: Int)
  /// Not ready: the broker delivers the fault again later.
  case retry
  /// The page's content is lost (say a corrupt store): the faulting access
  /// gets SIGBUS rather than wrong bytes (UFFDIO_POISON, fail closed).
  case poison
  /// Pending: the plugin answers this fault later, from any thread, with
  /// `FaultAnswers.answer(_:_:bytes:)` (the handle `connected(_:answers:)`
  /// gave it) and its own bytes: `buffer` is not kept for it. Until then the
  /// faulting thread waits; the answer must come within the broker's deadline.
  case later
}

/// The handler a plugin implements; `PluginRunner` calls it.
///
/// Contract: every method is called on the thread that runs the runner
/// (`PluginRunner.run`, or `PluginRunner.init` then `serve()`), one at a
/// time, in the order the broker sent the events. For each client,
/// remove/unmap/remap events come before any fault the broker read after
/// them; a fault whose decision was made before such an event is sent again,
/// so answer from the state you have now. `clientClosed` is the last call for
/// a client.
///
/// Calls should return promptly: the runner sends a batch's decisions when
/// every event of it is handled, and a plugin that answers neither a fault
/// nor a `regionOpened` within the broker's deadline is dropped. A fault
/// that needs slow work is answered `.later` and then from any thread
/// (`FaultAnswers`); the other calls stay on the runner's thread. The broker
/// checks every decision against the client's live region and refuses a bad
/// one (misaligned, outside the region, missing the faulting page, the wrong
/// length); a plugin that keeps sending them is disconnected. Every method
/// but `pagefault` has a default that does nothing or refuses.
public protocol PagePlugin: AnyObject {
  /// The plugin is connected; `store` holds what the broker kept for this
  /// plugin's name from its earlier connections. Called once, before any event.
  func connected(_ store: DescriptorStore)
  /// The same, with `answers`: the handle with which any thread answers the
  /// faults this plugin defers (`PluginDecision.later`) on this connection.
  /// Keep it to answer later; it drops answers once the connection ends. The
  /// default calls `connected(_:)`: implement one form, not both.
  func connected(_ store: DescriptorStore, answers: FaultAnswers)
  /// A client registered `region` with this plugin. Throw a `BrokerError` (or
  /// any error) to refuse it: the client's Register fails with its message.
  /// Called again for each live region after the plugin reconnects.
  func regionOpened(_ region: PluginRegion) throws

  /// Decide a fault. To copy, write the bytes into `buffer` (page aligned, at
  /// least one of the region's pages; `buffer.count` bounds a prefetch) and
  /// return `.copy` or `.copyRange`. In a huge-page region every range is whole
  /// huge pages (the broker refuses less). `buffer` is valid during this call
  /// only. To answer later (the bytes must be read first, say), return `.later`
  /// and answer with `FaultAnswers` (see `connected(_:answers:)`).
  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision

  /// The client dropped the pages at `offsets` (MADV_DONTNEED): they now read as zeros.
  func removed(_ offsets: Range<UInt64>, in region: PluginRegion)
  /// Keep `data`, the content of the region from `offset` (a swap-out chunk).
  /// Until the region closes, a fault on these pages must be answered with them.
  /// Throw to refuse (the client's swap-out fails and its pages stay resident).
  func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, in region: PluginRegion) throws
  /// A swap-out dropped the pages at `offsets` from the client; their content is
  /// what `store` received.
  func swappedOut(_ offsets: Range<UInt64>, in region: PluginRegion)
  /// Whether this plugin still holds every stored page of `offsets`: asked when
  /// a region is opened again (this plugin restarted, or the client re-attached
  /// to a restarted broker) for the pages the client released in swap-outs.
  /// Those it does not hold fail closed (SIGBUS) in the client instead of
  /// reading zeros. The default says no: keep data in the broker's descriptor
  /// store (`connected(_:)`) to survive a restart.
  func holds(_ offsets: Range<UInt64>, in region: PluginRegion) -> Bool
  /// The client unmapped `offsets` of the region.
  func unmapped(_ offsets: Range<UInt64>, in region: PluginRegion)
  /// The client moved part of the region; `region.base` is updated already.
  func remapped(_ region: PluginRegion)
  /// A client forked: `child` is the child's copy of `parent` (same spec, its
  /// own client id; not yet given to `regionOpened`). Its faults must be
  /// answered with what the parent's would have been at this moment: set
  /// `child.context` to a copy of the parent's state (the same file, the same
  /// dropped pages, a copy-on-write view of stored pages). Throw to refuse: the
  /// child's faults in this region then fail closed (SIGBUS), never zeros. The
  /// default refuses, so a plugin that keeps per-client data never serves a
  /// child by accident.
  func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws
  /// The region was removed by the client or the client is gone.
  func regionClosed(_ region: PluginRegion)
  /// The client is gone; nothing more comes for it.
  func clientClosed(_ clientID: UInt64, reason: String)
  /// The broker refused a decision of this plugin (`faultID`) or a delegation
  /// (`faultID` 0), and applied nothing: `cause` names the rule (`badRange`,
  /// `wrongLength`...), `reason` says why. The default writes one line to
  /// stderr: a refusal is a bug in the plugin.
  func decisionRefused(faultID: UInt64, cause: String, reason: String)
  /// Counters of the plugin's own, written to the stats file beside the runner's.
  var statistics: [(name: String, value: Int)] { get }
}

extension PagePlugin {
  public func connected(_ store: DescriptorStore) {}
  public func connected(_ store: DescriptorStore, answers: FaultAnswers) { connected(store) }
  public func regionOpened(_ region: PluginRegion) throws {}
  public func removed(_ offsets: Range<UInt64>, in region: PluginRegion) {}
  public func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, in region: PluginRegion) throws {
    throw BrokerError(.pluginRefused, "this plugin does not keep swapped-out pages")
  }
  public func swappedOut(_ offsets: Range<UInt64>, in region: PluginRegion) {}
  public func holds(_ offsets: Range<UInt64>, in region: PluginRegion) -> Bool { false }
  public func unmapped(_ offsets: Range<UInt64>, in region: PluginRegion) {}
  public func remapped(_ region: PluginRegion) {}
  public func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws {
    throw BrokerError(.pluginRefused, "this plugin does not serve forked children")
  }
  public func regionClosed(_ region: PluginRegion) {}
  public func clientClosed(_ clientID: UInt64, reason: String) {}
  public func decisionRefused(faultID: UInt64, cause: String, reason: String) {
    var line = "uffd-broker refused \(faultID == 0 ? "a delegation" : "the decision for fault \(faultID)") (\(cause)): \(reason)\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
  }
  public var statistics: [(name: String, value: Int)] { [] }
}
