import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport
import Synchronization

// The mover race (the memory issue's race test): two threads move memory into
// each other's holes, round after round, while a reader faults pages and a
// dropper drops others (MADV_DONTNEED), and every 25 rounds the process forks
// a child that checks every page of its copy. Against an exact model:
//
//   region: [round 0: X Z][round 1: X Z]...[W: 64 pages]
//   round r: A moves X_r to a reserved Y_r; B waits for the hole and moves Z_r
//   into X_r. Afterwards Y_r holds X_r's offsets, X_r holds Z_r's, Z_r is gone.
//   W: the dropper's pages; a dropped page reads zeros (the pattern plugin
//   serves zeros for removed offsets), every other page the pattern.
//
// The reader reads W (pattern or zeros: a drop may race it) and rounds no mover
// touches yet (exact). The dropper holds `wLock` while it drops and records, and
// the fork takes it too, so a child's W is exactly the model's. A child checks
// every page it has (faulting the unfilled ones to its own uffd) and exits 0 if
// all were right. Last line: "mover race: R rounds, C children, W wrong".
extension FixtureClient {
  func moverRace() throws -> Int32 {
    let rounds = max(loops, 1)
    let slot = 4 * pageSize
    let wPages = 64
    let memory = try AnonymousMemory(length: rounds * 2 * slot + wPages * pageSize)
    let client = try register(memory)
    let base = UInt(bitPattern: memory.base)
    let w = base + UInt(rounds * 2 * slot)
    let wOffset = UInt64(rounds * 2 * slot)
    let size = pageSize
    let model = MoverModel(rounds: rounds, wPages: wPages)
    let stop = Atomic<Bool>(false)
    let current = Atomic<Int>(0)
    let readerWrong = Atomic<Int>(0)

    let reader = spawnThread {
      var state: UInt64 = 0x2545_F491_4F6C_DD1D
      while !stop.load(ordering: .relaxed) {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        if state & 1 == 0 {
          let page = Int(state >> 8) % wPages
          let word = UnsafePointer<UInt64>(bitPattern: w + UInt(page * size))!.pointee
          if word != 0 && word != Pattern.word(backingOffset: wOffset + UInt64(page * size), wordIndex: 0) { readerWrong.add(1, ordering: .relaxed) }
        } else {
          // A round no mover touches yet (its lock keeps the movers out while
          // it is read): it still holds its own offsets.
          let ahead = current.load(ordering: .acquiring) + 2
          guard ahead < rounds else { continue }
          let round = ahead + Int(state >> 8) % (rounds - ahead)
          let page = Int(state >> 40) % 8
          let offset = UInt64(2 * round * slot + page * size)
          model.reading(round) {
            if UnsafePointer<UInt64>(bitPattern: base + UInt(offset))!.pointee != Pattern.word(backingOffset: offset, wordIndex: 0) {
              readerWrong.add(1, ordering: .relaxed)
            }
          }
        }
      }
    }
    let dropper = spawnThread {
      var state: UInt64 = 0x9E37_79B9_7F4A_7C15
      while !stop.load(ordering: .relaxed) {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        let page = Int(state >> 8) % (wPages - 4)
        let count = 1 + Int(state >> 40) % 4
        model.withWLock {
          madvise(UnsafeMutableRawPointer(bitPattern: w + UInt(page * size)), count * size, MADV_DONTNEED)
          for dropped in page..<page + count { model.dropped[dropped] = true }
        }
        for _ in 0..<64 { sched_yield() }  // pace: the movers, not the drops, are the point
      }
    }

    var wrong = 0
    var children = 0
    var destinations: [UnsafeMutableRawPointer] = []
    for round in 0..<rounds {
      current.store(round, ordering: .releasing)
      model.lock(round)  // a reader that picked this round before it was current finishes first
      defer { model.unlock(round) }
      let x = memory.base + 2 * round * slot
      let z = x + slot
      _ = clinux_touch(x)
      _ = clinux_touch(z + pageSize)
      guard let y = mmap(nil, slot, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), y != MAP_FAILED else { return 1 }
      destinations.append(y)
      let xAddress = UInt(bitPattern: x), yAddress = UInt(bitPattern: y)
      let mover = spawnThread {
        _ = clinux_mremap(UnsafeMutableRawPointer(bitPattern: xAddress), slot, slot, clinux_mremap_maymove | clinux_mremap_fixed, UnsafeMutableRawPointer(bitPattern: yAddress))
      }
      var vector: UInt8 = 0
      while mincore(x, pageSize, &vector) == 0 { sched_yield() }
      guard clinux_mremap(z, slot, slot, clinux_mremap_maymove | clinux_mremap_fixed, x) != MAP_FAILED else { return 1 }
      pthread_join(mover, nil)
      if round % 25 == 24 || round == rounds - 1 {
        children += 1
        let status = model.withWLock { () -> Int32 in
          let child = fork()
          if child == 0 {
            _exit(Self.moverRaceWrong(base: base, w: w, destinations: destinations, model: model, done: round + 1, slot: slot, pageSize: size) == 0 ? 0 : 1)
          }
          return child
        }
        var result: Int32 = 0
        waitpid(status, &result, 0)
        if result != 0 { wrong += 1000 }  // a child found a wrong page (or died)
      }
    }
    stop.store(true, ordering: .relaxed)
    pthread_join(reader, nil)
    pthread_join(dropper, nil)
    let final = Self.moverRaceWrong(base: base, w: w, destinations: destinations, model: model, done: rounds, slot: slot, pageSize: size)
    wrong += readerWrong.load(ordering: .relaxed) + final
    destinations.forEach { munmap($0, slot) }
    withExtendedLifetime(client) {}
    if wrong > 0 { print("children wrong \(wrong / 1000), reads wrong \(readerWrong.load(ordering: .relaxed)), final pages wrong \(final)") }
    print("mover race: \(rounds) rounds, \(children) children, \(wrong) wrong")
    return wrong == 0 ? 0 : 1
  }

