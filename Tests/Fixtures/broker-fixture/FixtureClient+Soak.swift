import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport
import Synchronization

// The soak (issue 6): one region served by the `pattern` plugin, THREADS
// threads mixing faults (reads and writes of words), MADV_DONTNEED of page
// ranges, mremap swaps of equal ranges and munmaps, against an exact model of
// every page, until LOOPS thousand faults were taken.
//
//   broker-fixture client soak MIB THREADS PLUGIN KILOFAULTS
//
// Environment: FIXTURE_SOAK_SECONDS (stop after that long even if fewer faults
// were taken), FIXTURE_SOAK_SEED (the random seed; printed, for a replay),
// FIXTURE_SOAK_SWAP_ZONE (pages per lane where swaps happen; default 64: the
// broker's region table costs O(pieces) per event, and every swap cuts pieces),
// FIXTURE_SOAK_DROP (the most pages one DONTNEED drops; default 128),
// FIXTURE_SOAK_UNMAP (at most 1/N of a lane is unmapped; default 64).
//
// The region is cut into one lane per thread. A lane's owner alone writes,
// drops (DONTNEED), swaps and unmaps its pages; the other threads read them
// now and then ("racy" reads) under the lane's read lock, so a lane's pages
// can be faulted by two threads at once and a read can overlap a DONTNEED.
// Writes, swaps and unmaps take the lane's write lock, so nothing else touches
// the lane while its content or layout changes. A lane's first three quarters
// are its work area: the first half of it (where the swap zone lies) is
// dropped again and again; the second half never is, so many region offsets
// stay un-removed: a fault routed to the wrong offset (after a move) then
// reads the pattern where zeros belong, or the reverse. The last quarter is a
// pool of fresh pages for race ops: a helper thread faults 1-4 of them while
// the owner drops them (a decision made before the drop must not land after
// it; since a removed offset reads zeros forever, only a fresh page tells).
//
// The model, per page slot (the address base + slot * pageSize): the region
// page it holds now (`origin`: mremap moves offsets with the pages), and a
// state word: populated, removed (the plugin serves zeros for it: dropped at
// least once), unmapped, and which of the 8 probe words (every 512th byte)
// were written since (their values in `values`). A page reads: a written
// probe word's value, else zeros if removed, else Pattern at its origin.
//
// Checks: every word read is compared with the model. A read of a page the
// model says is not populated (a fault) checks the whole page; other reads
// check the 8 probe words and 4 more. A racy read may overlap the owner's
// DONTNEED of the page, so it accepts the expected word or zero (the owner's
// next read, and the final pass, are exact: a stale page restored after
// madvise returned is caught there). At the end every live page is checked
// in full. Faults are counted as populated-bit transitions (a page first
// touched since the start or its last drop; swaps move the bit with the page):
// exact, or short by the odd page another thread faulted just before the
// owner's drop took it away again; never more than were taken.
//
// Last line: "soak faults N, dontneeds D, swaps S, unmaps U, wrong W"; exit 0
// only if W == 0 and no system call failed.
extension FixtureClient {
  func soak() throws -> Int32 {
    let pages = (max(mib, 1) << 20) / pageSize
    let lanes = max(threads, 1)
    let target = max(loops, 1) * 1000
    let environment = { (name: String) in getenv(name).map { String(cString: $0) } }
    let seconds = environment("FIXTURE_SOAK_SECONDS").flatMap(Double.init)
    let seed = environment("FIXTURE_SOAK_SEED").flatMap { UInt64($0) } ?? UInt64(UInt(bitPattern: time(nil))) &* 0x9E37_79B9 ^ UInt64(getpid())
    let swapZone = environment("FIXTURE_SOAK_SWAP_ZONE").flatMap { Int($0) } ?? 64
    guard pages / lanes >= 64 else {
      print("soak: \(pages) pages are too few for \(lanes) lanes")
      return 2
    }
    let memory = try AnonymousMemory(length: pages * pageSize)
    let client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin)], name: "fixture-soak")
    let model = SoakModel(base: memory.address, pages: pages, pageSize: pageSize, lanes: lanes, swapZone: swapZone, target: target)
    print("soak: \(pages) pages, \(lanes) threads, target \(target) faults, seed \(seed)\(seconds.map { ", at most \($0) s" } ?? "")")
    fflush(nil)

    let started = now()
    let deadline = seconds.map { started + $0 }
    let workers = (0..<lanes).map { lane in
      spawnThread {
        var worker = SoakWorker(model: model, lane: lane, seed: seed &+ UInt64(lane) &* 0xD1B5_4A32_D192_ED03)
        worker.run(deadline: deadline)
      }
    }
    workers.forEach { pthread_join($0, nil) }
    let elapsed = now() - started

    // Every live page, in full and exactly.
    var finalFaults = 0
    var finalWrong = 0
    for slot in 0..<pages {
      let state = model.state[slot].load(ordering: .acquiring)
      if state & SoakModel.unmapped != 0 { continue }
      if !model.check(slot: slot, state: state, firstWord: 0, full: true, tolerant: false, probes: nil) { finalWrong += 1 }
      if state & SoakModel.populated == 0 {
        finalFaults += 1
        if state & SoakModel.removed == 0 { model.patternFaults.add(1, ordering: .relaxed) }
      }
    }
    model.faults.add(finalFaults, ordering: .relaxed)
    model.wrong.add(finalWrong, ordering: .relaxed)

    let c = model.counters()
    let live = (0..<pages).filter { model.state[$0].load(ordering: .relaxed) & SoakModel.unmapped == 0 }.count
    print("soak: \(Double(Int(elapsed * 10)) / 10) s, \(Int(Double(c.faults) / max(elapsed, 0.001))) faults/s; faults on un-removed pages \(c.patternFaults), on removed pages \(c.faults - c.patternFaults), in the final pass \(finalFaults); reads \(c.reads), racy reads \(c.racyReads) (\(c.racedDrops) overlapped a DONTNEED of their page), fault/DONTNEED races \(c.races) on \(c.racedPages) pages (the fault's pattern seen on \(c.racesWonByFault)), writes \(c.writes), swapped pages \(c.swappedPages) (swaps skipped at VMA boundaries \(c.swapsSkipped)), live pages \(live), wrong in the final pass \(finalWrong), failed system calls \(c.errors)")
    print("soak faults \(c.faults), dontneeds \(c.dontneeds), swaps \(c.swaps), unmaps \(c.unmaps), wrong \(c.wrong)")
    fflush(nil)
    withExtendedLifetime(client) {}
    withExtendedLifetime(memory) {}
    return c.wrong == 0 && c.errors == 0 ? 0 : 1
  }
}

