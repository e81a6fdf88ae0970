import BrokerCore
import BrokerProtocol
import Userfaultfd

/// Client processes: they come and go; their threads fault, drop, unmap,
/// move and fork; the broker reads their uffds.
extension Simulation {
  func startClient() {
    let slot = processes.count
    // Every third client maps huge pages (MAP_HUGETLB), in an area of its own
    // scaled to them: 4 GiB per client from 16 TiB (small-page areas end far below).
    let huge = slot % 3 == 2
    // Every third one, a clone: its region 1 maps the snapshot file (shared memory, MAP_PRIVATE).
    let clone = slot % 3 == 1
    let pageSize = UInt(huge ? Self.hugePageSize : Self.smallPageSize)
    var process = SimProcess(pid: nextPid, threads: 3, pageSize: pageSize)
    nextPid += 1
    process.area = huge ? UInt(1) << 44 + UInt(slot + 1) << 32 : UInt(0x1000_0000) * UInt(slot + 1)
    var specs: [RegionSpec] = []
    for region in 0..<2 {
      let start = process.area + UInt(region) * 256 * pageSize
      let backing: RegionSpec.Backing = clone && region == 0 ? .sharedMemory(fileOffset: 0) : .anonymous
      specs.append(RegionSpec(id: UInt64(region + 1), base: start, length: Self.regionPages[region] * Int(pageSize), pageSize: Int(pageSize), plugin: "p\(region)", backing: backing))
      for page in 0..<Self.regionPages[region] {
        process.pages[start + UInt(page) * pageSize] = .init(origin: .init(region: UInt64(region + 1), offset: UInt64(page) * UInt64(pageSize)), present: nil)
      }
    }
    process.client.regions = specs
    if clone { process.sharedRegion = 1 }
    process.client.token = UInt128(random.next()) << 64 | UInt128(random.next()) | 1
    processes.append(process)
    attach(slot, regions: specs)
  }

