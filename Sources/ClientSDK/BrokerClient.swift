import BrokerProtocol
import Glibc
import LinuxSupport
import SystemPackage
import Userfaultfd

/// An error of the client SDK, with the broker's own error when it refused us.
public struct ClientError: Error, CustomStringConvertible, Sendable {
  /// What the client could not do.
  public var message: String
  /// The broker's refusal (its code says why: `notAuthorized`, `unknownPlugin`,
  /// `badRegion`, `timedOut`...), or the transport's error; nil when neither was involved.
  public var broker: BrokerError?
  /// The errno of the system call that failed, when one did.
  public var errno: Errno?

  /// An error saying `message`, caused by `broker`'s error or a system call's `errno`.
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
/// A monitor thread then re-attaches to the broker when it is back (same uffd,
/// same regions; the broker wakes the blocked threads so their faults come
/// again). If no broker comes back within the policy's time, the client fails
/// closed as the policy says (see `BrokerLossPolicy`), never onto zeros.
/// Keep the client alive as long as the memory is in use; release the memory
/// (munmap) before the client.
///
/// Any thread may call its methods: requests to the broker go one at a time
/// over the one connection, each blocking its caller until the reply (at most
/// `timeoutMilliseconds` each). They throw `ClientError`, with the broker's
/// refusal in `broker`. A forked child must not use its parent's client: its
/// requests throw.
public final class BrokerClient: Sendable {
  /// The userfaultfd this client created for its regions. The client owns it
  /// (the broker has its own copy); do not release or close it.
  public let uffd: UserfaultFD
  private let connection: Connection
  private let monitor: Monitor

  /// The id the broker gave this client (in its logs and plugin events); it changes on re-attach.
  public var clientID: UInt64 { connection.withLock { $0.clientID } }

  /// How many times this client has attached to a broker: 1 after `init`, one
  /// more after each re-attach to a restarted broker.
  public var attachments: Int { connection.withLock { $0.attachments } }

  /// Waits until the client has attached more than `count` times (see
  /// `attachments`): after a broker restart, until it is served again.
  /// Returns false if `timeoutMilliseconds` passed first.
  public func waitForAttachment(beyond count: Int, timeoutMilliseconds: Int) -> Bool {
    connection.waitForAttachment(beyond: count, milliseconds: timeoutMilliseconds)
  }

  /// The features the broker needs to keep memory exact while the client changes its mappings.
  public static let features: UserfaultFD.Features = [.eventRemove, .eventUnmap, .eventRemap, .threadID]

  /// Whether a child forked from this process gets its own brokered copy of
  /// the regions. With `UFFD_FEATURE_EVENT_FORK` (which the kernel grants only
  /// with CAP_SYS_PTRACE) the broker adopts the child's userfaultfd and the
  /// child's pages read what the parent's held at the fork. Without it the
  /// regions are marked `MADV_DONTFORK`: a child has no mapping there and its
  /// access faults with SIGSEGV, rather than reading zeros.
  public let servesForkedChildren: Bool
  /// The process that created this client: a forked child must not use it.
  private let owner = getpid()

