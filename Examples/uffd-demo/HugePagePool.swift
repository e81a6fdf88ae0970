import Glibc

/// The kernel's pool of huge pages (`/proc/sys/vm/nr_hugepages`), raised for
/// the restore on huge pages and put back when the demo ends.
struct HugePagePool {
  static let path = "/proc/sys/vm/nr_hugepages"
  /// The size before the demo raised it.
  let old: Int

  /// Raises the pool by `count` pages; throws when it cannot (not root, no hugetlb, no memory).
  init(adding count: Int) throws {
    guard let old = Self.read() else { throw DemoError("cannot read \(Self.path): no huge pages in this kernel") }
    self.old = old
    guard Self.write(old + count), let now = Self.read(), now >= old + count else {
      _ = Self.write(old)
      throw DemoError("cannot reserve \(count) huge pages in \(Self.path) (run as root, with the memory free)")
    }
  }

  /// Puts the pool back to its old size.
  func release() { _ = Self.write(old) }

  private static func read() -> Int? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 32)
    guard fgets(&line, 32, file) != nil else { return nil }
    return Int(String(cString: line).filter(\.isNumber))
  }

  private static func write(_ value: Int) -> Bool {
    guard let file = fopen(path, "w") else { return false }
    let written = fputs("\(value)\n", file) >= 0
    return fclose(file) == 0 && written
  }
}
