import Glibc

/// A KVM call that failed: what was asked, and the errno when the kernel gave one.
struct KVMError: Error, CustomStringConvertible {
  let message: String
  let errno: CInt?

  init(_ message: String, errno: CInt? = nil) {
    self.message = message
    self.errno = errno
  }

  var description: String { errno.map { "\(message): \(String(cString: strerror($0))) (errno \($0))" } ?? message }

  /// A shim's `-errno` as a thrown error, or its non-negative value.
  @discardableResult
  static func check(_ result: CInt, _ what: @autoclosure () -> String) throws(KVMError) -> CInt {
    guard result >= 0 else { throw KVMError(what(), errno: -result) }
    return result
  }
}