/// A line to stderr (unbuffered: threads may write at once).
private func writeError(_ line: String) {
  var line = line
  line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Monotonic seconds.
private func now() -> Double {
  var spec = timespec()
  clock_gettime(CLOCK_MONOTONIC, &spec)
  return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
}

/// What every page slot of the region should hold, shared by the soak's threads.
final class SoakModel: @unchecked Sendable {
  // @unchecked: `origin` and `values` of a lane change only under its write
  // lock (held by its owner); `state` words are atomics.
  static let populated: UInt32 = 1
  static let removed: UInt32 = 2
  static let unmapped: UInt32 = 4
  static let probeShift: UInt32 = 8
  static let probeBits: UInt32 = 0xff << 8
  static let probes = 8

  let base: UInt
  let pages: Int
  let pageSize: Int
  let wordsPerPage: Int
  /// Words between probe words (the 8 words a write may hit).
  let probeStride: Int
  let lanes: Int
  let lanePages: Int
  let swapZone: Int
  let target: Int
  /// The region page (offset / pageSize) each slot holds now.
  let origin: UnsafeMutablePointer<UInt32>
  let state: UnsafeMutablePointer<Atomic<UInt32>>
  /// The last value written to each probe word of each slot.
  let values: UnsafeMutablePointer<UInt64>
  let locks: UnsafeMutablePointer<pthread_rwlock_t>

  let faults = Atomic<Int>(0)
  let patternFaults = Atomic<Int>(0)
  let dontneeds = Atomic<Int>(0)
  let swaps = Atomic<Int>(0)
  let swappedPages = Atomic<Int>(0)
  let swapsSkipped = Atomic<Int>(0)
  let unmaps = Atomic<Int>(0)
  let reads = Atomic<Int>(0)
  let racyReads = Atomic<Int>(0)
  /// Racy reads that found zeros where the model (read just before) had data: they overlapped the owner's DONTNEED.
  let racedDrops = Atomic<Int>(0)
  /// Race ops, their pages, and the pages whose helper read the pattern (its fault won).
  let races = Atomic<Int>(0)
  let racedPages = Atomic<Int>(0)
  let racesWonByFault = Atomic<Int>(0)
  let writes = Atomic<Int>(0)
  let wrong = Atomic<Int>(0)
  let errors = Atomic<Int>(0)
  private let reported = Atomic<Int>(0)

  init(base: UInt, pages: Int, pageSize: Int, lanes: Int, swapZone: Int, target: Int) {
    self.base = base
    self.pages = pages
    self.pageSize = pageSize
    wordsPerPage = pageSize / 8
    probeStride = pageSize / 8 / Self.probes
    self.lanes = lanes
    lanePages = pages / lanes
    self.swapZone = min(max(swapZone, 8), pages / lanes * 3 / 8)  // inside the lane's churn half
    self.target = target
    origin = .allocate(capacity: pages)
    state = .allocate(capacity: pages)
    values = .allocate(capacity: pages * Self.probes)
    locks = .allocate(capacity: lanes)
    for slot in 0..<pages {
      origin[slot] = UInt32(slot)
      (state + slot).initialize(to: Atomic<UInt32>(0))
    }
    values.initialize(repeating: 0, count: pages * Self.probes)
    for lane in 0..<lanes { pthread_rwlock_init(locks + lane, nil) }
  }

  /// Slots of lane `lane` (the last lane takes the remainder).
  func slots(ofLane lane: Int) -> Range<Int> {
    lane * lanePages..<(lane == lanes - 1 ? pages : (lane + 1) * lanePages)
  }

  func address(_ slot: Int) -> UInt { base + UInt(slot * pageSize) }

  func expected(slot: Int, state: UInt32, word: Int) -> UInt64 {
    if word % probeStride == 0 {
      let probe = word / probeStride
      if state & (1 << (Self.probeShift + UInt32(probe))) != 0 { return values[slot * Self.probes + probe] }
    }
    if state & Self.removed != 0 { return 0 }
    return Pattern.word(backingOffset: UInt64(origin[slot]) * UInt64(pageSize), wordIndex: word)
  }

  /// Reads word `firstWord` of the slot's page (the access that faults, if
  /// any), then the whole page (`full`) or the probe words and `probes` more;
  /// compares each with the model's `state` (read before the page). `tolerant`: zeros pass too.
  /// `countZeros`: count in `racedDrops` a tolerant check that found zeros where the model had data.
  func check(slot: Int, state: UInt32, firstWord: Int, full: Bool, tolerant: Bool, probes extra: (Int, Int, Int, Int)?, countZeros: Bool = false) -> Bool {
    let page = UnsafePointer<UInt64>(bitPattern: address(slot))!
    var racedDrop = false
    defer { if racedDrop && countZeros { racedDrops.add(1, ordering: .relaxed) } }
    func ok(_ word: Int) -> Bool {
      let got = page[word]
      let want = expected(slot: slot, state: state, word: word)
      if got == want { return true }
      if tolerant && got == 0 {
        racedDrop = true
        return true
      }
      report(slot: slot, state: state, word: word, got: got, want: want, tolerant: tolerant)
      return false
    }
    guard ok(firstWord) else { return false }
    if full {
      for word in 0..<wordsPerPage where !ok(word) { return false }
      return true
    }
    for probe in 0..<Self.probes where !ok(probe * probeStride) { return false }
    if let (a, b, c, d) = extra { return ok(a) && ok(b) && ok(c) && ok(d) }
    return true
  }

  private func report(slot: Int, state: UInt32, word: Int, got: UInt64, want: UInt64, tolerant: Bool) {
    guard reported.add(1, ordering: .relaxed).newValue <= 20 else { return }
    let note = Pattern.word(backingOffset: UInt64(origin[slot]) * UInt64(pageSize), wordIndex: word) == got ? " (the pattern of its origin)" : got == 0 ? " (zero)" : ""
    let line = "soak: WRONG slot \(slot) origin \(origin[slot]) state 0x\(String(state, radix: 16)) word \(word): got 0x\(String(got, radix: 16))\(note), want 0x\(String(want, radix: 16))\(tolerant ? " or 0" : "")\n"
    writeError(line)
  }

  func failed(_ what: String) {
    errors.add(1, ordering: .relaxed)
    writeError("soak: \(what) failed: \(String(cString: strerror(errno)))\n")
  }

  struct Counters {
    var faults, patternFaults, dontneeds, swaps, swappedPages, swapsSkipped, unmaps, reads, racyReads, racedDrops, races, racedPages, racesWonByFault, writes, wrong, errors: Int
  }

  func counters() -> Counters {
    Counters(
      faults: faults.load(ordering: .relaxed), patternFaults: patternFaults.load(ordering: .relaxed),
      dontneeds: dontneeds.load(ordering: .relaxed), swaps: swaps.load(ordering: .relaxed),
      swappedPages: swappedPages.load(ordering: .relaxed), swapsSkipped: swapsSkipped.load(ordering: .relaxed),
      unmaps: unmaps.load(ordering: .relaxed), reads: reads.load(ordering: .relaxed), racyReads: racyReads.load(ordering: .relaxed),
      racedDrops: racedDrops.load(ordering: .relaxed), races: races.load(ordering: .relaxed),
      racedPages: racedPages.load(ordering: .relaxed), racesWonByFault: racesWonByFault.load(ordering: .relaxed),
      writes: writes.load(ordering: .relaxed), wrong: wrong.load(ordering: .relaxed), errors: errors.load(ordering: .relaxed))
  }
}

/// Shared by a race op and its helper thread.
final class RaceFlags: Sendable {
  let start = Atomic<Bool>(false)
  let sawPattern = Atomic<Int>(0)
}

/// One soak thread: the owner of one lane.
struct SoakWorker {
  let model: SoakModel
  let lane: Int
  let slots: Range<Int>
  /// Where reads, writes, drops, swaps and unmaps happen: the lane but its pool.
  let work: Range<Int>
  /// The lane's last quarter: fresh pages (never touched, never removed) for race ops, taken in order.
  let pool: Range<Int>
  var poolNext: Int
  /// Dropped again and again (the work area's first half; the swap zone is its start).
  let churn: Range<Int>
  let zone: Range<Int>
  var random: UInt64
  var unmappedPages = 0
  /// A PROT_NONE reservation the first range of a swap moves through.
  var scratch: UInt = 0
  static let maxSwapPages = 16
  /// The first pages of a lane, dropped by its owner and read by the others most often.
  static let hotPages = 16
  static let maxDropPages = Int(getenv("FIXTURE_SOAK_DROP").map { String(cString: $0) }.flatMap { Int($0) } ?? 128)
  static let unmapShare = Int(getenv("FIXTURE_SOAK_UNMAP").map { String(cString: $0) }.flatMap { Int($0) } ?? 64)
  // MAP_FIXED_NOREPLACE (Linux 4.17); not imported by Glibc.
  static let mapFixedNoReplace: Int32 = 0x100000

  init(model: SoakModel, lane: Int, seed: UInt64) {
    self.model = model
    self.lane = lane
    slots = model.slots(ofLane: lane)
    pool = slots.upperBound - slots.count / 4..<slots.upperBound
    poolNext = pool.lowerBound
    work = slots.lowerBound..<pool.lowerBound
    churn = work.lowerBound..<work.lowerBound + work.count / 2
    zone = work.lowerBound..<work.lowerBound + model.swapZone
    random = seed | 1
  }

  mutating func next() -> UInt64 {
    // SplitMix64.
    random &+= 0x9E37_79B9_7F4A_7C15
    var z = random
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(max(bound, 1))) }

  func shouldStop(deadline: Double?) -> Bool {
    model.faults.load(ordering: .relaxed) >= model.target || model.errors.load(ordering: .relaxed) > 0
      || model.wrong.load(ordering: .relaxed) >= 100 || deadline.map { now() >= $0 } == true
  }

  mutating func run(deadline: Double?) {
    scratch = reserve(nil)
    var iteration = 0
    while true {
      // The clock is read every 64 operations.
      if iteration % 64 == 0 || model.faults.load(ordering: .relaxed) >= model.target {
        if shouldStop(deadline: iteration % 64 == 0 ? deadline : nil) { break }
      }
      iteration += 1
      let roll = below(1000)
      switch roll {
      case 0..<440: readRun()
      case 440..<590: writeRun()
      case 590..<840: dontneed()
      case 840..<920: racyRead()
      case 920..<980: swap()
      case 980..<995: race()
      default: unmap()
      }
    }
    if scratch != 0 { munmap(UnsafeMutableRawPointer(bitPattern: scratch), Self.maxSwapPages * model.pageSize) }
  }

  /// A PROT_NONE reservation of `maxSwapPages` pages at `address` (nil: anywhere); 0 if that failed.
  func reserve(_ address: UInt?, pages: Int = SoakWorker.maxSwapPages) -> UInt {
    let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (address == nil ? 0 : Self.mapFixedNoReplace)
    let hint = address.flatMap { UnsafeMutableRawPointer(bitPattern: $0) }
    guard let pointer = mmap(hint, pages * model.pageSize, PROT_NONE, flags, -1, 0), pointer != MAP_FAILED else { return 0 }
    if let address, UInt(bitPattern: pointer) != address {
      munmap(pointer, pages * model.pageSize)  // an old kernel took it as a hint
      return 0
    }
    return UInt(bitPattern: pointer)
  }

  /// Records that the slot was touched; counts a fault if the model had it unpopulated.
  func touched(_ slot: Int) {
    let old = model.state[slot].bitwiseOr(SoakModel.populated, ordering: .acquiringAndReleasing).oldValue
    if old & SoakModel.populated == 0 {
      model.faults.add(1, ordering: .relaxed)
      if old & SoakModel.removed == 0 { model.patternFaults.add(1, ordering: .relaxed) }
    }
  }

  /// Reads a run of pages of the lane (no lock: only this thread changes them), exactly.
  mutating func readRun() {
    let length = 1 + below(32)
    let start = work.lowerBound + below(work.count - length + 1)
    for slot in start..<start + length {
      let state = model.state[slot].load(ordering: .acquiring)
      if state & SoakModel.unmapped != 0 { continue }
      let fault = state & SoakModel.populated == 0
      let extra = (below(model.wordsPerPage), below(model.wordsPerPage), below(model.wordsPerPage), below(model.wordsPerPage))
      if !model.check(slot: slot, state: state, firstWord: below(model.wordsPerPage), full: fault, tolerant: false, probes: extra) {
        model.wrong.add(1, ordering: .relaxed)
      }
      touched(slot)
      model.reads.add(1, ordering: .relaxed)
    }
  }

  /// Writes one probe word in each page of a run (under the lane's write lock);
  /// a page that was not populated is then checked in full.
  mutating func writeRun() {
    let length = 1 + below(8)
    let start = work.lowerBound + below(work.count - length + 1)
    pthread_rwlock_wrlock(model.locks + lane)
    defer { pthread_rwlock_unlock(model.locks + lane) }
    for slot in start..<start + length {
      let state = model.state[slot].load(ordering: .acquiring)
      if state & SoakModel.unmapped != 0 { continue }
      let probe = below(SoakModel.probes)
      let value = next()
      UnsafeMutablePointer<UInt64>(bitPattern: model.address(slot))![probe * model.probeStride] = value
      model.values[slot * SoakModel.probes + probe] = value
      let written = state | SoakModel.populated | (1 << (SoakModel.probeShift + UInt32(probe)))
      touched(slot)
      model.state[slot].store(written, ordering: .releasing)
      if state & SoakModel.populated == 0 || below(4) == 0 {
        if !model.check(slot: slot, state: written, firstWord: probe * model.probeStride, full: state & SoakModel.populated == 0, tolerant: false, probes: nil) {
          model.wrong.add(1, ordering: .relaxed)
        }
      }
      model.writes.add(1, ordering: .relaxed)
    }
  }

  /// MADV_DONTNEED of a run in the churn half (no lock: racy readers may be
  /// reading these pages); the model learns it once madvise has returned.
  mutating func dontneed() {
    // A third of the drops hit the lane's first 16 pages, where the other threads' racy reads go half the time.
    let hot = below(3) == 0
    let length = 1 + below(hot ? 8 : Self.maxDropPages)
    let start = hot ? work.lowerBound + below(Self.hotPages - length + 1) : churn.lowerBound + below(churn.count - length + 1)
    var slot = start
    while slot < start + length {
      // Runs of live slots (an unmapped one would fail the whole madvise with ENOMEM).
      guard model.state[slot].load(ordering: .acquiring) & SoakModel.unmapped == 0 else {
        slot += 1
        continue
      }
      var end = slot + 1
      while end < start + length && model.state[end].load(ordering: .acquiring) & SoakModel.unmapped == 0 { end += 1 }
      if madvise(UnsafeMutableRawPointer(bitPattern: model.address(slot)), (end - slot) * model.pageSize, MADV_DONTNEED) != 0 {
        model.failed("madvise(MADV_DONTNEED)")
        return
      }
      model.dontneeds.add(1, ordering: .relaxed)
      for dropped in slot..<end {
        var old = model.state[dropped].load(ordering: .acquiring)
        while true {
          let new = (old & ~(SoakModel.populated | SoakModel.probeBits)) | SoakModel.removed
          let (exchanged, original) = model.state[dropped].compareExchange(expected: old, desired: new, ordering: .acquiringAndReleasing)
          if exchanged { break }
          old = original
        }
      }
      slot = end
    }
  }

  /// A fault racing a DONTNEED of its page, on purpose: a helper thread reads
  /// 1-4 fresh pages of the pool (each a fault the plugin answers with the
  /// pattern) while this thread drops them. The helper must see the pattern or
  /// zeros; once madvise has returned the pages must read zeros, whoever won
  /// (a decision made before the drop must not be applied after it). Under
  /// the lane's write lock, so no racy reader from elsewhere joins in.
  mutating func race() {
    let length = min(1 + below(4), pool.upperBound - poolNext)
    guard length > 0 else { return }
    let pages = poolNext..<poolNext + length
    poolNext += length
    pthread_rwlock_wrlock(model.locks + lane)
    defer { pthread_rwlock_unlock(model.locks + lane) }
    let model = self.model
    let flags = RaceFlags()
    let firstWords = (0..<length).map { _ in below(model.wordsPerPage) }
    let helper = spawnThread {
      while !flags.start.load(ordering: .acquiring) {}
      for (slot, first) in zip(pages, firstWords) {
        // The faulting access: the fault won if it brought the pattern.
        if UnsafePointer<UInt64>(bitPattern: model.address(slot))![first] != 0 { flags.sawPattern.add(1, ordering: .relaxed) }
        // Fresh: the pattern (state 0), or zeros once dropped.
        if !model.check(slot: slot, state: 0, firstWord: first, full: true, tolerant: true, probes: nil) {
          model.wrong.add(1, ordering: .relaxed)
        }
        let old = model.state[slot].bitwiseOr(SoakModel.populated, ordering: .acquiringAndReleasing).oldValue
        if old & SoakModel.populated == 0 {
          model.faults.add(1, ordering: .relaxed)
          if old & SoakModel.removed == 0 { model.patternFaults.add(1, ordering: .relaxed) }
        }
      }
    }
    let delay = UInt32(below(300))
    flags.start.store(true, ordering: .releasing)
    if delay > 50 { usleep(delay) }
    // The populated bit is cleared before the drop: the helper counts a fault
    // when it finds the bit clear; the exact check below counts one only if the
    // helper did not touch the page after the bit was cleared, so the drop took
    // the page away and that read faults. Never more than were taken.
    for slot in pages { model.state[slot].bitwiseAnd(~SoakModel.populated, ordering: .acquiringAndReleasing) }
    let dropped = madvise(UnsafeMutableRawPointer(bitPattern: model.address(pages.lowerBound)), length * model.pageSize, MADV_DONTNEED) == 0
    if !dropped { model.failed("madvise(MADV_DONTNEED) of a race") }
    for slot in pages { model.state[slot].bitwiseOr(SoakModel.removed, ordering: .acquiringAndReleasing) }
    model.dontneeds.add(1, ordering: .relaxed)
    pthread_join(helper, nil)
    // Zeros now, exactly.
    for slot in pages {
      let state = model.state[slot].load(ordering: .acquiring)
      if !model.check(slot: slot, state: state, firstWord: 0, full: true, tolerant: false, probes: nil) { model.wrong.add(1, ordering: .relaxed) }
      touched(slot)
    }
    model.races.add(1, ordering: .relaxed)
    model.racedPages.add(length, ordering: .relaxed)
    model.racesWonByFault.add(flags.sawPattern.load(ordering: .relaxed), ordering: .relaxed)
  }

  /// Reads a few pages of another lane under its read lock, tolerantly (the
  /// owner may be dropping them meanwhile).
  mutating func racyRead() {
    guard model.lanes > 1 else { return readRun() }
    let other = (lane + 1 + below(model.lanes - 1)) % model.lanes
    let otherSlots = model.slots(ofLane: other)
    let otherWork = otherSlots.lowerBound..<otherSlots.upperBound - otherSlots.count / 4  // not its pool
    // Half in the other lane's first 16 pages, where its owner drops pages a third of the time;
    // else mostly in the churn half, where it drops the others.
    let hot = below(2) == 0
    let length = 1 + below(hot ? 4 : 8)
    let span = hot ? Self.hotPages : below(4) == 0 ? otherWork.count : otherWork.count / 2
    let start = otherWork.lowerBound + below(span - length + 1)
    pthread_rwlock_rdlock(model.locks + other)
    defer { pthread_rwlock_unlock(model.locks + other) }
    for slot in start..<start + length {
      let state = model.state[slot].load(ordering: .acquiring)
      if state & SoakModel.unmapped != 0 { continue }
      if !model.check(slot: slot, state: state, firstWord: below(model.wordsPerPage), full: state & SoakModel.populated == 0, tolerant: true, probes: nil, countZeros: true) {
        model.wrong.add(1, ordering: .relaxed)
      }
      touched(slot)
      model.racyReads.add(1, ordering: .relaxed)
    }
  }

  /// Swaps two equal ranges of the swap zone with mremap(MREMAP_FIXED)
  /// (A → scratch, B → A, scratch → B), under the lane's write lock.
  mutating func swap() {
    guard scratch != 0 else { return }
    pthread_rwlock_wrlock(model.locks + lane)
    defer { pthread_rwlock_unlock(model.locks + lane) }
    // 1, 2, 4, 8 or 16 pages; each range inside one mapping (contiguous origins) if possible.
    var length = 1 << below(5)
    var found: (Int, Int)?
    for attempt in 0..<16 {
      if attempt == 8 { length = 1 }
      let a = zone.lowerBound + below(zone.count - length + 1)
      let b = zone.lowerBound + below(zone.count - length + 1)
      guard abs(a - b) >= length, isSwappable(a, length), isSwappable(b, length) else { continue }
      found = (a, b)
      break
    }
    guard let (a, b) = found else { return }
    let bytes = length * model.pageSize
    let addressA = UnsafeMutableRawPointer(bitPattern: model.address(a))!
    let addressB = UnsafeMutableRawPointer(bitPattern: model.address(b))!
    let temporary = UnsafeMutableRawPointer(bitPattern: scratch)!
    let flags = clinux_mremap_maymove | clinux_mremap_fixed
    guard clinux_mremap(addressA, bytes, bytes, flags, temporary) == temporary else {
      // Contiguous origins may still be two mappings (the kernel does not always merge).
      if errno == EFAULT { model.swapsSkipped.add(1, ordering: .relaxed) } else { model.failed("mremap A → scratch") }
      return
    }
    guard clinux_mremap(addressB, bytes, bytes, flags, addressA) == addressA else {
      let failure = errno
      guard clinux_mremap(temporary, bytes, bytes, flags, addressA) == addressA else {
        model.failed("mremap scratch → A (undoing a swap)")
        return
      }
      errno = failure
      if failure == EFAULT { model.swapsSkipped.add(1, ordering: .relaxed) } else { model.failed("mremap B → A") }
      scratch = reserveScratchAgain(bytes)
      return
    }
    guard clinux_mremap(temporary, bytes, bytes, flags, addressB) == addressB else {
      model.failed("mremap scratch → B")
      return
    }
    for index in 0..<length {
      let (x, y) = (a + index, b + index)
      (model.origin[x], model.origin[y]) = (model.origin[y], model.origin[x])
      let stateX = model.state[x].load(ordering: .acquiring)
      model.state[x].store(model.state[y].load(ordering: .acquiring), ordering: .releasing)
      model.state[y].store(stateX, ordering: .releasing)
      for probe in 0..<SoakModel.probes {
        let (i, j) = (x * SoakModel.probes + probe, y * SoakModel.probes + probe)
        (model.values[i], model.values[j]) = (model.values[j], model.values[i])
      }
    }
    model.swaps.add(1, ordering: .relaxed)
    model.swappedPages.add(2 * length, ordering: .relaxed)
    scratch = reserveScratchAgain(bytes)
  }

  /// After scratch → B the first `bytes` of the scratch reservation are a hole: fill it
  /// again (never over someone else's mapping); if that is not possible, reserve anew.
  mutating func reserveScratchAgain(_ bytes: Int) -> UInt {
    if reserve(scratch, pages: bytes / model.pageSize) == scratch { return scratch }
    munmap(UnsafeMutableRawPointer(bitPattern: scratch + UInt(bytes)), Self.maxSwapPages * model.pageSize - bytes)
    return reserve(nil)
  }

  /// Live slots with contiguous origins: likely one mapping.
  func isSwappable(_ start: Int, _ length: Int) -> Bool {
    let first = model.origin[start]
    for index in 0..<length {
      if model.state[start + index].load(ordering: .relaxed) & SoakModel.unmapped != 0 || model.origin[start + index] != first + UInt32(index) { return false }
    }
    return true
  }

  /// Unmaps 1-4 live pages (at most 1/32 of the lane in all), under the lane's
  /// write lock; the hole is reserved again PROT_NONE so no other mapping lands there.
  mutating func unmap() {
    let length = 1 + below(4)
    guard unmappedPages + length <= work.count / Self.unmapShare else { return }
    let start = work.lowerBound + below(work.count - length + 1)
    pthread_rwlock_wrlock(model.locks + lane)
    defer { pthread_rwlock_unlock(model.locks + lane) }
    for slot in start..<start + length where model.state[slot].load(ordering: .relaxed) & SoakModel.unmapped != 0 { return }
    guard munmap(UnsafeMutableRawPointer(bitPattern: model.address(start)), length * model.pageSize) == 0 else {
      model.failed("munmap")
      return
    }
    for slot in start..<start + length { model.state[slot].store(SoakModel.unmapped, ordering: .releasing) }
    unmappedPages += length
    model.unmaps.add(1, ordering: .relaxed)
    _ = reserve(model.address(start), pages: length)
  }
}
