import ArgumentParser
import Foundation
import Glibc
import Logging

/// The broker's log lines on stderr: `text` (for people), `logfmt` or `json`
/// (for collectors), each with a millisecond UTC timestamp. Under systemd's
/// journal (JOURNAL_STREAM set) a line starts with its syslog priority (`<3>`)
/// and has no timestamp: the journal stamps lines itself.
struct BrokerLogHandler: LogHandler {
  enum Format: String, ExpressibleByArgument, CaseIterable {
    case text, logfmt, json
  }

  let format: Format
  let label: String
  let journald = getenv("JOURNAL_STREAM") != nil
  var logLevel: Logger.Level = .info
  var metadata: Logger.Metadata = [:]
  var metadataProvider: Logger.MetadataProvider?

  subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  func log(event: LogEvent) {
    let fields = metadata.merging(event.metadata ?? [:]) { $1 }.sorted { $0.key < $1.key }
    let stamp = journald ? nil : Self.timestamp()
    var line = journald ? "<\(Self.priority(event.level))>" : ""
    switch format {
    case .text:
      line += (stamp.map { $0 + " " } ?? "") + "\(event.level) \(label): \(event.message)"
      for (key, value) in fields { line += " \(key)=\(Self.logfmtValue("\(value)"))" }
    case .logfmt:
      line += (stamp.map { "ts=\($0) " } ?? "") + "level=\(event.level) msg=\(Self.logfmtValue(event.message.description))"
      for (key, value) in fields { line += " \(key)=\(Self.logfmtValue("\(value)"))" }
    case .json:
      var members = (stamp.map { ["\"ts\":\(Self.jsonString($0))"] } ?? []) + ["\"level\":\"\(event.level)\"", "\"msg\":\(Self.jsonString(event.message.description))"]
      members += fields.map { "\(Self.jsonString($0.key)):\(Self.jsonString("\($0.value)"))" }
      line += "{" + members.joined(separator: ",") + "}"
    }
    line += "\n"
    // One write per line: lines from different threads never interleave.
    _ = line.withCString { write(2, $0, strlen($0)) }
  }

  /// syslog priorities, as sd-daemon(3) prefixes read them.
  static func priority(_ level: Logger.Level) -> Int {
    switch level {
    case .trace, .debug: 7
    case .info: 6
    case .notice: 5
    case .warning: 4
    case .error: 3
    case .critical: 2
    }
  }

  /// Now in UTC, to the millisecond: 2026-12-05T07:42:24.123Z.
  static func timestamp() -> String {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    var parts = tm()
    var seconds = now.tv_sec
    gmtime_r(&seconds, &parts)
    let date = String(format: "%04d-%02d-%02dT%02d:%02d:%02d", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1, Int(parts.tm_mday),
                      Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec))
    return date + "." + String(format: "%03d", Int(now.tv_nsec / 1_000_000)) + "Z"
  }

  /// A logfmt value: bare when it is one plain word, else quoted with `"` and `\` escaped.
  static func logfmtValue(_ value: String) -> String {
    let plain = !value.isEmpty && value.unicodeScalars.allSatisfy { $0.value > 0x20 && $0 != "\"" && $0 != "=" && $0 != "\\" && $0.value < 0x7F }
    return plain ? value : jsonString(value)
  }

  /// A JSON string literal (also a valid quoted logfmt value).
  static func jsonString(_ value: String) -> String {
    var out = "\""
    for scalar in value.unicodeScalars {
      switch scalar {
      case "\"": out += "\\\""
      case "\\": out += "\\\\"
      case "\n": out += "\\n"
      case "\r": out += "\\r"
      case "\t": out += "\\t"
      case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
      default: out.unicodeScalars.append(scalar)
      }
    }
    return out + "\""
  }
}
