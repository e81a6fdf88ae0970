import Glibc

/// The kernel's own view of a client's address space, read from
/// `/proc/PID/maps`: the ground truth the broker consults when a fault lands
/// where its region table has nothing (a rare path; never per routine fault).
enum ProcessMappings {
  /// The mapping (VMA) of process `pid` containing `address`, or nil if none
  /// does or the file cannot be read (the process is gone).
  static func mapping(containing address: UInt, pid: Int32) -> Range<UInt>? {
    let fd = open("/proc/\(pid)/maps", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 8)
    defer { buffer.deallocate() }
    var kept = 0  // bytes of an unfinished line carried to the next read
    while true {
      let n = read(fd, buffer.baseAddress! + kept, buffer.count - kept)
      if n < 0 && errno == EINTR { continue }
      if n <= 0 { return nil }
      let end = kept + n
      var lineStart = 0
      for index in 0..<end where buffer[index] == UInt8(ascii: "\n") {
        if let range = parse(UnsafeRawBufferPointer(rebasing: buffer[lineStart..<index])) {
          if range.contains(address) { return range }
          if range.lowerBound > address { return nil }  // the file is sorted by address
        }
        lineStart = index + 1
      }
      kept = end - lineStart
      if kept == buffer.count { return nil }  // a line longer than the buffer: not a maps file
      if kept > 0 { (buffer.baseAddress!).copyMemory(from: buffer.baseAddress! + lineStart, byteCount: kept) }
    }
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
