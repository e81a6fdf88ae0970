import CLinux
import Glibc
import PluginSDK

/// Where the swap plugin keeps pages: two memfds that the broker also keeps
/// (its descriptor store), so a crash or `kill -9` of the plugin loses nothing;
/// or, with a state directory, two files there, which also outlive the broker.
/// Pages are keyed by the client's token, which survives its re-attaches.
/// `data` is an append-only log of page images (compressed or raw); `index` an
/// append-only log of fixed-size records (a page stored, a page forgotten),
/// replayed on start-up to rebuild the table. When dead bytes outgrow live
/// ones, both are rewritten into new logs (kept again under the same names).
final class SwapStore {
  struct Key: Hashable {
    var client: UInt128
    var region: UInt64
    var offset: UInt64
  }

  struct Entry {
    var location: UInt64
    var length: UInt32
    var compressed: Bool
    var crc: UInt32
  }

  /// One record of the index log; written whole before the log's end moves past it.
  private struct Record {
    static let put: UInt32 = 1
    static let forget: UInt32 = 2
    var operation: UInt32
    var length: UInt32
    var clientHigh: UInt64
    var clientLow: UInt64
    var region: UInt64
    var offset: UInt64
    var location: UInt64
    var crc: UInt32
    var compressed: UInt32
  }

  private(set) var entries: [Key: Entry] = [:]
  private var data: Log
  private var index: Log
  private let store: DescriptorStore
  private let directory: String?
  /// Bytes of page images no entry refers to any more.
  private var deadBytes: UInt64 = 0
  /// Whether the table was rebuilt from logs written before (a restart).
  let recovered: Bool

  /// With `directory`, the logs are files there; else memfds in the broker's `store`.
  init(store: DescriptorStore, directory: String?) throws {
    self.store = store
    self.directory = directory
    let restored: (Log, Log)?
    if let directory {
      restored = Log(adopting: try Log.openFile(directory + "/swap-data")).flatMap { data in
        Log(adopting: try? Log.openFile(directory + "/swap-index")).map { (data, $0) }
      }
    } else {
      restored = Log(adopting: store.restored["swap-data"]).flatMap { data in Log(adopting: store.restored["swap-index"]).map { (data, $0) } }
    }
    if let (data, index) = restored {
      self.data = data
      self.index = index
      recovered = true
      replay()
    } else {
      (data, index) = try Self.newLogs(directory: directory)
      recovered = false
      keep()
    }
  }

  /// Empty logs: files in `directory` (replacing what was there), or memfds.
  private static func newLogs(directory: String?) throws -> (Log, Log) {
    guard let directory else { return (try Log(fd: Log.memfd("swap-data")), try Log(fd: Log.memfd("swap-index"))) }
    // Written aside and renamed over the old ones, so a crash never leaves half a store.
    let data = try Log(fd: Log.openFile(directory + "/swap-data.new", truncate: true))
    let index = try Log(fd: Log.openFile(directory + "/swap-index.new", truncate: true))
    return (data, index)
  }

  /// Makes the current logs the ones found after a restart.
  private func keep() {
    if let directory {
      rename(directory + "/swap-data.new", directory + "/swap-data")
      rename(directory + "/swap-index.new", directory + "/swap-index")
    } else {
      store.keep(data.fd, as: "swap-data")
      store.keep(index.fd, as: "swap-index")
    }
  }

  /// Appends a page image and records it under `key`; returns the entry.
  @discardableResult
  func put(_ key: Key, image: UnsafeRawBufferPointer, compressed: Bool, crc: UInt32) throws -> Entry {
    let entry = Entry(location: try data.append(image), length: UInt32(image.count), compressed: compressed, crc: crc)
    try record(key, entry)
    if let old = entries.updateValue(entry, forKey: key) { deadBytes += UInt64(old.length) }
    return entry
  }

  /// Records `entry` (an image already in the log) under `key` too: a forked child's copy.
  func share(_ entry: Entry, as key: Key) throws {
    try record(key, entry)
    if let old = entries.updateValue(entry, forKey: key) { deadBytes += UInt64(old.length) }
  }

  func forget(_ key: Key) {
    guard let old = entries.removeValue(forKey: key) else { return }
    deadBytes += UInt64(old.length)
    var record = Record(operation: Record.forget, length: 0, clientHigh: UInt64(truncatingIfNeeded: key.client >> 64), clientLow: UInt64(truncatingIfNeeded: key.client),
                        region: key.region, offset: key.offset, location: 0, crc: 0, compressed: 0)
    _ = try? withUnsafeBytes(of: &record) { try index.append($0) }
    compactIfWasteful()
  }

  /// The stored image of `entry`, valid until the next put or forget.
  func image(of entry: Entry) -> UnsafeMutableRawBufferPointer {
    data.bytes(at: entry.location, count: Int(entry.length))
  }

