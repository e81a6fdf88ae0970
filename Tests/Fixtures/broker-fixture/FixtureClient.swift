import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport
import Synchronization

/// A client process with a scenario: registers memory with the broker, faults
/// on it in a chosen way, and checks every byte. Returns the exit status.
struct FixtureClient {
  let scenario: String
  let mib: Int
  let threads: Int
  let plugin: String
  let loops: Int
  let pageSize = systemPageSize

  func run() -> Int32 {
    do {
      switch scenario {
      case "touch": return try touch(expectZero: false)
      case "touch-holes": return try touch(expectZero: false, holes: true)
      case "zero": return try touch(expectZero: true)
      case "dontneed-race": return try dontneedRace()
      case "dontneed-late": return try dontneedRace(lateMicroseconds: 2000)
      case "remap": return try remap()
      case "unknown-plugin": return expectRefusal(plugin: "no-such-plugin")
      case "refused": return expectRefusal(plugin: plugin)
      case "bad-page-size": return badPageSize()
      case "exit-midway": return try exitMidway()
      case "swap": return try swapLoop()
      case "swap-once": return try swapOnce()
      case "snapshot": return try snapshot()
      case "snapshot-dropped": return try snapshotDropped()
      case "snapshot-stream-drops": return try snapshotStreamDrops()
      case "swap-corrupt": return try swapCorrupt()
      case "guarded": return try guarded()
      case "foreign-uid": return foreignUID()
      case "deputy": return try deputy()
      case "handoff": return try handoff()
      case "soak": return try soak()
      case "add-remove": return try addAndRemoveRegions()
      case "remove-pending": return try removePending()
      case "prefetch-dontneed": return try prefetchDontneed()
      case "grow": return try grow()
      case "concurrent-movers": return try concurrentMovers()
      case "unmap-exit": return try unmapThenExit()
      case "fork": return try forkChild()
      case "swap-hold": return try swapHold()
      case "swap-moved": return try swapAfterMove()
      case "remap-reattach": return try remapThenReattach()
      case "mover-race": return try moverRace()
      case "fork-broker-loss": return try forkThenBrokerLoss()
      case "fork-tree-broker-loss": return try forkTreeThenBrokerLoss()
      case "shm-clone": return try sharedMemoryClone()
      default:
        print("unknown scenario \(scenario)")
        return 2
      }
    } catch {
      print("error: \(error)")
      return 1
    }
  }

  /// The test's handshake (`Gate`): says `step` on FIXTURE_READY, then waits
  /// for the test to open FIXTURE_GO. Without the variables it goes straight on.
  /// With FIXTURE_REATTACH set (the test restarts the broker at this step), it
  /// then waits until `client` has re-attached: served again, whatever it touches next.
  func gate(_ step: String, client: BrokerClient) {
    let before = client.attachments
    passGate(step)
    if getenv("FIXTURE_REATTACH") != nil && !client.waitForAttachment(beyond: before, timeoutMilliseconds: 30_000) {
      print("no re-attach within 30 s")
      exit(1)
    }
  }

  private func passGate(_ step: String) {
    guard let ready = getenv("FIXTURE_READY").map({ String(cString: $0) }), let go = getenv("FIXTURE_GO").map({ String(cString: $0) }) else { return }
    // Open for reading first, so the test's open for writing never finds no reader.
    let wait = open(go, O_RDONLY | O_NONBLOCK)
    let out = open(ready, O_WRONLY)
    let line = step + "\n"
    _ = line.withCString { write(out, $0, strlen($0)) }
    close(out)
    var poller = pollfd(fd: wait, events: Int16(POLLIN), revents: 0)
    _ = poll(&poller, 1, -1)
    close(wait)
  }

  /// FIXTURE_ARGUMENT: the `argument` of the regions `register`, `guarded` and the swap scenarios name
  /// (the conformance plugins take their behaviour from it); default empty.
  var regionArgument: String { getenv("FIXTURE_ARGUMENT").map { String(cString: $0) } ?? "" }
  /// FIXTURE_HUGE_PAGES=1: the scenarios that honour it (`touch`, `zero`, `snapshot`) map 2 MiB huge pages (`MAP_HUGETLB`).
  var hugePageSize: Int? { getenv("FIXTURE_HUGE_PAGES") != nil ? 2 << 20 : nil }

  /// FIXTURE_LOSS_POLICY=poison:MS (or terminate:MS) sets what the client does when the broker is gone for MS;
  /// FIXTURE_USER_MODE=1 asks for a user-mode-only userfaultfd (what an unprivileged process may have).
  func register(_ memory: AnonymousMemory, id: UInt64 = 1) throws(ClientError) -> BrokerClient {
    var policy = BrokerLossPolicy.reattach(withinMilliseconds: 30_000, otherwise: .terminate)
    if let text = getenv("FIXTURE_LOSS_POLICY").map({ String(cString: $0) }) {
      let parts = text.split(separator: ":")
      let milliseconds = parts.count > 1 ? Int(parts[1]) ?? 1000 : 1000
      policy = .reattach(withinMilliseconds: milliseconds, otherwise: parts.first == "poison" ? .poison : .terminate)
    }
    return try BrokerClient(regions: [RegionSpec(id: id, base: memory.address, length: memory.length, pageSize: memory.pageSize, plugin: plugin, argument: regionArgument)], name: "fixture-\(scenario)",
                            userModeOnly: getenv("FIXTURE_USER_MODE") != nil, onBrokerLoss: policy)
  }

