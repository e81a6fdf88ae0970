/// Number formatting without Foundation (the bench links only what it measures).
enum Format {
  /// `value` with `decimals` digits after the point; "n/a" when it is not finite.
  static func fixed(_ value: Double, _ decimals: Int = 0) -> String {
    guard value.isFinite else { return "n/a" }
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    guard scaled < 9e18 else { return value < 0 ? "-huge" : "huge" }
    let units = Int64(scaled)
    let whole = units / Int64(scale)
    var text = (value < 0 && units != 0 ? "-" : "") + String(whole)
    if decimals > 0 {
      let fraction = String(units % Int64(scale))
      text += "." + String(repeating: "0", count: decimals - fraction.count) + fraction
    }
    return text
  }

  /// Right-aligns `text` in `width` columns.
  static func right(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : String(repeating: " ", count: width - text.count) + text
  }

  /// Left-aligns `text` in `width` columns.
  static func left(_ text: String, _ width: Int) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
  }

  /// One table row: the first cell left-aligned, the others right-aligned.
  static func row(_ cells: [String], widths: [Int]) -> String {
    var line = ""
    for (index, cell) in cells.enumerated() {
      let width = index < widths.count ? widths[index] : 10
      line += index == 0 ? left(cell, width) : " " + right(cell, width)
    }
    return line
  }
}
