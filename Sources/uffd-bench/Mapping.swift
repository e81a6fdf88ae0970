import Glibc

/// A round's fresh anonymous memory, unmapped explicitly (the order of unmap
/// and client teardown matters: see `RoundRunner`).
struct Mapping {
  let base: UnsafeMutableRawPointer
  let length: Int

  init(length: Int) throws(BenchError) {
    guard let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), pointer != MAP_FAILED else {
      throw BenchError("cannot map \(length) bytes: errno \(errno)")
    }
    // Every mode measures 4 KiB faults: no transparent huge page may turn 512 faults into one.
    madvise(pointer, length, MADV_NOHUGEPAGE)
    base = pointer
    self.length = length
  }

  var address: UInt { UInt(bitPattern: base) }

  func unmap() { munmap(base, length) }
}
