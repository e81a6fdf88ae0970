import Glibc
import PluginSDK

/// Where the plugin keeps the pages swap-outs stored: a file the broker keeps
/// for this plugin's name (`DescriptorStore`), so that a restart after `kill -9`
/// finds them. An append-only log of records: the client's token, the region
/// id, the region offset (8 bytes each), then the page; a later record of the
/// same page replaces an earlier one.
final class PageLog {
  /// A region across plugin restarts: the client's token and the region's id.
  struct RegionKey: Hashable {
    var token: UInt128
    var regionID: UInt64
  }

  private let fd: CInt
  private var end: Int
  private let pageSize = Int(getpagesize())
  private var recordSize: Int { 32 + pageSize }

  /// Adopts the log the broker kept, or makes one and asks the broker to keep it.
  init(_ store: DescriptorStore) {
    if let kept = store.restored["pages"] {
      fd = kept
      end = Int(lseek(kept, 0, SEEK_END))
    } else {
      // An unlinked temporary file (a regular file: the store takes those and memfds).
      var template = Array("/tmp/conformance-pages-XXXXXX".utf8CString)
      fd = mkstemp(&template)
      precondition(fd >= 0, "mkstemp failed: \(errno)")
      _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
      unlink(template)
      end = 0
      store.keep(fd, as: "pages")  // it only grows: kept once is enough
    }
  }

  /// Appends one page of `region` at `offset`.
  func append(_ page: UnsafeRawBufferPointer, at offset: UInt64, of key: RegionKey) {
    precondition(page.count == pageSize, "pages of \(pageSize) bytes only")
    var record = [UInt8](repeating: 0, count: recordSize)
    record.withUnsafeMutableBytes { bytes in
      bytes.storeBytes(of: UInt64(truncatingIfNeeded: key.token >> 64), toByteOffset: 0, as: UInt64.self)
      bytes.storeBytes(of: UInt64(truncatingIfNeeded: key.token), toByteOffset: 8, as: UInt64.self)
      bytes.storeBytes(of: key.regionID, toByteOffset: 16, as: UInt64.self)
      bytes.storeBytes(of: offset, toByteOffset: 24, as: UInt64.self)
      UnsafeMutableRawBufferPointer(rebasing: bytes[32...]).copyMemory(from: page)
    }
    precondition(pwrite(fd, record, recordSize, off_t(end)) == recordSize, "cannot write the page log: \(errno)")
    end += recordSize
  }

  /// Every page in the log, by region and offset.
  func pages() -> [RegionKey: [UInt64: [UInt8]]] {
    var result: [RegionKey: [UInt64: [UInt8]]] = [:]
    var record = [UInt8](repeating: 0, count: recordSize)
    for start in stride(from: 0, to: end - recordSize + 1, by: recordSize) {
      guard pread(fd, &record, recordSize, off_t(start)) == recordSize else { break }
      record.withUnsafeBytes { bytes in
        let token = UInt128(bytes.load(fromByteOffset: 0, as: UInt64.self)) << 64 | UInt128(bytes.load(fromByteOffset: 8, as: UInt64.self))
        let key = RegionKey(token: token, regionID: bytes.load(fromByteOffset: 16, as: UInt64.self))
        result[key, default: [:]][bytes.load(fromByteOffset: 24, as: UInt64.self)] = Array(bytes[32...])
      }
    }
    return result
  }
}
