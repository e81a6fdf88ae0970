import BrokerProtocol
import Glibc
import PluginSDK

/// Lazy snapshot restore (as Firecracker and CRIU do): a region maps onto a
/// snapshot file (the region's argument) from its backing offset; each fault
/// is served with `pread` from the file, optionally with the following pages
/// of an aligned block in the same decision (prefetch). Pages the client
/// dropped (MADV_DONTNEED, a balloon) read as zeros from then on, as fresh
/// anonymous memory does; a forked child gets the same file and the same
/// dropped pages.
///
/// The file is opened for the client, not for the plugin: only beneath the
/// `--root` directories (no symlinks, no `..` out), and only if the client's
/// uid could read it itself (`ClientFiles`); each open and refusal is logged
/// with the client's uid. With `--delegate` the broker serves the descriptor
/// opened here; it never opens a path itself.
///
/// Working sets (`--record`, `--replay`): a region restored without a usable
/// record is served here, and the order of its faults is written to the
/// record when it closes; a region whose snapshot matches the record is
/// delegated, the broker streaming the recorded pages' blocks first.
final class SnapshotPlugin: PagePlugin {
  /// Pages per aligned prefetch block (1: no prefetch).
  let prefetchPages: Int
  /// Hand each region to the broker to serve from the file itself (no round trip per fault).
  let delegate: Bool
  /// Have the broker fill every delegated page in the background too.
  let stream: Bool
  /// Where snapshot files may be, and the check of the client's rights.
  let files: ClientFiles
  /// Where a restore's working set is written, and read from.
  let recordPath: String?
  let replayPath: String?
  /// The most working-set blocks one delegation names (they must fit its packet).
  static let maxStreamFirst = 32_768

  /// The open snapshot file of one region.
  final class Snapshot {
    let fd: CInt
    let size: UInt64
    init(fd: CInt, size: UInt64) {
      self.fd = fd
      self.size = size
    }
    deinit { close(fd) }
  }

  /// What a region restores from: its file, and the pages dropped since.
  final class Restore {
    let snapshot: Snapshot
    var removed: RemovedPages
    /// The faults' order, while this restore records its working set.
    var recorder: WorkingSetRecorder?
    init(snapshot: Snapshot, removed: RemovedPages = RemovedPages()) {
      self.snapshot = snapshot
      self.removed = removed
    }
  }

  init(prefetchPages: Int, delegate: Bool, stream: Bool = false, files: ClientFiles, recordPath: String? = nil, replayPath: String? = nil) {
    self.prefetchPages = max(prefetchPages, 1)
    self.delegate = delegate
    self.stream = stream
    self.files = files
    self.recordPath = recordPath
    self.replayPath = replayPath
  }

  /// The file must exist and cover every page of the region (the last page may
  /// be partial: its tail reads as zeros). Checked now, so a bad snapshot fails
  /// the client's Register instead of a fault later.
  func regionOpened(_ region: PluginRegion) throws {
    let path = region.spec.argument
    let client = region.client
    let who = "client \(region.clientID) (pid \(client.pid), uid \(client.isKnown ? "\(client.uid)" : "unknown"))"
    let fd: CInt
    do {
      fd = try files.open(path, for: client)
    } catch {
      log("refused snapshot \(path) to \(who): \(error.message)")
      throw BrokerError(.pluginRefused, "cannot open snapshot \(path): \(error.message)")
    }
    let identity = WorkingSet.Identity(fd)
    let size = identity.size
    let needed = region.spec.backingOffset + UInt64(region.length - region.pageSize) + 1
    guard size >= needed else {
      close(fd)
      throw BrokerError(.pluginRefused, "snapshot \(path) has \(size) bytes; region \(region.spec.id) needs at least \(needed) from offset \(region.spec.backingOffset)")
    }
    let restore = Restore(snapshot: Snapshot(fd: fd, size: size))
    region.context = restore
    let first = replayPath.map { workingSet($0, identity: identity, region: region) } ?? []
    if recordPath != nil && first.isEmpty {
      // Served here, so that every fault is seen.
      restore.recorder = WorkingSetRecorder(identity: identity, fileOffset: region.spec.backingOffset, pages: region.length / region.pageSize, pageSize: region.pageSize)
    }
    let delegated = restore.recorder == nil && (delegate || !first.isEmpty)
    log("opened snapshot \(path) for \(who), region \(region.spec.id)\(delegated ? ", delegated" : "")\(restore.recorder != nil ? ", recording its working set" : "")"
      + "\(first.isEmpty ? "" : ", streaming \(first.count) working-set blocks first")\(delegated && stream ? ", streaming the rest" : "")")
    if delegated {
      region.delegate(file: fd, fileOffset: region.spec.backingOffset, prefetchPages: prefetchPages, stream: stream, streamFirst: first)
    }
    // A cold cache reads the working set from disk: ask for all of it now, in its order
    // (the reads run while the broker streams and the client faults; an advice only).
    let block = streamBlock(region)
    for offset in first { _ = posix_fadvise(fd, off_t(region.spec.backingOffset + offset), off_t(block), POSIX_FADV_WILLNEED) }
  }