  /// Connects, says Hello and registers the process's uffd with `regions` and
  /// its token, as the ClientSDK does (the Ack comes when the plugins took them).
  func attach(_ slot: Int, regions: [RegionSpec]) {
    guard case .success(let id) = engine.clientConnected(PeerCredentials(pid: processes[slot].pid, uid: 0, gid: 0), now: now) else {
      return ended(slot, reason: "refused by the broker")
    }
    processes[slot].id = id
    processes[slot].knownToBroker = true
    slots[id] = slot
    note("client \(id) (pid \(processes[slot].pid)) connects: \(regions.map { "region \($0.id) at \($0.pieces.isEmpty ? [$0.range] : $0.pieces.map(\.range)) dropped \($0.dropped)" })")
    engine.clientRequest(id, ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "sim"))), descriptors: .none, now: now)
    let register = RegisterRequest(pid: processes[slot].pid, features: Self.features, ioctls: [], regions: regions, token: processes[slot].client.token)
    var descriptors = AttachedDescriptors.userfaultfd(Self.features)
    if processes[slot].sharedRegion != nil {
      // The snapshot file, under a handle of its own, as the runtime gives each Register's file.
      let file = FileHandle(nextSharedFile)
      nextSharedFile += 1
      sharedFiles.insert(file)
      let size = UInt64(Self.regionPages[0]) * UInt64(processes[slot].pageSize)
      descriptors = .userfaultfdAndFile(Self.features.union(.minorShmem), .success(SharedMemoryFile(handle: file, size: size)))
    }
    engine.clientRequest(id, ClientRequest(requestID: 2, .register(register)), descriptors: descriptors, now: now)
    perform()
  }

  /// The process exits: a connected one's pidfd tells the broker; a forked
  /// child's exit is found by the broker's probe.
  func exitProcess(_ slot: Int) {
    ended(slot, reason: "exited")
    perform()
  }

  /// The process is gone (exited, killed by SIGBUS, or closed by the broker):
  /// a fork it had not finished never happens (the kernel fails it); the
  /// broker sees a connected process go (its pidfd), a forked child at its probe.
  func ended(_ slot: Int, reason: String) {
    guard !processes[slot].exited else { return }
    processes[slot].exited = true
    forks = forks.filter { $0.value.parent != slot }
    note("client \(processes[slot].id) (pid \(processes[slot].pid)) ends: \(reason)")
    if processes[slot].hasSocket && processes[slot].knownToBroker { engine.clientGone(processes[slot].id, BrokerError(.disconnected, reason), now: now) }
  }

  /// A process killed by SIGBUS at a poisoned page ends (no perform: callers are performing).
  func reapIfKilled(_ slot: Int) {
    if processes[slot].killedBySIGBUS { ended(slot, reason: "SIGBUS at a poisoned page") }
  }

  /// A process starts, re-attaches to a restarted broker, or exits (not one
  /// still holding forked children's uffds for a broker that died: see Restarts).
  func clientLifecycle() {
    let live = processes.indices.filter { !processes[$0].exited }
    let connected = live.filter { processes[$0].hasSocket }.count
    if let slot = live.filter({ processes[$0].attachment == .detached }).randomElement(using: &random), random.chance(70) {
      reattach(slot)
    } else if connected < 2 || (connected < 4 && live.count < Self.maxProcesses && random.chance(50)) {
      startClient()
    } else if let slot = live.filter({ processes[$0].orphans.isEmpty }).randomElement(using: &random) {
      statistics.clientsServed += 1
      exitProcess(slot)
    }
  }

  func threadActs() {
    let live = processes.indices.filter { processes[$0].registered && !processes[$0].exited }
    guard let slot = live.randomElement(using: &random) else { return }
    let thread = random.below(processes[slot].threads.count)
    guard processes[slot].threads[thread] == .running else { return }
    let roll = random.below(100)
    if roll < 60 {
      // Mostly where a fault is: the pages not present; often memory just grown (a program uses it).
      let missing = random.chance(80)
      let fresh = random.chance(25)
      let candidates = processes[slot].pages.filter { !missing || $0.value.present == nil }
      let grown = fresh ? candidates.filter(\.value.origin.isFresh) : [:]
      guard let page = (grown.isEmpty ? candidates : grown).keys.sorted().randomElement(using: &random)
        ?? processes[slot].pages.keys.sorted().randomElement(using: &random)
      else { return }
      let write = random.chance(30)
      processes[slot].touch(page, thread: thread, write: write, now: now)
      if case .faulting = processes[slot].threads[thread] { statistics.faults += 1 }
      note("client \(processes[slot].id) thread \(thread) \(write ? "writes" : "reads") 0x\(String(page, radix: 16))")
      reapIfKilled(slot)
      perform()
      return
    }
    if roll >= 97 {
      if processes.count(where: { !$0.exited }) < Self.maxProcesses { fork(slot, thread: thread) }
      return
    }
    if roll >= 94 { return grow(slot, thread: thread) }
    guard let range = changeableRange(in: slot, pages: 1 + random.below(roll < 90 ? 4 : 8)) else { return }
    statistics.mapChanges += 1
    if roll < 74 {
      note("client \(processes[slot].id) thread \(thread) drops \(describe(range))")
      processes[slot].dropPages(range)
      processes[slot].beginMapChange([.remove(range, thread: thread)], thread: thread)
    } else if roll < 75 {
      balloon(slot, thread: thread)
      return
    } else if roll < 85 {
      guard processes[slot].pages.count > 8 else { return }
      note("client \(processes[slot].id) thread \(thread) unmaps \(describe(range))")
      processes[slot].unmapPages(range)
      processes[slot].beginMapChange([.unmap(range, thread: thread)], thread: thread)
    } else {
      guard let destination = hole(in: slot, length: range.count) else { return }
      note("client \(processes[slot].id) thread \(thread) moves \(describe(range)) to 0x\(String(destination, radix: 16))")
      processes[slot].movePages(from: range.lowerBound, to: destination, length: range.count)
      processes[slot].beginMapChange([
        .remap(from: range.lowerBound, to: destination, length: range.count, thread: thread),
        .unmap(range, thread: thread, trailing: true),
      ], thread: thread)
      busy[slot, default: []].append((thread, destination..<destination + UInt(range.count)))
    }
    busy[slot, default: []].append((thread, range))
  }

  /// A run of up to `pages` registered pages, none of them in a change in progress.
  private func changeableRange(in slot: Int, pages count: Int) -> Range<UInt>? {
    busy[slot] = busy[slot]?.filter { processes[slot].threads[$0.thread] == .changingMaps }
    guard let start = processes[slot].pages.keys.sorted().randomElement(using: &random) else { return nil }
    let pageSize = processes[slot].pageSize
    var end = start
    while end - start < UInt(count) * pageSize, processes[slot].pages[end] != nil { end += pageSize }
    let range = start..<end
    guard !(busy[slot] ?? []).contains(where: { $0.range.overlaps(range) }) else { return nil }
    return range
  }

  /// A balloon: every other page of the large region (by offset, wherever it
  /// lies now) dropped by a madvise of its own, one after the other (each
  /// waits until its REMOVE was read). It fragments the region's drop record
  /// past `RegionSpec.maxExtents`: the client is told a cover (`unknown`).
  private func balloon(_ slot: Int, thread: Int) {
    let parity = UInt64(random.below(2))
    let pageSize = processes[slot].pageSize
    busy[slot] = busy[slot]?.filter { processes[slot].threads[$0.thread] == .changingMaps }
    let pages = processes[slot].pages.filter { page, entry in
      entry.origin.region == 2 && entry.origin.offset / UInt64(pageSize) % 2 == parity
        && !(busy[slot] ?? []).contains { $0.range.contains(page) }
    }.keys.sorted()
    guard pages.count > 1 else { return }
    statistics.balloons += 1
    note("client \(processes[slot].id) thread \(thread) balloons \(pages.count) pages of region 2")
    processes[slot].dropPages(pages[0]..<pages[0] + pageSize)
    processes[slot].beginMapChange(pages.map { .remove($0..<$0 + pageSize, thread: thread) }, thread: thread)
    for page in pages { busy[slot, default: []].append((thread, page..<page + pageSize)) }
  }

  /// An mremap that grows a range by a few pages: in place where the range
  /// ends its mapping and unmapped memory follows (no event), else moved to a
  /// hole (REMAP and trailing UNMAP of the old length). The tail is fresh.
  private func grow(_ slot: Int, thread: Int) {
    let extra = 1 + random.below(4)
    let pageSize = processes[slot].pageSize
    guard processes[slot].pages.count + extra <= Self.maxPages, let range = changeableRange(in: slot, pages: 1 + random.below(4)) else { return }
    // Grown past shared memory is more of the file, which the broker fails closed: programs here do not.
    if let shared = processes[slot].sharedRegion, processes[slot].pages[range.upperBound - pageSize]?.origin.region == shared { return }
    statistics.mapChanges += 1
    statistics.grows += 1
    if random.chance(50), processes[slot].isFree(range.upperBound, pages: extra), !isBusy(slot, range.upperBound..<range.upperBound + UInt(extra) * pageSize) {
      note("client \(processes[slot].id) thread \(thread) grows \(describe(range)) in place by \(extra) pages")
      processes[slot].grow(at: range.upperBound, pages: extra, serial: &freshPages)
      return
    }
    let length = range.count + extra * Int(pageSize)
    guard let destination = hole(in: slot, length: length) else { return }
    note("client \(processes[slot].id) thread \(thread) grows \(describe(range)) by \(extra) pages, moving it to 0x\(String(destination, radix: 16))")
    processes[slot].movePages(from: range.lowerBound, to: destination, length: range.count)
    processes[slot].grow(at: destination + UInt(range.count), pages: extra, serial: &freshPages)
    processes[slot].beginMapChange([
      .remap(from: range.lowerBound, to: destination, length: range.count, thread: thread),
      .unmap(range, thread: thread, trailing: true),
    ], thread: thread)
    busy[slot, default: []].append((thread, range))
    busy[slot, default: []].append((thread, destination..<destination + UInt(length)))
  }

  private func isBusy(_ slot: Int, _ range: Range<UInt>) -> Bool {
    (busy[slot] ?? []).contains { processes[slot].threads[$0.thread] == .changingMaps && $0.range.overlaps(range) }
  }

  /// An unregistered range of `length` bytes in the process's part of the
  /// address space: often the hole another thread's move is leaving (its
  /// trailing UNMAP then comes after this move's REMAP).
  private func hole(in slot: Int, length: Int) -> UInt? {
    let pageSize = processes[slot].pageSize
    let pages = length / Int(pageSize)
    let leaving = (busy[slot] ?? []).filter { processes[slot].threads[$0.thread] == .changingMaps && processes[slot].pages[$0.range.lowerBound] == nil }
    if random.chance(60), let source = leaving.randomElement(using: &random), processes[slot].isFree(source.range.lowerBound, pages: pages) {
      return source.range.lowerBound
    }
    for _ in 0..<8 {
      let start = processes[slot].area + UInt(random.below(0x300)) * pageSize
      if processes[slot].isFree(start, pages: pages) { return start }
    }
    return nil
  }

  /// Whether a fault on `page` is minor: a clone's shared page the snapshot
  /// file's cache holds. Decided at the read (a valid order: the cache only grows).
  private func minor(_ page: UInt, of slot: Int) -> Bool {
    guard let shared = processes[slot].sharedRegion, let origin = processes[slot].pages[page]?.origin, origin.region == shared,
          snapshotCache.contains(origin.offset)
    else { return false }
    statistics.minorFaults += 1
    return true
  }

  func readSomeUffd() {
    let ready = processes.indices.filter { processes[$0].watched && !processes[$0].exited && !processes[$0].queue.isEmpty }
    guard let slot = ready.randomElement(using: &random) else { return streamBlock() }
    readUffd(slot)
    streamBlock()
  }

  func readUffd(_ slot: Int) {
    let messages = processes[slot].queue
    processes[slot].queue.removeAll()
    let events = messages.map { message -> KernelEvent in
      switch message {
      // A huge page's fault is reported at its start, as the kernel does without UFFD_FEATURE_EXACT_ADDRESS.
      case .fault(let page, let thread): .pagefault(Pagefault(address: page, flags: minor(page, of: slot) ? .minor : [], thread: Int32(thread)))
      case .remove(let range, _): .remove(range)
      case .unmap(let range, _, _): .unmap(range)
      case .remap(let from, let to, let length, _): .remap(from: from, to: to, length: length)
      case .fork(let ticket, _): .fork(ForkTicket(ticket), wipedOnFork: [])
      }
    }
    note("broker reads client \(processes[slot].id): \(events.map(describe).joined(separator: ", "))")
    if messages.contains(where: \.isMapChange) { processes[slot].forgetWakes() }
    engine.uffdEvents(processes[slot].id, events, now: now)
    // The readers of map changes are released at the read: their next
    // messages may be queued before or after the broker's fills.
    let releaseFirst = random.chance(50)
    if releaseFirst { for message in messages { processes[slot].read(message) } }
    perform()
    if !releaseFirst { for message in messages { processes[slot].read(message) } }
  }
}