  private func record(_ key: Key, _ entry: Entry) throws {
    var record = Record(operation: Record.put, length: entry.length, clientHigh: UInt64(truncatingIfNeeded: key.client >> 64),
                        clientLow: UInt64(truncatingIfNeeded: key.client), region: key.region, offset: key.offset,
                        location: entry.location, crc: entry.crc, compressed: entry.compressed ? 1 : 0)
    _ = try withUnsafeBytes(of: &record) { try index.append($0) }
  }

  private func replay() {
    let size = MemoryLayout<Record>.stride
    var position = Log.headerSize
    while position + UInt64(size) <= index.end {
      let record = index.bytes(at: position, count: size).load(as: Record.self)
      position += UInt64(size)
      let key = Key(client: UInt128(record.clientHigh) << 64 | UInt128(record.clientLow), region: record.region, offset: record.offset)
      let old: Entry?
      if record.operation == Record.put {
        old = entries.updateValue(Entry(location: record.location, length: record.length, compressed: record.compressed != 0, crc: record.crc), forKey: key)
      } else {
        old = entries.removeValue(forKey: key)
      }
      if let old { deadBytes += UInt64(old.length) }
    }
  }

  /// Rewrites both logs with the live entries only, when the dead bytes are
  /// more than the live ones and 16 MiB.
  private func compactIfWasteful() {
    let live = data.end - Log.headerSize - deadBytes
    guard deadBytes > max(live, 16 << 20) else { return }
    guard let (newData, newIndex) = try? Self.newLogs(directory: directory) else { return }
    let old = (data, index)
    data = newData
    index = newIndex
    let current = entries
    entries = [:]
    deadBytes = 0
    for (key, entry) in current {
      _ = try? put(key, image: UnsafeRawBufferPointer(old.0.bytes(at: entry.location, count: Int(entry.length))), compressed: entry.compressed, crc: entry.crc)
    }
    keep()
    withExtendedLifetime(old) {}
  }
}

/// A growable memfd, mapped, with its used length in a 16-byte header (magic,
/// end) so that a restarted plugin finds where the log ends.
private final class Log {
  static let headerSize: UInt64 = 16
  private static let magic: UInt64 = 0x7577_6170_6C6F_6702
  let fd: CInt
  private var mapping: UnsafeMutableRawPointer
  private var capacity: Int

  static func memfd(_ name: String) throws -> CInt {
    let fd = clinux_memfd(name)
    guard fd >= 0 else { throw SwapStoreError("memfd_create failed: \(-fd)") }
    return fd
  }

  static func openFile(_ path: String, truncate: Bool = false) throws -> CInt {
    let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | (truncate ? O_TRUNC : 0), 0o600)
    guard fd >= 0 else { throw SwapStoreError("cannot open \(path): \(String(cString: strerror(errno)))") }
    return fd
  }

  /// A new, empty log in `fd` (a memfd or a file, truncated to nothing or new).
  init(fd: CInt) throws {
    self.fd = fd
    capacity = 1 << 20
    guard ftruncate(fd, off_t(capacity)) == 0, let pointer = mmap(nil, capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), pointer != MAP_FAILED else {
      close(fd)
      throw SwapStoreError("cannot map a new log: \(errno)")
    }
    mapping = pointer
    mapping.storeBytes(of: Self.magic, as: UInt64.self)
    end = Self.headerSize
  }

  /// A log written before (kept by the broker, or a file); nil (and closed) if it is not one of ours.
  init?(adopting descriptor: CInt?) {
    guard let fd = descriptor else { return nil }
    var info = stat()
    guard fstat(fd, &info) == 0, info.st_size >= Int(Self.headerSize),
          let pointer = mmap(nil, Int(info.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), pointer != MAP_FAILED
    else {
      close(fd)
      return nil
    }
    self.fd = fd
    mapping = pointer
    capacity = Int(info.st_size)
    guard mapping.load(as: UInt64.self) == Self.magic, end >= Self.headerSize, end <= UInt64(capacity) else {
      munmap(mapping, capacity)
      close(fd)
      return nil
    }
  }

  deinit {
    munmap(mapping, capacity)
    close(fd)
  }

  /// The used length, header included.
  private(set) var end: UInt64 {
    get { mapping.load(fromByteOffset: 8, as: UInt64.self) }
    set { mapping.storeBytes(of: newValue, toByteOffset: 8, as: UInt64.self) }
  }

  /// Appends `bytes`; returns where they start. The end moves only once they are all written.
  func append(_ bytes: UnsafeRawBufferPointer) throws -> UInt64 {
    let start = end
    let needed = Int(start) + bytes.count
    if needed > capacity { try grow(to: needed) }
    if bytes.count > 0 { (mapping + Int(start)).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
    end = start + UInt64(bytes.count)
    return start
  }

  func bytes(at location: UInt64, count: Int) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: mapping + Int(location), count: count)
  }

  private func grow(to needed: Int) throws {
    var size = capacity
    while size < needed { size *= 2 }
    guard ftruncate(fd, off_t(size)) == 0, let pointer = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), pointer != MAP_FAILED else {
      throw SwapStoreError("cannot grow the log to \(size) bytes: \(errno)")
    }
    munmap(mapping, capacity)
    mapping = pointer
    capacity = size
  }
}

struct SwapStoreError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}
