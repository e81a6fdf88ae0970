/// The deterministic content the fixture plugin serves and the fixture client checks:
/// each 8-byte word is a function of its offset in the region's backing.
enum Pattern {
  static func word(backingOffset: UInt64, wordIndex: Int) -> UInt64 {
    (backingOffset &+ UInt64(wordIndex) &* 8 &+ 1) &* 0x9E37_79B9_7F4A_7C15
  }

  /// Fills one page (`page.count` bytes) at `backingOffset`.
  static func fill(_ page: UnsafeMutableRawBufferPointer, backingOffset: UInt64) {
    let words = page.bindMemory(to: UInt64.self)
    for index in 0..<words.count { words[index] = word(backingOffset: backingOffset, wordIndex: index) }
  }

  /// Whether the page at `backingOffset` is a hole (zeros) in scenario touch-holes
  /// (every 7th page from the 4th): served by `LaterPlugin` with zero decisions.
  static func isHole(backingOffset: UInt64) -> Bool { backingOffset / 4096 % 7 == 3 }

  /// The first word index of `page` that differs, or nil.
  static func mismatch(_ page: UnsafeRawBufferPointer, backingOffset: UInt64) -> Int? {
    let words = page.bindMemory(to: UInt64.self)
    for index in 0..<words.count where words[index] != word(backingOffset: backingOffset, wordIndex: index) { return index }
    return nil
  }
}
