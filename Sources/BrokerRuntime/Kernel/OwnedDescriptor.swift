import LinuxSupport

/// A file descriptor with one owner: closed when the owner lets go of it, and
/// handed over only by consuming it, never copied as a number.
struct OwnedDescriptor: ~Copyable {
  let rawValue: CInt

  /// Takes ownership of `rawValue` (-1: none).
  init(_ rawValue: CInt = -1) { self.rawValue = rawValue }

  var isValid: Bool { rawValue >= 0 }

  /// Gives the descriptor up without closing it.
  consuming func release() -> CInt {
    let fd = rawValue
    discard self
    return fd
  }

  deinit { if rawValue >= 0 { closeDescriptor(rawValue) } }
}
