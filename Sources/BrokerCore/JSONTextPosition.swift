/// A place in a JSON text for a person: its line and column, both from 1, the
/// column counted in characters (a tab is one).
///
/// Foundation's `JSONSerialization` names a syntax error's place only as a
/// byte offset inside its message ("Invalid value around character 25."), and
/// `JSONDecoder` not at all; a config file's reader wants the line.
public struct JSONTextPosition: Equatable, Sendable, CustomStringConvertible {
  public var line: Int
  public var column: Int

  public init(line: Int, column: Int) {
    self.line = line
    self.column = column
  }

  /// The position of byte `offset` of the UTF-8 `text`. The parser counts
  /// its offsets after a leading byte-order mark, so this does too; an offset
  /// at or past the end is the place just after the last character.
  public init(byteOffset offset: Int, in text: [UInt8]) {
    let bom: [UInt8] = [0xEF, 0xBB, 0xBF]
    let start = text.starts(with: bom) ? bom.count : 0
    let end = min(text.count, start + max(offset, 0))
    var line = 1
    var lineStart = start
    for index in start..<end where text[index] == UInt8(ascii: "\n") {
      line += 1
      lineStart = index + 1
    }
    self.line = line
    column = String(decoding: text[lineStart..<end], as: UTF8.self).count + 1
  }

  public var description: String { "line \(line), column \(column)" }

  /// Splits the message of a Foundation JSON syntax error into the byte offset
  /// it names ("around character 25", "at 9"; `textLength` for "Unexpected end
  /// of file"; nil when it names none, as for a number too large) and the
  /// reason without it, in lower case ("invalid value").
  public static func syntaxError(_ message: String, textLength: Int) -> (offset: Int?, reason: String) {
    var reason = message
    var offset: Int?
    for marker in [" around character ", " at "] {
      guard let range = reason.ranges(of: marker).last else { continue }
      let digits = reason[range.upperBound...].prefix { $0.isNumber }
      guard let value = Int(digits), reason[range.upperBound...].dropFirst(digits.count).allSatisfy({ $0 == "." }) else { continue }
      offset = value
      reason = String(reason[..<range.lowerBound])
      break
    }
    if offset == nil, message.lowercased().contains("end of file") || message.lowercased().contains("end of data") {
      offset = textLength
    }
    if reason.hasSuffix(".") { reason.removeLast() }
    if let first = reason.first, first.isUppercase, reason.dropFirst().first?.isUppercase != true {
      reason = first.lowercased() + reason.dropFirst()
    }
    return (offset, reason)
  }
}
