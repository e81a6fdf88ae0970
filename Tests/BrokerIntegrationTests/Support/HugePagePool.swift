import Glibc

/// The kernel's pool of 2 MiB huge pages (`/proc/sys/vm/nr_hugepages`): a test
/// raises it by what it needs and puts the old value back when it is done.
enum HugePagePool {
  static let path = "/proc/sys/vm/nr_hugepages"
  static let pageSize = 2 << 20

  /// Whether this machine can reserve huge pages for a test: root, a hugetlb
  /// kernel, and room for 2 more (tried, then given back).
  static var available: Bool {
    (try? reserving(2) { true }) == true
  }

  /// Raises the pool by `count` free pages, runs `body`, then sets the pool back
  /// to its old size (pages still mapped by a process that outlived `body` stay
  /// surplus until it exits). Throws when the kernel cannot find the pages.
  static func reserving<T>(_ count: Int, _ body: () throws -> T) throws -> T {
    guard let old = read(), write(old + count), let now = read(), now >= old + count, free() >= count else {
      if let old = read() { _ = write(old) }
      throw HarnessError("cannot reserve \(count) huge pages of 2 MiB in \(path)")
    }
    defer { _ = write(old) }
    return try body()
  }

  private static func read() -> Int? {
    Int(readTextFile(path).split(whereSeparator: \.isWhitespace).first ?? "")
  }

  private static func write(_ value: Int) -> Bool {
    let fd = open(path, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    let text = "\(value)\n"
    return text.withCString { Glibc.write(fd, $0, strlen($0)) } == text.utf8.count
  }

  /// `HugePages_Free` of `/proc/meminfo`.
  private static func free() -> Int {
    let line = readTextFile("/proc/meminfo").split(separator: "\n").first { $0.hasPrefix("HugePages_Free:") }
    return line.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
  }
}
