import BrokerCore
import BrokerProtocol
import Userfaultfd

/// A client process as the kernel sees it: which memory each page of its
/// address space is (a region offset, moved along by mremap), whether it is
/// present and with what, its threads, and its userfaultfd's queue of messages.
///
/// It follows the kernel's rules where the broker depends on them:
/// - a fault blocks its thread until the page is filled, or the thread is
///   woken (it then touches the page again, and faults again if it is still missing);
/// - a thread that changes the mappings (madvise, munmap, mremap) queues its
///   messages one at a time and waits until each is read; a move's trailing
///   UNMAP is queued only after its REMAP was read, and a balloon's next
///   madvise issued only after the last one's REMOVE was read, so other
///   threads' messages come in between;
/// - a fill fails with EAGAIN while a map change is queued and unread, with
///   EEXIST at a present page, ENOENT at an unregistered one, and stops
///   (a partial fill) at the first such page past the first;
/// - a fork (UFFD_FEATURE_EVENT_FORK) gives the child the same registered
///   memory: present pages copied, missing ones missing (they fault to the
///   child's own uffd); the forking thread waits until the FORK is read, and
///   the child runs only from then on;
/// - an mremap that grows a range keeps the new tail registered, in place (no
///   event at all) or moved (the move's REMAP and trailing UNMAP, of the old
///   length): fresh memory, zeros until written, that no one registered;
/// - a poisoned page (UFFDIO_POISON) is SIGBUS at the access: the process dies;
/// - a clone's shared-memory region (`sharedRegion`) maps the snapshot file
///   MAP_PRIVATE: a missing page the file's cache holds faults as minor, and a
///   dropped page reads the file again (not zeros).
struct SimProcess {
  /// Whose content a page is: region and offset, as the plugin serves it; a
  /// grown tail's page is fresh memory (region 0, a serial number as offset).
  struct Origin: Hashable {
    var region: UInt64
    var offset: UInt64
    var isFresh: Bool { region == 0 }
  }

  enum Content: Equatable, CustomStringConvertible {
    case data(Origin)
    case zero
    case written(UInt64)
    case poison
    var description: String {
      switch self {
      case .data(let o): "data(r\(o.region)+\(o.offset / 4096))"
      case .zero: "zero"
      case .written(let n): "written(\(n))"
      case .poison: "POISON"
      }
    }
  }

  struct Page {
    var origin: Origin
    var present: Content?
  }

  enum Message {
    case fault(page: UInt, thread: Int)
    case remove(Range<UInt>, thread: Int)
    /// `trailing`: a move's, queued once its REMAP was read.
    case unmap(Range<UInt>, thread: Int, trailing: Bool = false)
    case remap(from: UInt, to: UInt, length: Int, thread: Int)
    /// The child's uffd waits under `ticket` until this is read.
    case fork(ticket: UInt64, thread: Int)

    var thread: Int {
      switch self {
      case .fault(_, let t), .remove(_, let t), .unmap(_, let t, _), .remap(_, _, _, let t), .fork(_, let t): t
      }
    }
    var isMapChange: Bool { if case .fault = self { false } else { true } }
  }

  enum ThreadState: Equatable {
    case running
    /// Blocked in a fault on `page` since simulated time `since`.
    case faulting(page: UInt, since: UInt64, wakes: Int)
    /// Waiting for its map-change messages to be read.
    case changingMaps
    case exited
  }

  var id: ClientID = 0
  let pid: Int32
  /// A forked child never connected: it has no socket and no pidfd (the broker probes it).
  let hasSocket: Bool
  let pageSize: UInt
  /// Where in the address space it maps memory (a forked child, where its parent does).
  var area: UInt = 0
  /// Registered pages (unregistered memory is not modelled: nothing faults there).
  var pages: [UInt: Page] = [:]
  /// Origins whose content the process dropped (MADV_DONTNEED): they read as zeros now.
  var dropped: Set<Origin> = []
  /// The region that maps the snapshot file (a clone), if any: its offsets are the file's.
  var sharedRegion: UInt64?
  var queue: [Message] = []
  var threads: [ThreadState]
  /// Per thread, the messages of its map change still to be queued.
  var pendingMessages: [[Message]]
  var registered = false
  /// The broker reads its uffd.
  var watched = false
  /// Whether the broker running now knows it: a connected process re-attaches
  /// after a broker restart; a forked child the dead broker served is known to
  /// none again (its uffd is its keeper's, until the keeper re-attaches).
  var attachment = Attachment.attached
  enum Attachment {
    case attached
    case detached
    /// Its Register to the restarted broker awaits the answer.
    case attaching
  }
  /// Forked children whose uffd it kept (`keepChild`) when the broker that served them died.
  var orphans: [(slot: Int, pieces: [RegionPiece])] = []
  var exited = false
  /// The running broker holds its uffd (until it closes it: a forked child's
  /// exit is found by a probe, later; a broker restart forgets them all).
  var knownToBroker = true
  /// Killed by SIGBUS at a poisoned page (failed closed).
  var killedBySIGBUS = false
  var writes: UInt64 = 0
  /// What the ClientSDK keeps (a connected process only).
  var client = SimClientState()
  /// A forked child: when its FORK was read, and the regions its plugins accepted
  /// within the broker's registration timeout (the others may fail closed, and
  /// so may those its parent's plugins had not accepted when the FORK was read).
  var forkedAt: UInt64?
  var acceptedRegions: Set<UInt64> = []
  var inheritedUnserved: Set<UInt64> = []
  /// A forked child: what its parent's drop records said no one can vouch for, at the fork.
  var inheritedUnknown: [UInt64: [Range<UInt64>]] = [:]

