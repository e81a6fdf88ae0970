/// The bytes every fault handler serves and the verifier expects: each 8-byte
/// word is a function of its byte offset in the mapping (a region's backing
/// offset plus the offset in the region), so a page copied to the wrong place,
/// a stale page or a zero page is caught.
enum Pattern {
  @inline(__always)
  static func word(at byteOffset: UInt64) -> UInt64 { (byteOffset &+ 1) &* 0x9E37_79B9_7F4A_7C15 }

  /// Fills `bytes` (a multiple of 8) at `page` with the pattern of `backingOffset`.
  @inline(__always)
  static func fill(_ page: UnsafeMutableRawPointer, bytes: Int, backingOffset: UInt64) {
    let words = page.assumingMemoryBound(to: UInt64.self)
    for index in 0..<bytes / 8 { words[index] = word(at: backingOffset &+ UInt64(index &* 8)) }
  }

  /// The first wrong word index of the page at `page`, or nil. `firstWordOnly`:
  /// plain memory, where only the touch's own store is the pattern and the rest is zero.
  static func mismatch(_ page: UnsafeRawPointer, bytes: Int, backingOffset: UInt64, firstWordOnly: Bool) -> Int? {
    let words = page.assumingMemoryBound(to: UInt64.self)
    if words[0] != word(at: backingOffset) { return 0 }
    for index in 1..<bytes / 8 {
      let expected = firstWordOnly ? 0 : word(at: backingOffset &+ UInt64(index &* 8))
      if words[index] != expected { return index }
    }
    return nil
  }
}
