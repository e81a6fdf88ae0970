import CMallocCounter
import Glibc
import LinuxSupport

// Each child role gets one end of a SOCK_SEQPACKET socketpair as fd 3.
// Child → bench: one byte `R` when it is serving. Bench → child: one byte `S`,
// answered by a `ChildStats` packet. End of stream (the bench closed it or
// died): the child stops. A dedicated thread answers, so the broker's and the
// plugin's own loops are untouched, and it allocates nothing, so it does not
// disturb the malloc count it reports.

/// Counters a child process reports on request (also used for deltas and sums).
struct ChildStats: Sendable {
  var mallocCalls: UInt64 = 0
  /// Faults the child decided (plugins); 0 for the broker (its statistics are confined to its loop thread).
  var faults: UInt64 = 0
  var userNs: UInt64 = 0
  var systemNs: UInt64 = 0

  var cpuNs: UInt64 { userNs &+ systemNs }

  /// This process now.
  static func current(faults: UInt64) -> ChildStats {
    let calls = malloc_counter_calls()
    let usage = ResourceUsage.current()
    return ChildStats(mallocCalls: calls, faults: faults, userNs: usage.userNs, systemNs: usage.systemNs)
  }

  static func - (after: ChildStats, before: ChildStats) -> ChildStats {
    ChildStats(mallocCalls: after.mallocCalls &- before.mallocCalls, faults: after.faults &- before.faults,
               userNs: after.userNs &- before.userNs, systemNs: after.systemNs &- before.systemNs)
  }

  static func + (a: ChildStats, b: ChildStats) -> ChildStats {
    ChildStats(mallocCalls: a.mallocCalls &+ b.mallocCalls, faults: a.faults &+ b.faults,
               userNs: a.userNs &+ b.userNs, systemNs: a.systemNs &+ b.systemNs)
  }
}

/// The child's end of the control socket.
struct ControlResponder: Sendable {
  let fd: CInt

  /// Tells the bench this child is serving.
  func sendReady() {
    var byte: UInt8 = UInt8(ascii: "R")
    _ = send(fd, &byte, 1, CInt(MSG_NOSIGNAL))
  }

  /// Answers stats requests on a thread of its own until end of stream, then calls `onClose`.
  func start(faults: @escaping @Sendable () -> UInt64, onClose: @escaping @Sendable () -> Void) {
    let fd = self.fd
    _ = spawnThread {
      // Signals stay with the role's main thread (the broker reads SIGTERM from a signalfd).
      var all = sigset_t()
      sigfillset(&all)
      pthread_sigmask(SIG_BLOCK, &all, nil)
      var request: UInt8 = 0
      while true {
        let received = recv(fd, &request, 1, 0)
        if received < 0 && errno == EINTR { continue }
        if received <= 0 { break }
        var stats = ChildStats.current(faults: faults())
        _ = withUnsafeBytes(of: &stats) { send(fd, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }
      }
      onClose()
    }
  }
}

/// CPU time and minor faults of this process (all threads), from getrusage.
struct ResourceUsage {
  var userNs: UInt64
  var systemNs: UInt64
  var minorFaults: UInt64

  var cpuNs: UInt64 { userNs &+ systemNs }

  static func current() -> ResourceUsage {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    func ns(_ time: timeval) -> UInt64 { UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_usec) &* 1_000 }
    return ResourceUsage(userNs: ns(usage.ru_utime), systemNs: ns(usage.ru_stime), minorFaults: UInt64(usage.ru_minflt))
  }
}
