import BrokerCore
import Glibc

/// The kernel's own view of a client's address space, read from
/// `/proc/PID/maps` and `/proc/PID/smaps`: the ground truth the broker consults
/// on rare paths (a fault where its table has nothing, a fork), never per
/// routine fault.
enum ProcessMappings {
  /// The mapping (VMA) of process `pid` containing `address`, or nil if none
  /// does or the file cannot be read (the process is gone).
  static func mapping(containing address: UInt, pid: Int32) -> Range<UInt>? {
    var found: Range<UInt>?
    forEachLine(of: "/proc/\(pid)/maps") { line in
      guard let range = parse(line) else { return true }
      if range.contains(address) { found = range }
      return range.upperBound <= address  // the file is sorted by address
    }
    return found
  }

  /// The mappings of process `pid` marked `MADV_WIPEONFORK` (VmFlags `wf`): a
  /// forked child's copy of them is new memory, zero until written.
  static func wipedOnFork(pid: Int32) -> [Range<UInt>] {
    var wiped: [Range<UInt>] = []
    var current: Range<UInt>?
    forEachLine(of: "/proc/\(pid)/smaps") { line in
      if let range = parse(line) {
        current = range
      } else if let current, line.starts(with: "VmFlags:".utf8), contains(line, word: "wf") {
        wiped.append(current)
      }
      return true
    }
    return wiped
  }

  /// Calls `body` with each line (without its newline) until it returns false.
  private static func forEachLine(of path: String, _ body: (UnsafeRawBufferPointer) -> Bool) {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return }
    defer { close(fd) }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 8)
    defer { buffer.deallocate() }
    var kept = 0  // bytes of an unfinished line carried to the next read
    while true {
      let n = read(fd, buffer.baseAddress! + kept, buffer.count - kept)
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return }
      let end = kept + n
      var lineStart = 0
      for index in 0..<end where buffer[index] == UInt8(ascii: "\n") {
        guard body(UnsafeRawBufferPointer(rebasing: buffer[lineStart..<index])) else { return }
        lineStart = index + 1
      }
      kept = end - lineStart
      if kept == buffer.count { return }  // a line longer than the buffer: not a maps file
      if kept > 0 { buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + lineStart, byteCount: kept) }
    }
  }

  /// Whether the space-separated `line` has `word` among its fields.
  private static func contains(_ line: UnsafeRawBufferPointer, word: String) -> Bool {
    line.split(separator: UInt8(ascii: " ")).contains { $0.elementsEqual(word.utf8) }
  }

  /// `start-end` (hex) at the head of a maps line.
  static func parse(_ line: UnsafeRawBufferPointer) -> Range<UInt>? {
    var start: UInt = 0
    var end: UInt = 0
    var inEnd = false
    for byte in line {
      let digit: UInt
      switch byte {
      case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt(byte - UInt8(ascii: "0"))
      case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt(byte - UInt8(ascii: "a") + 10)
      case UInt8(ascii: "-") where !inEnd:
        inEnd = true
        continue
      case UInt8(ascii: " ") where inEnd:
        return start < end ? start..<end : nil
      default: return nil
      }
      if inEnd { end = end << 4 | digit } else { start = start << 4 | digit }
    }
    return nil
  }
}
