import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport

// Scenarios for the sample plugins of Examples/.
extension FixtureClient {
  /// The snapshot file FIXTURE_FILE names: its path, an open descriptor and its size.
  private func snapshotFile() -> (path: String, fd: CInt, size: Int)? {
    guard let path = getenv("FIXTURE_FILE").map({ String(cString: $0) }) else {
      print("FIXTURE_FILE is not set")
      return nil
    }
    let fd = open(path, O_RDONLY)
    var info = stat()
    return (path, fd, fd >= 0 && fstat(fd, &info) == 0 ? Int(info.st_size) : 0)
  }

  /// Maps a region (the file's size rounded up to pages, at least MIB MiB) onto
  /// the snapshot file named by FIXTURE_FILE (served by the `snapshot-plugin`),
  /// touches every page in order from `threads` threads,
  /// and compares every page with the file (zeros past its end).
  /// Exit 3 with "refused: ..." when the broker refuses the region.
  func snapshot() throws -> Int32 {
    guard let (path, fd, size) = snapshotFile() else { return 2 }
    let memory = try AnonymousMemory(length: max(size, mib << 20, pageSize), hugePageSize: hugePageSize)
    let client: BrokerClient
    do {
      client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, pageSize: memory.pageSize, plugin: plugin, argument: path)],
                                name: "fixture-snapshot")
    } catch {
      print("refused: \(error)")
      return 3
    }
    let pages = memory.length / pageSize
    let address = memory.address
    let threadCount = threads
    let workers = (0..<threadCount).map { thread in
      spawnThread {
        let share = (pages + threadCount - 1) / threadCount
        for page in thread * share..<min((thread + 1) * share, pages) {
          _ = clinux_touch(UnsafeRawPointer(bitPattern: address + UInt(page * 4096)))
        }
      }
    }
    workers.forEach { pthread_join($0, nil) }
    let expected = UnsafeMutableRawBufferPointer.allocate(byteCount: pageSize, alignment: pageSize)
    defer { expected.deallocate() }
    var wrong = 0
    for page in 0..<pages {
      expected.initializeMemory(as: UInt8.self, repeating: 0)
      _ = pread(fd, expected.baseAddress, pageSize, off_t(page * pageSize))
      if memcmp(expected.baseAddress!, memory.base + page * pageSize, pageSize) != 0 { wrong += 1 }
    }
    close(fd)
    withExtendedLifetime(client) {}
    print("verified \(pages) pages of \(size) bytes, \(wrong) wrong")
    return wrong == 0 ? 0 : 1
  }

  /// The snapshot file's region, all touched; then every other 4-page block is
  /// dropped (MADV_DONTNEED). At the gate ("dropped") the test replaces the
  /// plugin with a fresh process, which never saw those REMOVEs. Then every
  /// page is read again and compared: a dropped page must read zeros, the
  /// others the file. Prints "verified N pages, D dropped, W wrong".
  func snapshotDropped() throws -> Int32 {
    guard let (path, fd, size) = snapshotFile() else { return 2 }
    let memory = try AnonymousMemory(length: max(size, mib << 20, pageSize) / pageSize * pageSize)
    let client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin, argument: path)], name: "fixture-snapshot-dropped")
    let pages = memory.length / pageSize
    for page in 0..<pages { _ = clinux_touch(UnsafeRawPointer(bitPattern: memory.address + UInt(page * pageSize))) }
    let dropped = { (page: Int) in page / 4 % 2 == 1 }
    for block in stride(from: 4, to: pages, by: 8) {
      madvise(memory.base + block * pageSize, min(4, pages - block) * pageSize, MADV_DONTNEED)
    }
    gate("dropped", client: client)
    return verifyDropped(memory, file: fd, client: client, dropped: dropped)
  }

  /// The snapshot file's region, registered with a plugin that has the broker
  /// stream it in the background; at once, while the stream runs, every other
  /// 4-page block is dropped (MADV_DONTNEED), none touched before. Then every
  /// page is read and compared: a dropped page must read zeros (the stream must
  /// not bring it back), the others the file. Prints as `snapshot-dropped`.
  func snapshotStreamDrops() throws -> Int32 {
    guard let (path, fd, size) = snapshotFile() else { return 2 }
    let memory = try AnonymousMemory(length: max(size, mib << 20, pageSize) / pageSize * pageSize)
    let client = try BrokerClient(regions: [RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin, argument: path)], name: "fixture-snapshot-stream-drops")
    let pages = memory.length / pageSize
    for block in stride(from: 4, to: pages, by: 8) {
      madvise(memory.base + block * pageSize, min(4, pages - block) * pageSize, MADV_DONTNEED)
    }
    return verifyDropped(memory, file: fd, client: client, dropped: { page in page / 4 % 2 == 1 })
  }

  /// Reads every page of `memory` and compares it with the file (zeros for `dropped` pages); prints the count.
  private func verifyDropped(_ memory: AnonymousMemory, file fd: CInt, client: BrokerClient, dropped: (Int) -> Bool) -> Int32 {
    let pages = memory.length / pageSize
    let expected = UnsafeMutableRawBufferPointer.allocate(byteCount: pageSize, alignment: pageSize)
    defer { expected.deallocate() }
    var wrong = 0
    for page in 0..<pages {
      expected.initializeMemory(as: UInt8.self, repeating: 0)
      if !dropped(page) { _ = pread(fd, expected.baseAddress, pageSize, off_t(page * pageSize)) }
      if memcmp(expected.baseAddress!, memory.base + page * pageSize, pageSize) != 0 { wrong += 1 }
    }
    close(fd)
    withExtendedLifetime(client) {}
    print("verified \(pages) pages, \((0..<pages).count(where: dropped)) dropped, \(wrong) wrong")
    return wrong == 0 ? 0 : 1
  }

  /// Writes the pattern, swaps the region out, then reads page 0. With a swap
  /// plugin that corrupted that page's block, the read must die with SIGBUS
  /// (the plugin poisons it) rather than see wrong bytes.
  func swapCorrupt() throws -> Int32 {
    let memory = try AnonymousMemory(length: max(mib, 1) << 20)
    let spec = RegionSpec(id: 1, base: memory.address, length: memory.length, plugin: plugin)
    let client = try BrokerClient(regions: [spec], name: "fixture-swap-corrupt")
    for page in 0..<memory.length / pageSize {
      Pattern.fill(UnsafeMutableRawBufferPointer(start: memory.base + page * pageSize, count: pageSize), backingOffset: UInt64(page * pageSize))
    }
    let report = try client.swapOut(spec)
    print("swapped out \(report.pagesDropped) pages; reading page 0")
    fflush(nil)
    let word = memory.base.load(as: UInt64.self)
    withExtendedLifetime(client) {}
    print("read \(word) from a corrupt page instead of SIGBUS")
    return 1
  }
}