  /// Region offsets no one can vouch for, as the broker last said (the `unknown`
  /// of the drop records): after a broker restart their faults fail closed.
  var unknown: [UInt64: [Range<UInt64>]] { hasSocket ? client.dropRecords.mapValues(\.unknown) : inheritedUnknown }

  /// A forked child's memory where it lay at the fork (what its keeper knows of it).
  var atFork: [UInt: Origin] = [:]
  /// Fresh pages (grown tails) moved since they were made: the broker may not tell them from lost memory.
  var movedFresh: Set<Origin> = []

  /// Regions whose pages may fail closed here: its plugin did not take them for this child.
  var unservedRegions: Set<UInt64> {
    guard forkedAt != nil else { return [] }
    return inheritedUnserved.union(Set(pages.values.map(\.origin.region)).subtracting(acceptedRegions))
  }

  init(pid: Int32, threads: Int, pageSize: UInt, hasSocket: Bool = true) {
    self.pid = pid
    self.hasSocket = hasSocket
    self.pageSize = pageSize
    self.threads = Array(repeating: .running, count: threads)
    pendingMessages = Array(repeating: [], count: threads)
  }

  /// What a fill of `origin` must put there.
  func expected(_ origin: Origin) -> Content {
    origin.isFresh || dropped.contains(origin) && origin.region != sharedRegion ? .zero : .data(origin)
  }

  var mapChangeQueued: Bool { queue.contains { $0.isMapChange } }

  /// A move's trailing UNMAP is queued: its REMAP was read, this not yet.
  var trailingUnmapQueued: Bool { queue.contains { if case .unmap(_, _, true) = $0 { true } else { false } } }

  // MARK: Threads

  /// Thread `thread` touches `page`: it proceeds if present, faults if missing,
  /// and kills the process at a poisoned page.
  mutating func touch(_ page: UInt, thread: Int, write: Bool, now: UInt64) {
    guard let entry = pages[page] else {
      threads[thread] = .running  // unmapped since: a real program would crash; this one moves on
      return
    }
    if entry.present == .poison {
      killedBySIGBUS = true
      return
    }
    guard entry.present != nil else {
      let wakes = if case .faulting(page, _, let w) = threads[thread] { w } else { 0 }
      threads[thread] = .faulting(page: page, since: now, wakes: wakes)
      queue.append(.fault(page: page, thread: thread))
      return
    }
    threads[thread] = .running
    if write {
      writes += 1
      pages[page]?.present = .written(writes)
    }
  }

  /// Starts a map change of `thread`: its first message is queued.
  mutating func beginMapChange(_ messages: [Message], thread: Int) {
    threads[thread] = .changingMaps
    pendingMessages[thread] = Array(messages.dropFirst())
    queue.append(messages[0])
  }

  /// The broker read `message`: its thread queues its next one, or returns.
  mutating func read(_ message: Message) {
    guard message.isMapChange else { return }
    let thread = message.thread
    if pendingMessages[thread].isEmpty {
      if threads[thread] == .changingMaps { threads[thread] = .running }
    } else {
      let next = pendingMessages[thread].removeFirst()
      // A balloon's next madvise: it drops when issued (a move's trailing UNMAP unmapped at the move).
      if case .remove(let range, _) = next { dropPages(range) }
      queue.append(next)
    }
  }

  /// The broker woke `range`: blocked threads there touch their page again.
  mutating func wake(_ range: Range<UInt>, now: UInt64) {
    for thread in threads.indices {
      guard case .faulting(let page, _, let wakes) = threads[thread], range.contains(page) else { continue }
      threads[thread] = .faulting(page: page, since: now, wakes: wakes + 1)
      touch(page, thread: thread, write: false, now: now)
    }
  }

  /// A map event was read: a fault woken before it may be explained by it (the count starts again).
  mutating func forgetWakes() {
    for thread in threads.indices {
      if case .faulting(let page, let since, _) = threads[thread] { threads[thread] = .faulting(page: page, since: since, wakes: 0) }
    }
  }

