import Glibc
import LinuxSupport

/// The snapshot file of a restore run: a SplitMix64 stream (no zero page, no
/// pattern a handler could shortcut), written once, with each page's checksum
/// kept, so what a worker read is checked against what was written.
final class SnapshotImage {
  let path: String
  let pages: Int
  /// Read-only, for `posix_fadvise` and (mapped) `mincore`.
  private let fd: CInt
  private let view: UnsafeMutableRawPointer
  private let residency: UnsafeMutablePointer<UInt8>
  private let sums: UnsafeMutableBufferPointer<UInt64>

  var bytes: Int { pages * systemPageSize }

  /// Writes `pages` pages to `path` (created, owner-only) and syncs them to disk.
  init(path: String, pages: Int) throws(BenchError) {
    self.path = path
    self.pages = pages
    sums = .allocate(capacity: pages)
    residency = .allocate(capacity: pages)
    let out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    guard out >= 0 else { throw BenchError("cannot create \(path): errno \(errno)") }
    defer { close(out) }
    let chunkPages = 1024
    let chunk = UnsafeMutableRawPointer.allocate(byteCount: chunkPages * systemPageSize, alignment: systemPageSize)
    defer { chunk.deallocate() }
    var random = SplitMix64(seed: 0x5_4A95_407)
    var page = 0
    while page < pages {
      let count = min(chunkPages, pages - page)
      let words = chunk.assumingMemoryBound(to: UInt64.self)
      for index in 0..<count * systemPageSize / 8 { words[index] = random.next() }
      for offset in 0..<count { sums[page + offset] = Self.checksum(ofPage: chunk + offset * systemPageSize) }
      var written = 0
      while written < count * systemPageSize {
        let n = write(out, chunk + written, count * systemPageSize - written)
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw BenchError("cannot write \(path): errno \(errno)") }
        written += n
      }
      page += count
    }
    // Dirty pages cannot be dropped from the cache: they go to disk first.
    guard fsync(out) == 0 else { throw BenchError("cannot sync \(path): errno \(errno)") }
    fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("cannot open \(path): errno \(errno)") }
    guard let mapped = mmap(nil, pages * systemPageSize, PROT_READ, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
      close(fd)
      throw BenchError("cannot map \(path): errno \(errno)")
    }
    view = mapped
  }

  deinit {
    munmap(view, bytes)
    close(fd)
    unlink(path)
    sums.deallocate()
    residency.deallocate()
  }

  /// Asks the kernel to drop the file from the page cache, and returns the
  /// fraction of its pages still cached (mincore): a file system may keep them.
  func dropFromCache() -> Double {
    _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    return cachedFraction()
  }

  /// Reads the whole file once unless it is all in the page cache already, and
  /// returns the fraction of its pages cached (the kernel may evict some).
  func warmCache() throws(BenchError) -> Double {
    if cachedFraction() < 1 {
      let chunk = 1 << 20
      let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: systemPageSize)
      defer { buffer.deallocate() }
      var done = 0
      while done < bytes {
        let n = pread(fd, buffer, min(chunk, bytes - done), off_t(done))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw BenchError("cannot read \(path) at \(done): \(n == 0 ? "end of file" : "errno \(errno)")") }
        done += n
      }
    }
    return cachedFraction()
  }

  /// The fraction of the file's pages in the page cache (mincore).
  private func cachedFraction() -> Double {
    guard mincore(view, bytes, residency) == 0 else { return .nan }
    var cached = 0
    for page in 0..<pages where residency[page] & 1 != 0 { cached += 1 }
    return Double(cached) / Double(pages)
  }

  /// The checksum a worker must get for `touched` pages.
  func expectedChecksum(_ touched: TouchSet) -> UInt64 {
    var total: UInt64 = 0
    for index in 0..<touched.count {
      let page = touched.page(index)
      total &+= Self.weighted(sums[page], page: page)
    }
    return total
  }

  /// Whether the page at `address` holds page `page` of the file.
  func holds(page: Int, at address: UnsafeRawPointer) -> Bool { Self.checksum(ofPage: address) == sums[page] }

  /// The wrapping sum of a page's words.
  @inline(__always)
  static func checksum(ofPage page: UnsafeRawPointer) -> UInt64 {
    let words = page.assumingMemoryBound(to: UInt64.self)
    var sum: UInt64 = 0
    for index in 0..<systemPageSize / 8 { sum &+= words[index] }
    return sum
  }

  /// A page's sum weighted by its index: two pages swapped change the total.
  @inline(__always)
  static func weighted(_ sum: UInt64, page: Int) -> UInt64 { sum &* (UInt64(page) &<< 1 | 1) }
}

/// The pages a restore worker reads, the same in every round and strategy:
/// all of them in order, or a fixed random subset spread over the whole range, in random order.
final class TouchSet: @unchecked Sendable {
  // @unchecked: built in init, then only read.
  let count: Int
  /// nil: every page, in order.
  private let order: UnsafeMutableBufferPointer<UInt32>?

  init(pages: Int, percent: Int) {
    guard percent < 100 else {
      count = pages
      order = nil
      return
    }
    count = max(pages * percent / 100, 1)
    var all = (0..<pages).map { UInt32($0) }
    var random = SplitMix64(seed: 0x70C4_0000 &+ UInt64(percent))
    // A partial Fisher–Yates shuffle: the first `count` are a uniform random subset, in random order.
    for position in 0..<count { all.swapAt(position, position + Int(random.next() % UInt64(pages - position))) }
    let buffer = UnsafeMutableBufferPointer<UInt32>.allocate(capacity: count)
    _ = buffer.initialize(from: all[..<count])
    order = buffer
  }

  deinit { order?.deallocate() }

  @inline(__always)
  func page(_ index: Int) -> Int { order.map { Int($0[index]) } ?? index }

  /// Reads every page of the set at `base` (the worker's work) and returns their weighted checksum.
  @inline(never)
  func touch(base: UnsafeRawPointer) -> UInt64 {
    var total: UInt64 = 0
    for index in 0..<count {
      let page = self.page(index)
      total &+= SnapshotImage.weighted(SnapshotImage.checksum(ofPage: base + page * systemPageSize), page: page)
    }
    return total
  }
}
