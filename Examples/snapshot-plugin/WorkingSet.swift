import Glibc

/// A restore's working set: the snapshot's pages (file offsets) in the order
/// its first restore faulted them, each once, and the snapshot it was recorded
/// from (size, device, inode, modification time). A record only orders the
/// broker's background fills; the bytes always come from the snapshot, so a
/// stale or corrupt record costs speed, never correctness: one that does not
/// match the snapshot, or fails its checksum, is ignored.
///
/// The file: little-endian 64-bit words: magic, version, size, device, inode,
/// mtime seconds, mtime nanoseconds, count, `count` offsets, an FNV-1a hash of
/// everything before it. Written to a temporary file and renamed into place.
struct WorkingSet {
  struct Identity: Equatable {
    var size, device, inode, mtimeSeconds, mtimeNanoseconds: UInt64

    /// The identity of the open file `fd`.
    init(_ fd: CInt) {
      var info = stat()
      fstat(fd, &info)
      size = UInt64(info.st_size)
      device = UInt64(info.st_dev)
      inode = UInt64(info.st_ino)
      mtimeSeconds = UInt64(bitPattern: Int64(info.st_mtim.tv_sec))
      mtimeNanoseconds = UInt64(info.st_mtim.tv_nsec)
    }

    var words: [UInt64] { [size, device, inode, mtimeSeconds, mtimeNanoseconds] }
  }

  static let magic: UInt64 = 0x3153_4B52_4F57_4655  // "UFWORKS1"
  static let version: UInt64 = 1
  /// Bounds what a read allocates: 2^24 pages are 64 GiB of 4 KiB pages.
  static let maxCount = 1 << 24

  var identity: Identity
  var offsets: [UInt64]

  /// Writes the record to `path` (atomically: a reader sees the old one or this one).
  func write(to path: String) -> Bool {
    var words = [Self.magic, Self.version] + identity.words + [UInt64(offsets.count)] + offsets
    words.append(Self.hash(words))
    let temporary = path + ".tmp"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return false }
    let bytes = words.map(\.littleEndian).withUnsafeBytes { raw in
      var done = 0
      while done < raw.count {
        let n = Glibc.write(fd, raw.baseAddress! + done, raw.count - done)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        done += n
      }
      return done
    }
    guard close(fd) == 0, bytes == words.count * 8 else {
      unlink(temporary)
      return false
    }
    return rename(temporary, path) == 0
  }

  /// The offsets recorded at `path` for the snapshot `identity`, or why the record is not used.
  static func read(_ path: String, for identity: Identity) -> Result<[UInt64], WorkingSetError> {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return .failure(WorkingSetError(errno == ENOENT ? "no record yet" : "cannot open it: errno \(errno)")) }
    defer { close(fd) }
    var info = stat()
    fstat(fd, &info)
    let size = Int(info.st_size)
    let header = 3 + identity.words.count  // magic, version, identity, count
    guard size % 8 == 0, size >= (header + 1) * 8, size <= (header + 1 + maxCount) * 8 else { return .failure(WorkingSetError("corrupt: \(size) bytes")) }
    var words = [UInt64](repeating: 0, count: size / 8)
    let done = words.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, size, 0) }
    guard done == size else { return .failure(WorkingSetError("cannot read it")) }
    words = words.map { UInt64(littleEndian: $0) }
    guard words[0] == magic else { return .failure(WorkingSetError("not a working-set record")) }
    guard words[1] == version else { return .failure(WorkingSetError("format version \(words[1]), this plugin reads \(version)")) }
    guard words[header - 1] == UInt64(words.count - header - 1), hash(Array(words.dropLast())) == words.last else {
      return .failure(WorkingSetError("corrupt: its length or checksum is wrong"))
    }
    guard Array(words[2..<header - 1]) == identity.words else { return .failure(WorkingSetError("recorded from another version of the snapshot")) }
    return .success(Array(words[header..<words.count - 1]))
  }

  /// FNV-1a over the words' bytes.
  static func hash(_ words: [UInt64]) -> UInt64 {
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    for word in words {
      for shift in stride(from: 0, to: 64, by: 8) { hash = (hash ^ (word >> UInt64(shift) & 0xFF)) &* 0x100_0000_01B3 }
    }
    return hash
  }
}

struct WorkingSetError: Error {
  var reason: String
  init(_ reason: String) { self.reason = reason }
}

/// The pages a region's restore faulted, in order, each once (file offsets);
/// sized at the region's open, so a fault allocates nothing.
final class WorkingSetRecorder {
  let identity: WorkingSet.Identity
  let fileOffset: UInt64
  let pageSize: Int
  private var seen: [UInt64]
  private(set) var offsets: [UInt64] = []

  init(identity: WorkingSet.Identity, fileOffset: UInt64, pages: Int, pageSize: Int) {
    self.identity = identity
    self.fileOffset = fileOffset
    self.pageSize = pageSize
    seen = [UInt64](repeating: 0, count: (pages + 63) / 64)
    offsets.reserveCapacity(pages)
  }

  /// Notes a fault at region offset `offset`.
  func note(_ offset: UInt64) {
    let page = Int(offset / UInt64(pageSize))
    guard page / 64 < seen.count, seen[page / 64] & (1 << UInt64(page % 64)) == 0 else { return }
    seen[page / 64] |= 1 << UInt64(page % 64)
    offsets.append(fileOffset + UInt64(page * pageSize))
  }
}
