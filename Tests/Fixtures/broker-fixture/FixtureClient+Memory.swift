import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport
import Synchronization

// Scenarios where the broker's view of the client's memory and the kernel's
// could part: prefetch over dropped pages, grown regions, concurrent movers.
extension FixtureClient {
  /// 4 blocks of 16 pages, served by a plugin that fills whole blocks (its
  /// content: the pattern, or the file named by FIXTURE_FILE, whose plugin
  /// serves dropped pages as zeros). Per block: read
  /// its first page (the block arrives whole), drop pages 4 and 5 with
  /// MADV_DONTNEED, read page 4 again: the block's range copy now meets a
  /// present first page (EEXIST), and the broker must still fill page 4.
  func prefetchDontneed() throws -> Int32 {
    let blocks = 4
    let memory = try AnonymousMemory(length: blocks * 16 * pageSize)
    let client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin, argument: fixtureFile ?? "")], name: "fixture-prefetch-dontneed")
    for block in 0..<blocks {
      let first = memory.base + block * 16 * pageSize
      _ = clinux_touch(first)
      madvise(first + 4 * pageSize, 2 * pageSize, MADV_DONTNEED)
      _ = clinux_touch(first + 4 * pageSize)
      _ = clinux_touch(first + 5 * pageSize)
    }
    // The snapshot plugin serves dropped pages as zeros (fresh memory), the fixture's prefetch-refill its pattern again.
    let wrong = (0..<blocks * 16).filter { page in
      let address = memory.base + page * pageSize
      if fixtureFile != nil && (4..<6).contains(page % 16) { return UnsafeRawBufferPointer(start: address, count: pageSize).contains { $0 != 0 } }
      return !holdsBacking(address, offset: UInt64(page * pageSize))
    }.count
    withExtendedLifetime(client) {}
    print("prefetch over dropped pages: \(blocks * 16) pages, \(wrong) wrong")
    return wrong == 0 ? 0 : 1
  }

  /// A region of MIB MiB (at least 1), half of it read, grown to twice its size
  /// by mremap: in place (LOOPS = 0) or moved while growing (LOOPS = 1). The
  /// kernel keeps the new tail registered without telling the broker; it must
  /// read as zeros (new memory), the old part as before.
  func grow() throws -> Int32 {
    let length = max(mib, 1) << 20
    let moving = loops == 1
    // Reserve twice the length, so that growing in place has room (or, when
    // moving, block it with a mapping right after the region).
    guard let reserved = mmap(nil, 2 * length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), reserved != MAP_FAILED else {
      print("mmap failed: \(errno)")
      return 1
    }
    if !moving { munmap(reserved + length, length) }
    let client = try BrokerClient(regions: [RegionSpec(id: 1, base: UInt(bitPattern: reserved), length: length, plugin: plugin)], name: "fixture-grow")
    for page in stride(from: 0, to: length / 2, by: pageSize) { _ = clinux_touch(reserved + page) }
    let flags = moving ? clinux_mremap_maymove : 0
    guard let grown = clinux_mremap(reserved, length, 2 * length, flags, nil), grown != MAP_FAILED else {
      print("mremap failed: \(errno)")
      return 1
    }
    var wrong = 0
    for page in stride(from: 0, to: 2 * length, by: pageSize) {
      let bytes = UnsafeRawBufferPointer(start: grown + page, count: pageSize)
      let right = page < length ? Pattern.mismatch(bytes, backingOffset: UInt64(page)) == nil : !bytes.contains { $0 != 0 }
      if !right { wrong += 1 }
    }
    // Written and dropped again, the tail reads zeros, as fresh memory does.
    let tail = grown + length
    tail.storeBytes(of: 0xFEED, as: UInt64.self)
    madvise(tail, pageSize, MADV_DONTNEED)
    if tail.load(as: UInt64.self) != 0 { wrong += 1 }
    munmap(grown, 2 * length)
    if moving { munmap(reserved + length, length) }
    withExtendedLifetime(client) {}
    print("grown \(moving ? "with a move" : "in place") to \(2 * length) bytes, \(wrong) wrong")
    return wrong == 0 ? 0 : 1
  }

  /// LOOPS rounds of two threads moving memory into each other's holes: A
  /// moves range X of the region away (mremap FIXED to a reserved address), B
  /// waits for the hole and moves range Z into it. The kernel may queue A's
  /// trailing UNMAP(X) after B's REMAP(Z → X); taken at face value it cuts B's
  /// pages out of the broker's table. Every page is then checked at its new place.
  func concurrentMovers() throws -> Int32 {
    let rounds = max(loops, 1)
    let slot = 4 * pageSize
    let memory = try AnonymousMemory(length: rounds * 2 * slot)
    let client = try register(memory)
    var wrong = 0
    for round in 0..<rounds {
      let x = memory.base + 2 * round * slot
      let z = x + slot
      // Half of each slot is resident before the moves, half is filled after.
      _ = clinux_touch(x)
      _ = clinux_touch(z + pageSize)
      guard let y = mmap(nil, slot, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), y != MAP_FAILED else {
        print("mmap failed: \(errno)")
        return 1
      }
      let xAddress = UInt(bitPattern: x), zAddress = UInt(bitPattern: z), yAddress = UInt(bitPattern: y)
      let mover = spawnThread {
        _ = clinux_mremap(UnsafeMutableRawPointer(bitPattern: xAddress), slot, slot, clinux_mremap_maymove | clinux_mremap_fixed, UnsafeMutableRawPointer(bitPattern: yAddress))
      }
      // The hole: mincore fails with ENOMEM once X is unmapped.
      var vector: UInt8 = 0
      while mincore(x, pageSize, &vector) == 0 { sched_yield() }
      guard clinux_mremap(UnsafeMutableRawPointer(bitPattern: zAddress), slot, slot, clinux_mremap_maymove | clinux_mremap_fixed, x) != MAP_FAILED else {
        print("mremap failed: \(errno)")
        return 1
      }
      pthread_join(mover, nil)
      let xOffset = UInt64(2 * round * slot)
      for page in stride(from: 0, to: slot, by: pageSize) {
        if Pattern.mismatch(UnsafeRawBufferPointer(start: y + page, count: pageSize), backingOffset: xOffset + UInt64(page)) != nil { wrong += 1 }
        if Pattern.mismatch(UnsafeRawBufferPointer(start: x + page, count: pageSize), backingOffset: xOffset + UInt64(slot + page)) != nil { wrong += 1 }
      }
      munmap(y, slot)
    }
    withExtendedLifetime(client) {}
    print("concurrent movers: \(rounds) rounds, \(wrong) wrong pages")
    return wrong == 0 ? 0 : 1
  }

  /// Registers two regions, unmaps both (as `AnonymousMemory`'s deinit does),
  /// then closes its connection: each plugin must still hear RegionClosed for
  /// both, then Closed.
  func unmapThenExit() throws -> Int32 {
    let first = mmap(nil, 8 * pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
    let second = mmap(nil, 8 * pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
    var client: BrokerClient? = try BrokerClient(regions: [
      RegionSpec(id: 1, base: UInt(bitPattern: first), length: 8 * pageSize, plugin: plugin),
      RegionSpec(id: 2, base: UInt(bitPattern: second), length: 8 * pageSize, plugin: plugin),
    ], name: "fixture-unmap-exit")
    _ = clinux_touch(first)
    munmap(first, 8 * pageSize)
    munmap(second, 8 * pageSize)
    withExtendedLifetime(client) {}
    client = nil
    print("unmapped both regions, then closed")
    return 0
  }

  /// A region of 256 pages: 128 read, 10 of them dropped again, the last 16
  /// (one read) marked MADV_WIPEONFORK, then fork(). The child reads every page
  /// (read before: copied by the kernel; dropped: zeros; never read: served to
  /// the child's own uffd; wiped: zeros), writes one, and exits 0 if all were
  /// right. The parent then checks its own pages, untouched by the child's
  /// write. Prints how the child ended: `child exit N` or `child signal N`.
  func forkChild() throws -> Int32 {
    let pages = 256
    let memory = try AnonymousMemory(length: pages * pageSize)
    let client = try register(memory)
    for page in 0..<128 { _ = clinux_touch(memory.base + page * pageSize) }
    _ = clinux_touch(memory.base + 250 * pageSize)
    madvise(memory.base + 10 * pageSize, 10 * pageSize, MADV_DONTNEED)
    madvise(memory.base + 240 * pageSize, 16 * pageSize, 18 /* MADV_WIPEONFORK */)
    let base = memory.base
    let size = pageSize
    let expect = { (page: Int, inChild: Bool) -> Bool in
      let bytes = UnsafeRawBufferPointer(start: base + page * size, count: size)
      let zeros = (10..<20).contains(page) || (inChild && page >= 240)
      return zeros ? !bytes.contains { $0 != 0 } : Pattern.mismatch(bytes, backingOffset: UInt64(page * size)) == nil
    }
    let child = fork()
    if child == 0 {
      // The child: plain memory accesses only, then _exit.
      var wrong = 0
      for page in (0..<pages).reversed() where !expect(page, true) { wrong += 1 }
      (base + 200 * size).storeBytes(of: 0xC41D, as: UInt64.self)
      _exit(wrong == 0 ? 0 : 1)
    }
    guard child > 0 else {
      print("fork failed: \(errno)")
      return 1
    }
    var status: Int32 = 0
    waitpid(child, &status, 0)
    let parentWrong = (0..<pages).filter { !expect($0, false) }.count
    let ending = status & 0x7F == 0 ? "child exit \((status >> 8) & 0xFF)" : "child signal \(status & 0x7F)"
    withExtendedLifetime(client) {}
    print("forked: \(ending), parent wrong \(parentWrong)")
    return parentWrong == 0 ? 0 : 1
  }

  /// A region of MIB MiB (at least 2), its first quarter read; its upper half
  /// moved elsewhere (mremap FIXED) and a page of the lower half unmapped.
  /// At the gate ("moved") the test restarts the broker; the client re-attaches
  /// and must be served where its pages lie now. Every page is then checked.
  func remapThenReattach() throws -> Int32 {
    let length = max(mib, 2) << 20
    let memory = try AnonymousMemory(length: length)
    let client = try register(memory)
    let base = memory.base
    for page in stride(from: 0, to: length / 4, by: pageSize) { _ = clinux_touch(base + page) }
    guard let destination = mmap(nil, length / 2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), destination != MAP_FAILED,
          let moved = clinux_mremap(base + length / 2, length / 2, length / 2, clinux_mremap_maymove | clinux_mremap_fixed, destination), moved != MAP_FAILED
    else {
      print("mremap failed: \(errno)")
      return 1
    }
    munmap(base + length / 4, pageSize)
    try client.addRegions([])  // a round trip: the broker has sent the new layout before its reply
    gate("moved", client: client)
    var wrong = 0
    for page in stride(from: 0, to: length / 2, by: pageSize) where page != length / 4 {
      if Pattern.mismatch(UnsafeRawBufferPointer(start: base + page, count: pageSize), backingOffset: UInt64(page)) != nil { wrong += 1 }
      if Pattern.mismatch(UnsafeRawBufferPointer(start: moved + page, count: pageSize), backingOffset: UInt64(length / 2 + page)) != nil { wrong += 1 }
    }
    munmap(moved, length / 2)
    withExtendedLifetime(client) {}
    print("re-attached after a move: \(length / pageSize - 1) pages, \(wrong) wrong")
    return wrong == 0 ? 0 : 1
  }

  /// A region of 256 pages, the first 128 read, then fork(). The parent passes
  /// the gate ("forked": the test kills and restarts the broker meanwhile) and,
  /// re-attached, lets the child read page 200, which no one filled: it must die
  /// with SIGBUS, never read zeros (exit 7) or anything else (exit 8). Prints
  /// how the child ended.
  func forkThenBrokerLoss() throws -> Int32 {
    let memory = try AnonymousMemory(length: 256 * pageSize)
    let client = try register(memory)
    for page in 0..<128 { _ = clinux_touch(memory.base + page * pageSize) }
    var ready: [CInt] = [-1, -1]
    guard pipe(&ready) == 0 else { return 1 }
    let child = fork()
    if child == 0 {
      var byte: UInt8 = 0
      _ = read(ready[0], &byte, 1)  // the parent has re-attached by then
      let word = (memory.base + 200 * pageSize).load(as: UInt64.self)
      _exit(word == 0 ? 7 : 8)
    }
    // A round trip: the broker adopted the child, and sent its uffd here, before it answers.
    try client.addRegions([])
    gate("forked", client: client)
    _ = write(ready[1], "1", 1)
    var status: Int32 = 0
    waitpid(child, &status, 0)
    withExtendedLifetime(client) {}
    print(status & 0x7F == 0 ? "child exit \((status >> 8) & 0xFF)" : "child signal \(status & 0x7F)")
    return 0
  }

  /// As `forkThenBrokerLoss`, one generation deeper: the child forks a
  /// grandchild, which reads page 200 (never filled) after the broker was
  /// killed and the client re-attached. Prints how the grandchild ended.
  func forkTreeThenBrokerLoss() throws -> Int32 {
    let memory = try AnonymousMemory(length: 256 * pageSize)
    let client = try register(memory)
    for page in 0..<128 { _ = clinux_touch(memory.base + page * pageSize) }
    var forked: [CInt] = [-1, -1], go: [CInt] = [-1, -1]
    guard pipe(&forked) == 0, pipe(&go) == 0 else { return 1 }
    let child = fork()
    if child == 0 {
      let grandchild = fork()
      if grandchild == 0 {
        var byte: UInt8 = 0
        _ = read(go[0], &byte, 1)
        let word = (memory.base + 200 * pageSize).load(as: UInt64.self)
        _exit(word == 0 ? 7 : 8)
      }
      _ = write(forked[1], "1", 1)
      var status: Int32 = 0
      waitpid(grandchild, &status, 0)
      _exit(status & 0x7F == 0 ? 100 + (status >> 8) & 0xFF : status & 0x7F)  // a signal's number, or 100 + the exit code
    }
    var byte: UInt8 = 0
    _ = read(forked[0], &byte, 1)
    // A round trip: the broker adopted the grandchild, and sent its uffd here, before it answers.
    try client.addRegions([])
    gate("forked", client: client)
    _ = write(go[1], "1", 1)
    var status: Int32 = 0
    waitpid(child, &status, 0)
    let code = (status >> 8) & 0xFF
    withExtendedLifetime(client) {}
    print(code >= 100 ? "grandchild exit \(code - 100)" : "grandchild signal \(code)")
    return 0
  }

  var fixtureFile: String? { getenv("FIXTURE_FILE").map { String(cString: $0) } }

  /// Whether the page at `address` holds region offset `offset` of the backing:
  /// the FIXTURE_FILE's bytes (zeros past its end), or the pattern.
  private func holdsBacking(_ address: UnsafeMutableRawPointer, offset: UInt64) -> Bool {
    let bytes = UnsafeRawBufferPointer(start: address, count: pageSize)
    guard let path = fixtureFile else { return Pattern.mismatch(bytes, backingOffset: offset) == nil }
    var expected = [UInt8](repeating: 0, count: pageSize)
    let fd = open(path, O_RDONLY)
    defer { close(fd) }
    _ = pread(fd, &expected, pageSize, off_t(offset))
    return expected.withUnsafeBytes { memcmp($0.baseAddress!, address, pageSize) == 0 }
  }
}