  /// The region offsets of the blocks of the working set recorded at `path`,
  /// in order, each once; none (and a log line) if the record does not fit this snapshot.
  private func workingSet(_ path: String, identity: WorkingSet.Identity, region: PluginRegion) -> [UInt64] {
    switch WorkingSet.read(path, for: identity) {
    case .failure(let error):
      log("ignored working-set record \(path): \(error.reason)")
      return []
    case .success(let offsets):
      // The broker streams the block a fault at each offset would fill: one entry each.
      let block = UInt64(streamBlock(region))
      let start = region.spec.backingOffset
      var seen = Set<UInt64>()
      var first: [UInt64] = []
      for offset in offsets where offset >= start && offset - start < UInt64(region.length) {
        let regionOffset = (offset - start) / UInt64(region.pageSize) * UInt64(region.pageSize)
        if seen.insert(regionOffset / block).inserted { first.append(regionOffset) }
        if first.count == Self.maxStreamFirst { break }
      }
      return first
    }
  }

  /// The bytes the broker fills around a working-set offset: what a fault there fills.
  private func streamBlock(_ region: PluginRegion) -> Int {
    region.pageSize > Int(sysconf(Int32(_SC_PAGESIZE))) ? region.pageSize : prefetchPages * region.pageSize
  }

  func regionClosed(_ region: PluginRegion) {
    guard let recorder = (region.context as? Restore)?.recorder, let recordPath, !recorder.offsets.isEmpty else { return }
    let written = WorkingSet(identity: recorder.identity, offsets: recorder.offsets).write(to: recordPath)
    log(written ? "recorded a working set of \(recorder.offsets.count) pages in \(recordPath)" : "cannot write the working-set record \(recordPath): errno \(errno)")
  }

  private func log(_ line: String) { logLine(line) }

  func regionForked(_ child: PluginRegion, from parent: PluginRegion) throws {
    guard let restore = parent.context as? Restore else { throw BrokerError(.pluginRefused, "the parent's region has no snapshot") }
    child.context = Restore(snapshot: restore.snapshot, removed: restore.removed)
  }

  /// The broker takes a dropped range back from a delegation, so its faults come here.
  func removed(_ offsets: Range<UInt64>, in region: PluginRegion) {
    (region.context as? Restore)?.removed.insert(offsets, pageSize: region.pageSize)
  }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    guard let restore = region.context as? Restore else { return .retry }
    let snapshot = restore.snapshot
    let pageSize = region.pageSize
    restore.recorder?.note(fault.offset)
    if restore.removed.contains(fault.offset, pageSize: pageSize) { return .zero }
    let block = UInt64(min(prefetchPages * region.pageSize, buffer.count))
    let start = fault.offset / block * block
    let length = Int(min(block, UInt64(region.length) - start))
    let fileOffset = region.spec.backingOffset + start
    let available = fileOffset < snapshot.size ? Int(min(UInt64(length), snapshot.size - fileOffset)) : 0
    var done = 0
    while done < available {
      let n = pread(snapshot.fd, buffer.baseAddress! + done, available - done, off_t(fileOffset) + off_t(done))
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { break }
      done += n
    }
    // Past the end of the file (the last partial page) the region reads zeros.
    if done < length { (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: length - done) }
    // So do dropped pages the block reaches over.
    if !restore.removed.isEmpty {
      for page in stride(from: 0, to: length, by: pageSize) where restore.removed.contains(start + UInt64(page), pageSize: pageSize) {
        (buffer.baseAddress! + page).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
      }
    }
    return length == region.pageSize ? .copy : .copyRange(offset: start, length: length)
  }
}

/// One line on stderr (the broker's log when it spawned the plugin).
func logLine(_ line: String) {
  let text = "snapshot-plugin: \(line)\n"
  _ = text.withCString { write(2, $0, strlen($0)) }
}
