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

  /// On the loop's housekeeping: the watchdog's keep-alive when due, and the status line every few seconds.
  mutating func tick(now: UInt64, status: () -> String) {
    guard supervised else { return }
    if let watchdogInterval, now >= nextWatchdog {
      notify("WATCHDOG=1")
      nextWatchdog = now + watchdogInterval
    }
    if now >= nextStatus {
      notify("STATUS=\(status())")
      nextStatus = now + Self.statusInterval
    }
  }

  private func notify(_ state: String) {
    guard supervised else { return }
    _ = sd_notify(0, state)
  }
}
