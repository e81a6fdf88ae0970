import CSystemd
import Glibc

/// What systemd hears from a broker it runs as a `Type=notify` service
/// (NOTIFY_SOCKET set): that it serves, what it is doing now and then, that it
/// is alive (when the unit has `WatchdogSec=`), and that it stops. Without
/// NOTIFY_SOCKET it says nothing and costs nothing.
struct ServiceManager {
  private let supervised = getenv("NOTIFY_SOCKET") != nil
  /// Half the unit's watchdog interval, in nanoseconds (nil: no watchdog).
  private let watchdogInterval: UInt64?
  private var nextWatchdog: UInt64 = 0
  private var nextStatus: UInt64 = 0
  static let statusInterval: UInt64 = 5_000_000_000

  init() {
    var microseconds: UInt64 = 0
    watchdogInterval = sd_watchdog_enabled(0, &microseconds) > 0 ? microseconds * 1000 / 2 : nil
  }

  func ready(_ status: String) { notify("READY=1\nSTATUS=\(status)") }

  func stopping() { notify("STOPPING=1\nSTATUS=stopping") }

  /// On every loop wakeup: the watchdog's keep-alive when due; whether a
  /// status line is due (then `status(_:)`). Nothing is built on the way: the
  /// fault path runs through here.
  mutating func tick(now: UInt64) -> Bool {
    guard supervised else { return false }
    if let watchdogInterval, now >= nextWatchdog {
      notify("WATCHDOG=1")
      nextWatchdog = now + watchdogInterval
    }
    guard now >= nextStatus else { return false }
    nextStatus = now + Self.statusInterval
    return true
  }

  func status(_ line: String) { notify("STATUS=\(line)") }

  private func notify(_ state: String) {
    guard supervised else { return }
    _ = sd_notify(0, state)
  }
}
