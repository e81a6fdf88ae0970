import Glibc
import LinuxSupport
import Synchronization

/// A counter shared by threads.
final class Counter: Sendable {
  let value = Atomic<Int>(0)
}

/// A live progress line on stderr ("restore: 1024/65536 pages, 51200 pages/s"),
/// redrawn every 100 ms by its own thread, and erased by `finish()`.
///
/// Drawn only when stdout and stderr are both terminals: output redirected to
/// a file or a pipe gets the final table alone, with no `\r` or escape codes.
final class Progress: Sendable {
  static let isShown = isatty(STDOUT_FILENO) == 1 && isatty(STDERR_FILENO) == 1

  private let running = Counter()
  private let thread: pthread_t?

  /// `done` counts the pages finished so far, out of `total`.
  init(label: String, total: Int, done: Counter) {
    guard Self.isShown else {
      thread = nil
      return
    }
    let start = monotonicNanoseconds()
    let running = self.running
    running.value.store(1, ordering: .relaxed)
    thread = spawnThread {
      while running.value.load(ordering: .relaxed) == 1 {
        let count = min(done.value.load(ordering: .relaxed), total)
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        let rate = seconds > 0 ? Int(Double(count) / seconds) : 0
        let line = "\r  \(label): \(count)/\(Wording.count(total, "page")), \(rate) pages/s   "
        line.withCString { _ = write(STDERR_FILENO, $0, strlen($0)) }
        usleep(100_000)
      }
    }
  }

  func finish() {
    guard let thread else { return }
    running.value.store(0, ordering: .relaxed)
    pthread_join(thread, nil)
    "\r\u{1B}[K".withCString { _ = write(STDERR_FILENO, $0, strlen($0)) }
  }
}
