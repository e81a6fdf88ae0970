import BrokerProtocol
import ClientSDK
import Glibc
import LinuxSupport
import SystemPackage

extension FixtureClient {
  /// A clone of a snapshot: MIB MiB of the tmpfs file FIXTURE_SHM (every clone
  /// opens the same one) mapped MAP_PRIVATE as a shared-memory region whose
  /// backing is the pattern, or FIXTURE_FILE (the region's argument). Every
  /// page (the first four dropped with MADV_DONTNEED first) is touched by THREADS threads and checked against the pattern; then
  /// every page is written (a private copy, which no other clone may see) and
  /// checked; at the gate "written" the test runs another clone; the writes are
  /// checked again, dropped with MADV_DONTNEED, and every page must read the
  /// snapshot again (the file's page, mapped on a minor fault).
  func sharedMemoryClone() throws -> Int32 {
    guard let path = getenv("FIXTURE_SHM").map({ String(cString: $0) }) else { fail("shm-clone needs FIXTURE_SHM") }
    let fd = open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { fail("cannot open \(path): \(errno)") }
    defer { close(fd) }
    // FIXTURE_SHM_SHARED=1: mapped MAP_SHARED, so the writes go to the file and read back after MADV_DONTNEED.
    let mappedShared = getenv("FIXTURE_SHM_SHARED") != nil
    let memory = try SharedMemory(file: FileDescriptor(rawValue: fd), length: mib << 20, private: !mappedShared)
    // FIXTURE_SHM_SEND (FIXTURE_SHM_SEND_READONLY=1: opened read-only): another file handed to the broker, which must refuse it.
    let sent = getenv("FIXTURE_SHM_SEND").map { open(String(cString: $0), (getenv("FIXTURE_SHM_SEND_READONLY") != nil ? O_RDONLY : O_RDWR) | O_CLOEXEC) } ?? fd
    let client = try BrokerClient(regions: [memory.region(id: 1, plugin: plugin, argument: fixtureFile ?? "")], sharedMemory: FileDescriptor(rawValue: sent), name: "fixture-shm-clone")
    let pages = memory.length / pageSize
    let base = memory.address
    let threadCount = threads
    let expected = backing(pages: pages)
    // Dropped before any fault: still the snapshot (no zeros), in this clone and in the others.
    madvise(memory.base, 4 * pageSize, MADV_DONTNEED)
    // Even pages a write fault (of the word they hold anyway), odd pages a read fault.
    let workers = (0..<threadCount).map { index in
      spawnThread {
        for page in stride(from: index, to: pages, by: threadCount) {
          let pointer = UnsafeMutableRawPointer(bitPattern: base + UInt(page * 4096))!
          if page % 2 == 0 {
            pointer.storeBytes(of: expected[page * 4096 / 8 + 1], toByteOffset: 8, as: UInt64.self)
          } else {
            _ = pointer.load(as: UInt8.self)
          }
        }
      }
    }
    workers.forEach { pthread_join($0, nil) }
    let snapshot = wrongPages(memory, expected, written: false)
    for page in 0..<pages { (memory.base + page * pageSize).storeBytes(of: ~expected[page * pageSize / 8], as: UInt64.self) }
    let written = wrongPages(memory, expected, written: true)
    gate("written", client: client)
    let kept = wrongPages(memory, expected, written: true)
    madvise(memory.base, memory.length, MADV_DONTNEED)
    let dropped = wrongPages(memory, expected, written: mappedShared)
    withExtendedLifetime(client) {}
    print("shared memory: \(pages) pages, wrong: \(snapshot) at first, \(written) written, \(kept) after the gate, \(dropped) after MADV_DONTNEED")
    return snapshot + written + kept + dropped == 0 ? 0 : 1
  }

  /// What the region must read: FIXTURE_FILE's bytes (zeros past its end), or the pattern.
  private func backing(pages: Int) -> [UInt64] {
    var words = [UInt64](repeating: 0, count: pages * pageSize / 8)
    words.withUnsafeMutableBytes { bytes in
      if let path = fixtureFile {
        let fd = open(path, O_RDONLY)
        _ = pread(fd, bytes.baseAddress, bytes.count, 0)
        close(fd)
      } else {
        Pattern.fill(bytes, backingOffset: 0)
      }
    }
    return words
  }

  /// Pages that do not read `expected` (`written`: with its first word inverted, as this clone wrote it).
  private func wrongPages(_ memory: SharedMemory, _ expected: [UInt64], written: Bool) -> Int {
    let words = UnsafeBufferPointer(start: memory.base.assumingMemoryBound(to: UInt64.self), count: expected.count)
    let perPage = pageSize / 8
    return (0..<expected.count / perPage).count { page in
      let first = page * perPage
      if words[first] != (written ? ~expected[first] : expected[first]) { return true }
      return (first + 1..<first + perPage).contains { words[$0] != expected[$0] }
    }
  }
}