  /// Every page touched once by `threads` threads (interleaved), then every byte checked.
  /// `holes`: the pattern's holes (`Pattern.isHole`) read as zeros.
  private func touch(expectZero: Bool, holes: Bool = false) throws -> Int32 {
    let memory = try AnonymousMemory(length: mib << 20, hugePageSize: hugePageSize)
    let client = try register(memory)
    let pages = memory.length / pageSize
    let base = UInt(bitPattern: memory.base)
    let threadCount = threads
    let workers = (0..<threadCount).map { index in
      spawnThread {
        var page = index
        while page < pages {
          // Even pages take a write fault, odd pages a read fault. The write stores the
          // word the page must hold anyway, so the check below still sees every byte.
          let pointer = UnsafeMutableRawPointer(bitPattern: base + UInt(page * 4096))!
          if page % 2 == 0 {
            let zero = expectZero || holes && Pattern.isHole(backingOffset: UInt64(page * 4096))
            let word = zero ? 0 : Pattern.word(backingOffset: UInt64(page * 4096), wordIndex: 1)
            pointer.storeBytes(of: word, toByteOffset: 8, as: UInt64.self)
          } else {
            _ = pointer.load(as: UInt8.self)
          }
          page += threadCount
        }
      }
    }
    workers.forEach { pthread_join($0, nil) }
    var bad = 0
    for page in 0..<pages {
      let bytes = UnsafeRawBufferPointer(start: memory.base + page * pageSize, count: pageSize)
      let zero = expectZero || holes && Pattern.isHole(backingOffset: UInt64(page * pageSize))
      let wrong = zero ? bytes.contains { $0 != 0 } : Pattern.mismatch(bytes, backingOffset: UInt64(page * pageSize)) != nil
      if wrong { bad += 1 }
    }
    withExtendedLifetime(client) {}
    print("verified \(pages) pages, \(bad) wrong")
    return bad == 0 ? 0 : 1
  }