  /// Registers `regions` with the broker at `socketPath` (nil: `SocketPaths.client`).
  /// Throws if no userfaultfd can be created or a region's range cannot be
  /// registered with it, if the broker is unreachable, refuses (unknown
  /// plugin, bad region, not authorized...), or does not answer within
  /// `timeoutMilliseconds`. The regions must be mapped in this process (an
  /// `AnonymousMemory`, say), page aligned, with ids unique to this client.
  /// Unless `policy` is `.none`, a monitor thread is started; `deinit` stops it.
  ///
  /// The userfaultfd goes only to a broker run by root, by this process's
  /// uid, or by `brokerUID` (nil: `UFFD_BROKER_UID`, if set): anything else
  /// listening at the path is refused before a byte is sent (`ClientError.broker`
  /// is then `notAuthorized`), and so on every re-attach.
  ///
  /// `userModeOnly`: a userfaultfd for faults from user mode only, which any
  /// process may create (`UFFD_USER_MODE_ONLY`), where the full kind needs root,
  /// CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd=1` or access to
  /// `/dev/userfaultfd`. A system call that reads or writes a region's missing
  /// page (`read(2)` into it, say) then fails with EFAULT instead of waiting
  /// for the page: touch the pages first, or copy through user-space buffers.
  ///
  /// `sharedMemory`: the file (a memfd or tmpfs file, opened read-write) that
  /// the regions of `.sharedMemory` backing map (a `SharedMemory`, say). They
  /// are registered for missing and minor faults; the broker fills the file's
  /// page cache and maps it, so the processes mapping the same file share the
  /// pages filled once. The client keeps a duplicate and sends it with every Register.
  public init(
    regions: [RegionSpec], sharedMemory: FileDescriptor? = nil, socketPath: String? = nil, brokerUID: UInt32? = nil, name: String = "client", userModeOnly: Bool = false,
    timeoutMilliseconds: Int = 10_000, onBrokerLoss policy: BrokerLossPolicy = .reattach(withinMilliseconds: 30_000, otherwise: .terminate)
  ) throws(ClientError) {
    let path: String
    do throws(BrokerError) {
      path = if let socketPath { socketPath } else { try SocketPaths.client }
    } catch {
      throw ClientError("no broker socket to register with", broker: error)
    }
    // Fork events need CAP_SYS_PTRACE: without it, regions are not inherited (see servesForkedChildren).
    let options = UserfaultFD.Options(userModeOnly: userModeOnly)
    // Huge-page regions need hugetlbfs support, which `register` checks for (only) them.
    do {
      uffd = try UserfaultFD.create(features: Self.features.union([.eventFork, .missingHugetlbfs, .minorShmem]), required: Self.features.union(.eventFork), options: options)
      servesForkedChildren = true
    } catch {
      do {
        uffd = try UserfaultFD.create(features: Self.features.union([.missingHugetlbfs, .minorShmem]), required: Self.features, options: options)
      } catch {
        throw ClientError("cannot create a userfaultfd: \(error)")
      }
      servesForkedChildren = false
    }
    try Self.register(regions, with: uffd, dontFork: !servesForkedChildren)
    var file: CInt?
    if let sharedMemory {
      file = fcntl(sharedMemory.rawValue, F_DUPFD_CLOEXEC, 0)
      guard let fd = file, fd >= 0 else { throw ClientError("cannot duplicate the shared-memory file", errno: errno) }
    }
    connection = Connection(uffd: uffd, sharedMemory: file, regions: regions, socketPath: path, brokerUID: brokerUID, name: name, timeoutMilliseconds: timeoutMilliseconds)
    try connection.withLock { (state) throws(ClientError) in try state.attach() }
    monitor = Monitor(connection: connection, policy: policy)
  }

  deinit {
    // In a forked child, this object and its monitor thread are the parent's.
    if getpid() == owner { monitor.stop() }
  }

  /// Adds regions (registering their ranges with this client's uffd first).
  /// If the broker refuses them, their ranges are unregistered again: plain
  /// memory, never a range whose faults nobody serves. Throws the broker's
  /// refusal, or the registration's failure.
  public func addRegions(_ regions: [RegionSpec]) throws(ClientError) {
    // A range that overlaps a region already served is left alone (the broker
    // refuses it): unregistering it on refusal would take the served one's pages.
    let current = connection.withLock { $0.regions }
    let fresh = regions.filter { region in !current.contains { $0.range.overlaps(region.range) } }
    try Self.register(fresh, with: uffd, dontFork: !servesForkedChildren)
    do {
      _ = try request(.addRegions(regions))
    } catch {
      unregister(fresh)
      throw error
    }
    connection.withLock { $0.regions += regions }
  }

  /// Unregisters the regions' ranges, then removes them from the broker (their
  /// pages stay as they are; the unfilled ones read as zeros from then on). In
  /// that order, no fault on them reaches the broker after it forgot them.
  /// Throws if the broker refuses (an id it does not know); the ranges are
  /// unregistered all the same.
  public func removeRegions(_ regions: [RegionSpec]) throws(ClientError) {
    let ids = Set(regions.map(\.id))
    // Where they lie now: an mremap may have moved them.
    unregister(connection.withLock { state in state.currentRegions.filter { ids.contains($0.id) } })
    _ = try request(.removeRegions(regions.map(\.id)))
    connection.withLock { state in
      state.regions.removeAll { ids.contains($0.id) }
      for id in ids {
        state.layouts[id] = nil
        state.dropRecords[id] = nil
      }
    }
  }

  private func unregister(_ regions: [RegionSpec]) {
    for region in regions {
      for range in region.pieces.isEmpty ? [region.range] : region.pieces.map(\.range) {
        try? uffd.unregister(address: range.lowerBound, length: range.count)
      }
    }
  }

  private func request(_ body: ClientRequest.Body) throws(ClientError) -> BrokerReply.Body {
    guard getpid() == owner else { throw ClientError("this BrokerClient belongs to the parent process; a forked child cannot use its connection") }
    return try connection.withLock { (state) throws(ClientError) in try state.request(body) }
  }