  /// Wrong pages of the layout after `done` rounds (every page read, whole).
  private static func moverRaceWrong(base: UInt, w: UInt, destinations: [UnsafeMutableRawPointer], model: MoverModel, done: Int, slot: Int, pageSize: Int) -> Int {
    var wrong = 0
    let check = { (address: UInt, offset: UInt64) in
      if Pattern.mismatch(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: address), count: pageSize), backingOffset: offset) != nil { wrong += 1 }
    }
    for round in 0..<model.rounds {
      let x = base + UInt(2 * round * slot)
      for page in stride(from: 0, to: slot, by: pageSize) {
        if round < done {
          check(UInt(bitPattern: destinations[round]) + UInt(page), UInt64(2 * round * slot + page))  // X's pages, at Y
          check(x + UInt(page), UInt64(2 * round * slot + slot + page))  // Z's pages, at X
        } else {
          check(x + UInt(page), UInt64(2 * round * slot + page))
          check(x + UInt(slot + page), UInt64(2 * round * slot + slot + page))
        }
      }
    }
    for page in 0..<model.wPages {
      let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: w + UInt(page * pageSize)), count: pageSize)
      if model.dropped[page] {
        if bytes.contains(where: { $0 != 0 }) { wrong += 1 }
      } else {
        check(w + UInt(page * pageSize), UInt64(2 * model.rounds * slot + page * pageSize))
      }
    }
    return wrong
  }
}

/// What the mover race's W area must read; `wLock` orders drops and forks.
final class MoverModel: @unchecked Sendable {
  // @unchecked: `dropped` is read and written with `wLock` held, or after the threads are joined.
  let rounds: Int
  let wPages: Int
  var dropped: [Bool]
  private var wLock = pthread_mutex_t()
  /// Per round: read-locked by the reader while it reads the round, write-locked while it moves.
  private let roundLocks: UnsafeMutablePointer<pthread_rwlock_t>

  init(rounds: Int, wPages: Int) {
    self.rounds = rounds
    self.wPages = wPages
    dropped = Array(repeating: false, count: wPages)
    pthread_mutex_init(&wLock, nil)
    roundLocks = .allocate(capacity: rounds)
    for round in 0..<rounds { pthread_rwlock_init(roundLocks + round, nil) }
  }

  func reading(_ round: Int, _ body: () -> Void) {
    pthread_rwlock_rdlock(roundLocks + round)
    defer { pthread_rwlock_unlock(roundLocks + round) }
    body()
  }

  func lock(_ round: Int) { pthread_rwlock_wrlock(roundLocks + round) }
  func unlock(_ round: Int) { pthread_rwlock_unlock(roundLocks + round) }

  func withWLock<T>(_ body: () -> T) -> T {
    pthread_mutex_lock(&wLock)
    defer { pthread_mutex_unlock(&wLock) }
    return body()
  }
}