  /// A thread faults on a page while another drops it with MADV_DONTNEED; once
  /// madvise has returned the page must read as zeros (the plugin serves zeros
  /// for removed pages), never the old pattern.
  ///
  /// `lateMicroseconds`: madvise that long after starting the reader, every
  /// time, so that its fault usually reaches the plugin before the removal.
  private func dontneedRace(lateMicroseconds: UInt32? = nil) throws -> Int32 {
    let count = max(loops, 1)
    let memory = try AnonymousMemory(length: count * pageSize)
    let client = try register(memory)
    let base = UInt(bitPattern: memory.base)
    let stale = Atomic<Int>(0)
    for iteration in 0..<count {
      let address = base + UInt(iteration * pageSize)
      let start = Atomic<Bool>(false)
      let reader = spawnThread {
        while !start.load(ordering: .acquiring) {}
        _ = UnsafeRawPointer(bitPattern: address)!.load(as: UInt64.self)
      }
      start.store(true, ordering: .releasing)
      if let lateMicroseconds {
        usleep(lateMicroseconds)
      } else if iteration % 3 != 0 {
        sched_yield()  // vary who wins the race
      }
      madvise(UnsafeMutableRawPointer(bitPattern: address), pageSize, MADV_DONTNEED)
      // After madvise returned: zeros, whoever won.
      let page = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: address), count: pageSize)
      if page.contains(where: { $0 != 0 }) { stale.add(1, ordering: .relaxed) }
      pthread_join(reader, nil)
    }
    withExtendedLifetime(client) {}
    print("dontneed races \(count), stale pages \(stale.load(ordering: .relaxed))")
    return stale.load(ordering: .relaxed) == 0 ? 0 : 1
  }

  /// mremap half of the region while a thread faults in the other half, then
  /// munmap a quarter; the moved pages are served at their new address with
  /// their original content.
  private func remap() throws -> Int32 {
    let length = max(mib, 4) << 20
    let memory = try AnonymousMemory(length: length)
    let client = try register(memory)
    let base = memory.base
    let address = memory.address
    let quarter = length / 4
    let toucher = spawnThread {
      for page in stride(from: 0, to: quarter, by: 4096) { _ = UnsafeRawPointer(bitPattern: address + UInt(page))!.load(as: UInt8.self) }
    }
    // Reserve a destination, then move the upper half onto it.
    let destination = mmap(nil, length / 2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
    let moved = clinux_mremap(base + length / 2, length / 2, length / 2, clinux_mremap_maymove | clinux_mremap_fixed, destination)
    guard moved != MAP_FAILED, let moved else {
      print("mremap failed: \(errno)")
      return 1
    }
    munmap(base + quarter, quarter)  // the second quarter, while the toucher works on the first
    pthread_join(toucher, nil)
    var bad = 0
    for page in stride(from: 0, to: length / 2, by: pageSize) {
      if Pattern.mismatch(UnsafeRawBufferPointer(start: moved + page, count: pageSize), backingOffset: UInt64(length / 2 + page)) != nil { bad += 1 }
    }
    for page in stride(from: 0, to: quarter, by: pageSize) {
      if Pattern.mismatch(UnsafeRawBufferPointer(start: base + page, count: pageSize), backingOffset: UInt64(page)) != nil { bad += 1 }
    }
    munmap(moved, length / 2)
    withExtendedLifetime(client) {}
    print("remapped \(length / 2) bytes, \(bad) wrong pages")
    return bad == 0 ? 0 : 1
  }

  /// A region of LOOPS pages (default 8) between two guard regions of 4 pages
  /// each, registered with the same uffd and plugin (so that a decision the
  /// broker wrongly let spill over would land in them). The middle is touched
  /// by `threads` threads and checked; the guards are never touched and must
  /// stay unpopulated (mincore, which does not fault).
  private func guarded() throws -> Int32 {
    let pages = max(loops, 1)
    let guardPages = 4
    let memory = try AnonymousMemory(length: (pages + 2 * guardPages) * pageSize)
    let lower = memory.address
    let middle = lower + UInt(guardPages * pageSize)
    let upper = middle + UInt(pages * pageSize)
    let client = try BrokerClient(regions: [
      RegionSpec(id: 1, base: lower, length: guardPages * pageSize, plugin: plugin, argument: regionArgument, backingOffset: 1 << 40),
      RegionSpec(id: 2, base: middle, length: pages * pageSize, plugin: plugin, argument: regionArgument),
      RegionSpec(id: 3, base: upper, length: guardPages * pageSize, plugin: plugin, argument: regionArgument, backingOffset: 2 << 40),
    ], name: "fixture-guarded")
    let threadCount = max(threads, 1)
    let workers = (0..<threadCount).map { index in
      spawnThread {
        for page in stride(from: index, to: pages, by: threadCount) {
          _ = UnsafeRawPointer(bitPattern: middle + UInt(page * 4096))!.load(as: UInt8.self)
        }
      }
    }
    workers.forEach { pthread_join($0, nil) }
    var bad = 0
    for page in 0..<pages {
      let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: middle + UInt(page * pageSize)), count: pageSize)
      if Pattern.mismatch(bytes, backingOffset: UInt64(page * pageSize)) != nil { bad += 1 }
    }
    var resident = 0
    for base in [lower, upper] {
      var vector = [UInt8](repeating: 0, count: guardPages)
      guard mincore(UnsafeMutableRawPointer(bitPattern: base), guardPages * pageSize, &vector) == 0 else {
        print("mincore failed: \(errno)")
        return 1
      }
      resident += vector.filter { $0 & 1 != 0 }.count
    }
    withExtendedLifetime(client) {}
    print("verified \(pages) pages, \(bad) wrong, \(resident) guard pages written")
    return bad == 0 && resident == 0 ? 0 : 1
  }

  /// Registers small-page memory as regions of 1 GiB pages (the broker serves
  /// at most 2 MiB ones) and of 64 KiB pages (no page size of this kernel):
  /// both must be refused. Prints both refusals on one line.
  private func badPageSize() -> Int32 {
    guard let memory = try? AnonymousMemory(length: mib << 20) else { return 2 }
    var refusals: [String] = []
    for size in [1 << 30, 64 << 10] {
      do {
        let client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, pageSize: size, plugin: plugin)], name: "fixture-bad-page-size")
        withExtendedLifetime(client) {}
        print("accepted \(size)")
        return 1
      } catch {
        refusals.append("refused \(size): \(error)")
      }
    }
    print(refusals.joined(separator: "; "))
    return 0
  }

  private func expectRefusal(plugin name: String) -> Int32 {
    do {
      let memory = try AnonymousMemory(length: 1 << 20)
      _ = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: name)])
      print("registered, but a refusal was expected")
      return 1
    } catch {
      print("refused: \(error)")
      return error.broker == nil ? 1 : 0
    }
  }

  /// Faults from several threads, and the process exits while they are blocked.
  private func exitMidway() throws -> Int32 {
    let memory = try AnonymousMemory(length: mib << 20)
    let client = try register(memory)
    let address = memory.address
    for index in 0..<threads {
      _ = spawnThread { _ = UnsafeRawPointer(bitPattern: address + UInt(index * 4096))!.load(as: UInt8.self) }
    }
    usleep(200_000)
    print("exiting with faults in flight")
    fflush(nil)
    withExtendedLifetime(client) {}
    _exit(0)
  }
}