  /// Missing faults go to the broker; write-protect mode lets it swap pages out
  /// without losing a concurrent write. Where the kernel cannot write-protect
  /// this memory, the region is registered for missing faults only (and a
  /// swap-out of it is refused by the broker).
  private static func register(_ regions: [RegionSpec], with uffd: UserfaultFD, dontFork: Bool) throws(ClientError) {
    for region in regions where region.pageSize != systemPageSize {
      guard kernelHugePageSizes().contains(region.pageSize) else {
        throw ClientError("region \(region.id): page size \(region.pageSize) is neither the system's (\(systemPageSize)) nor a huge page size of this kernel")
      }
      guard uffd.features.contains(.missingHugetlbfs) else {
        throw ClientError("region \(region.id) has huge pages, but this kernel's userfaultfd cannot serve hugetlbfs (UFFD_FEATURE_MISSING_HUGETLBFS)")
      }
    }
    for region in regions {
      if dontFork { madvise(UnsafeMutableRawPointer(bitPattern: region.base), region.length, MADV_DONTFORK) }
      // Shared memory: a page the file's cache lacks is a missing fault (minor alone would read zeros).
      if region.isSharedMemory {
        guard uffd.features.contains(.minorShmem) else {
          throw ClientError("region \(region.id) is shared memory, but this kernel's userfaultfd has no minor faults of shmem (UFFD_FEATURE_MINOR_SHMEM)")
        }
        do {
          try uffd.register(address: region.base, length: region.length, mode: [.missing, .minor])
        } catch {
          throw ClientError("cannot register region \(region.id) (shared memory): \(error)")
        }
        continue
      }
      // Huge pages: missing mode only (swap-out, which write-protects, serves small pages only).
      guard region.pageSize == systemPageSize else {
        do {
          try uffd.register(address: region.base, length: region.length, mode: .missing)
        } catch {
          throw ClientError("cannot register region \(region.id) (\(region.pageSize)-byte pages): \(error)")
        }
        continue
      }
      do {
        try uffd.register(address: region.base, length: region.length, mode: [.missing, .writeProtect])
      } catch where error.code == .invalidRange {
        do {
          try uffd.register(address: region.base, length: region.length, mode: .missing)
        } catch {
          throw ClientError("cannot register region \(region.id): \(error)")
        }
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
  ///
  /// Blocks the caller for the whole swap-out (one request per 128 KiB). Throws
  /// for a range that is not a page-aligned part of the region, one an mremap
  /// split, or a refusal: a plugin that does not store pages, memory the
  /// kernel could not write-protect. Pages dropped before a failure stay dropped
  /// (their plugin holds them); the swap-out is ended (the range unprotected) either way.
  public func swapOut(_ region: RegionSpec, offset: Int = 0, length: Int? = nil) throws(ClientError) -> SwapOutReport {
    let length = length ?? region.length - offset
    let pageSize = systemPageSize
    guard offset >= 0, length > 0, offset % pageSize == 0, length % pageSize == 0, offset + length <= region.length else {
      throw ClientError("swap-out of \(length) bytes at offset \(offset) is not a page-aligned part of region \(region.id)")
    }
    _ = try request(.swapOut(regionID: region.id, offset: UInt64(offset), length: length))
    // Where those offsets lie now (an mremap may have moved them; the broker's
    // layout notices were read with its reply). The broker checked they are live.
    guard let base = connection.withLock({ $0.address(ofRegion: region, offset: offset, length: length) }) else {
      _ = try? request(.swapOutDone(regionID: region.id, offset: UInt64(offset), length: length))
      throw ClientError("offsets \(offset) + \(length) of region \(region.id) do not lie in one piece of it (an mremap moved or cut it): swap out each piece")
    }
    var report = SwapOutReport(pagesDropped: 0, pagesKept: 0)
    var failure: ClientError?
    // Remembered for a re-attach: a restarted broker asks the plugin whether it
    // still holds them, and what it lost fails closed instead of reading zeros.
    var dropped = OffsetRanges()
    defer {
      connection.withLock { state in
        guard let index = state.regions.firstIndex(where: { $0.id == region.id }) else { return }
        var record = OffsetRanges(state.regions[index].swappedOut)
        for range in dropped.ranges { record.insert(range) }
        state.regions[index].swappedOut = record.coarsened(to: RegionSpec.maxExtents)
      }
    }
    let chunk = 128 << 10
    var bytes = [UInt8](repeating: 0, count: chunk)
    var start = offset
    while start < offset + length {
      let count = min(chunk, offset + length - start)
      let source = UnsafeRawPointer(bitPattern: base + UInt(start - offset))!
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
        madvise(UnsafeMutableRawPointer(bitPattern: base + UInt(page - offset)), end - page, MADV_DONTNEED)
        dropped.insert(UInt64(page)..<UInt64(end))
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
}
