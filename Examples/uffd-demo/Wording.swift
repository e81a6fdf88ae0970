/// Sizes and counts as a person reads them.
enum Wording {
  /// "1 page", "16 pages".
  static func count(_ value: Int, _ noun: String) -> String {
    "\(value) \(noun)\(value == 1 ? "" : "s")"
  }

  /// Bytes in the largest binary unit that holds at least 1 of them: "1000 bytes",
  /// "245.3 KiB", "32 MiB", "1.5 GiB" (one decimal below 100, none from 100 or
  /// when it is .0).
  static func size(_ bytes: Int) -> String {
    if bytes < 1024 { return count(bytes, "byte") }
    var value = Double(bytes) / 1024
    var unit = "KiB"
    for next in ["MiB", "GiB", "TiB"] where value >= 1024 {
      value /= 1024
      unit = next
    }
    let tenths = Int((value * 10).rounded())
    let text = value >= 100 || tenths % 10 == 0 ? "\(Int(value.rounded()))" : "\(tenths / 10).\(tenths % 10)"
    return text + " " + unit
  }
}