  /// Threads blocked on `page` see it filled (SIGBUS if poisoned).
  private mutating func release(_ page: UInt) {
    for thread in threads.indices {
      guard case .faulting(page, _, _) = threads[thread] else { continue }
      threads[thread] = .running
      if pages[page]?.present == .poison { killedBySIGBUS = true }
    }
  }

  /// The child of a fork by `thread`, as the kernel makes it: the same
  /// registered memory, present pages copied, missing ones missing.
  func forked(pid: Int32, threads count: Int) -> SimProcess {
    var child = SimProcess(pid: pid, threads: count, pageSize: pageSize, hasSocket: false)
    child.area = area
    child.pages = pages
    child.dropped = dropped
    child.sharedRegion = sharedRegion
    child.atFork = pages.mapValues(\.origin)
    return child
  }

  // MARK: Map changes (in the kernel at once; the messages follow)

  mutating func dropPages(_ range: Range<UInt>) {
    for page in stride(from: range.lowerBound, to: range.upperBound, by: Int(pageSize)) {
      guard let entry = pages[page] else { continue }
      pages[page]?.present = nil
      dropped.insert(entry.origin)
    }
  }

  mutating func unmapPages(_ range: Range<UInt>) {
    for page in stride(from: range.lowerBound, to: range.upperBound, by: Int(pageSize)) { pages[page] = nil }
  }

  mutating func movePages(from: UInt, to: UInt, length: Int) {
    var moved: [(UInt, Page)] = []
    for page in stride(from: from, to: from + UInt(length), by: Int(pageSize)) {
      if let entry = pages.removeValue(forKey: page) { moved.append((page - from + to, entry)) }
    }
    for (page, entry) in moved {
      pages[page] = entry
      if entry.origin.isFresh { movedFresh.insert(entry.origin) }
    }
  }

  /// The fresh tail of an mremap that grew: registered, missing, zeros until written.
  mutating func grow(at start: UInt, pages count: Int, serial: inout UInt64) {
    for page in 0..<count {
      serial += 1
      pages[start + UInt(page) * pageSize] = .init(origin: .init(region: 0, offset: serial), present: nil)
    }
  }

  /// Whether `count` pages from `start` are unmapped.
  func isFree(_ start: UInt, pages count: Int) -> Bool {
    !stride(from: start, to: start + UInt(count) * pageSize, by: Int(pageSize)).contains { pages[$0] != nil }
  }

  // MARK: Fills (the broker's ioctls)

  enum FillError: Error, Equatable {
    case wrongContent(page: UInt, got: Content, expected: Content)
  }

  /// A fill of `range` with `content(page)`; returns the ioctl's outcome, and
  /// throws if a page gets content other than what it must read.
  mutating func fill(_ range: Range<UInt>, content: (UInt) -> Content, injectPartial: Bool) throws(FillError) -> IoctlOutcome {
    if mapChangeQueued { return .notNow }
    var done = 0
    for page in stride(from: range.lowerBound, to: range.upperBound, by: Int(pageSize)) {
      if injectPartial && done > 0 { return .partial(bytes: done) }
      guard let entry = pages[page] else { return done == 0 ? .rangeGone : .partial(bytes: done) }
      guard entry.present == nil else { return done == 0 ? .alreadyPresent : .partial(bytes: done) }
      let filled = content(page)
      let due = expected(entry.origin)
      if filled != due && filled != .poison { throw .wrongContent(page: page, got: filled, expected: due) }
      pages[page]?.present = filled
      release(page)
      done += Int(pageSize)
    }
    return .done
  }

  /// UFFDIO_POISON of every missing page of `range` (a fill that skips what is
  /// present); returns the pages poisoned.
  mutating func poisonMissing(_ range: Range<UInt>) -> [UInt] {
    var poisoned: [UInt] = []
    if mapChangeQueued { return poisoned }  // EAGAIN: the caller gives up
    for page in stride(from: range.lowerBound, to: range.upperBound, by: Int(pageSize)) where pages[page] != nil && pages[page]?.present == nil {
      pages[page]?.present = .poison
      poisoned.append(page)
      release(page)
    }
    return poisoned
  }

  /// Whether region memory (not fresh) precedes `page` in its mapping: how the
  /// broker tells a grown tail from memory it lost track of.
  func followsRegionMemory(_ page: UInt) -> Bool {
    guard let mapping = mapping(containing: page) else { return false }
    return stride(from: mapping.lowerBound, to: page, by: Int(pageSize)).contains { pages[$0]?.origin.isFresh == false }
  }

  /// The mapping holding `page`: the run of registered pages around it.
  func mapping(containing page: UInt) -> Range<UInt>? {
    guard pages[page] != nil else { return nil }
    var lower = page
    while pages[lower - pageSize] != nil { lower -= pageSize }
    var upper = page + pageSize
    while pages[upper] != nil { upper += pageSize }
    return lower..<upper
  }
}
