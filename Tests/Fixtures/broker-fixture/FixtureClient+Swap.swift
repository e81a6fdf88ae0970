import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport
import Synchronization

extension FixtureClient {
  /// Writes the pattern, then swaps the region out `loops` times while a
  /// thread keeps writing sequence numbers to pages; after each swap-out every
  /// page must hold the pattern, except word 0 of written pages, which must
  /// hold the last number written there. No write may be lost.
  func swapLoop() throws -> Int32 {
    let (memory, spec, client) = try patternedRegion(name: "fixture-swap")
    let pages = memory.length / pageSize
    let address = memory.address
    let lastWritten = UnsafeMutablePointer<UInt64>.allocate(capacity: pages)
    lastWritten.initialize(repeating: 0, count: pages)
    let written = UInt(bitPattern: lastWritten)
    var dropped = 0
    var kept = 0
    var bad = 0
    for loop in 0..<max(loops, 1) {
      let stop = Atomic<Bool>(false)
      let writer = spawnThread {
        var state = UInt64(loop + 1) &* 0x2545_F491_4F6C_DD1D
        var sequence = UInt64(loop) << 32
        while !stop.load(ordering: .relaxed) {
          state ^= state << 13; state ^= state >> 7; state ^= state << 17
          let page = Int(state % UInt64(pages))
          sequence += 1
          UnsafeMutablePointer<UInt64>(bitPattern: address + UInt(page * 4096))!.pointee = sequence
          UnsafeMutablePointer<UInt64>(bitPattern: written)![page] = sequence
        }
      }
      let report = try client.swapOut(spec)
      stop.store(true, ordering: .relaxed)
      pthread_join(writer, nil)
      dropped += report.pagesDropped
      kept += report.pagesKept
      for page in 0..<pages {
        let bytes = UnsafeRawBufferPointer(start: memory.base + page * pageSize, count: pageSize)
        let words = bytes.bindMemory(to: UInt64.self)
        let expectedFirst = lastWritten[page] != 0 ? lastWritten[page] : Pattern.word(backingOffset: UInt64(page * pageSize), wordIndex: 0)
        var wrong = words[0] != expectedFirst
        if !wrong, let index = Pattern.mismatch(UnsafeRawBufferPointer(rebasing: bytes[8...]), backingOffset: UInt64(page * pageSize) + 8) {
          wrong = index >= 0
        }
        if wrong { bad += 1 }
      }
    }
    lastWritten.deallocate()
    withExtendedLifetime(client) {}
    print("swap loops \(max(loops, 1)), pages dropped \(dropped), kept \(kept), \(bad) wrong")
    return bad == 0 && dropped > 0 ? 0 : 1
  }
}

extension FixtureClient {
  /// Fills the region with the pattern, swaps all of it out once, then checks
  /// every page (read back through the plugin if it was dropped). Prints how
  /// the swap-out ended: its report, or its error.
  func swapOnce() throws -> Int32 {
    let (memory, spec, client) = try patternedRegion(name: "fixture-swap-once")
    let pages = memory.length / pageSize
    let result: String
    do {
      let report = try client.swapOut(spec)
      result = "swap-out dropped \(report.pagesDropped), kept \(report.pagesKept)"
    } catch {
      result = "swap-out failed: " + (error.broker.map { "\($0.code): \($0.message)" } ?? "\(error)")
    }
    let bad = wrongPages(memory)
    withExtendedLifetime(client) {}
    print("\(result); verified \(pages) pages, \(bad) wrong")
    return bad == 0 ? 0 : 1
  }

  /// Fills the region with the pattern, swaps all of it out, passes the gate
  /// ("swapped": the test may kill the plugin or the broker meanwhile), then
  /// checks every page. A page whose stored copy was lost must fail with
  /// SIGBUS, so this either prints its count of wrong pages or dies.
  func swapHold() throws -> Int32 {
    let (memory, spec, client) = try patternedRegion(name: "fixture-swap-hold")
    let pages = memory.length / pageSize
    let report = try client.swapOut(spec)
    gate("swapped \(report.pagesDropped)", client: client)
    let bad = wrongPages(memory)
    withExtendedLifetime(client) {}
    print("swap held: dropped \(report.pagesDropped); verified \(pages) pages, \(bad) wrong")
    return bad == 0 ? 0 : 1
  }

  /// Fills the region with the pattern, moves all of it elsewhere (mremap), maps
  /// a buffer of 0x5A bytes at its old address, then swaps the region out: the
  /// swap-out must work where the region lies now, and leave the buffer alone.
  func swapAfterMove() throws -> Int32 {
    let (memory, spec, client) = try patternedRegion(name: "fixture-swap-moved")
    let length = memory.length
    guard let reserved = mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), reserved != MAP_FAILED,
          let moved = clinux_mremap(memory.base, length, length, clinux_mremap_maymove | clinux_mremap_fixed, reserved), moved != MAP_FAILED,
          let buffer = mmap(memory.base, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0), buffer != MAP_FAILED
    else {
      print("mremap or mmap failed: \(errno)")
      return 1
    }
    buffer.initializeMemory(as: UInt8.self, repeating: 0x5A, count: length)
    let report = try client.swapOut(spec)
    let pages = length / pageSize
    let wrong = (0..<pages).filter { page in
      Pattern.mismatch(UnsafeRawBufferPointer(start: moved + page * pageSize, count: pageSize), backingOffset: UInt64(page * pageSize)) != nil
    }.count
    let intact = !UnsafeRawBufferPointer(start: buffer, count: length).contains { $0 != 0x5A }
    munmap(moved, length)
    withExtendedLifetime(client) {}
    print("swap after a move: dropped \(report.pagesDropped); moved pages wrong \(wrong); buffer intact \(intact)")
    return wrong == 0 && intact ? 0 : 1
  }

  /// Pages of `memory` that do not hold the pattern (each read, so faulted in if need be).
  private func wrongPages(_ memory: AnonymousMemory) -> Int {
    (0..<memory.length / pageSize).filter { page in
      Pattern.mismatch(UnsafeRawBufferPointer(start: memory.base + page * pageSize, count: pageSize), backingOffset: UInt64(page * pageSize)) != nil
    }.count
  }

  /// A registered region of `mib` MiB whose every page its writes filled with the pattern.
  private func patternedRegion(name: String) throws -> (AnonymousMemory, RegionSpec, BrokerClient) {
    let memory = try AnonymousMemory(length: mib << 20)
    let spec = RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin, argument: regionArgument)
    let client = try BrokerClient(regions: [spec], name: name)
    for page in 0..<memory.length / pageSize {
      Pattern.fill(UnsafeMutableRawBufferPointer(start: memory.base + page * pageSize, count: pageSize), backingOffset: UInt64(page * pageSize))
    }
    return (memory, spec, client)
  }
}
