import SystemPackage

/// An error from the userfaultfd layer: a domain code with a human message,
/// and, when a system call failed, that call and its errno as the cause.
public struct UserfaultFDError: Error, Equatable, Sendable, CustomStringConvertible {
  /// What went wrong, for code to act on (the message is for people).
  public enum Code: Equatable, Sendable {
    /// userfaultfd(2) is refused to this process (see the message for the sysctl).
    case notPermitted
    /// The kernel has no userfaultfd at all.
    case unsupported
    /// Features that were required were not granted by the kernel.
    case featureUnavailable(UserfaultFD.Features)
    /// The descriptor handed to us is not a userfaultfd.
    case notAUserfaultfd
    /// A range is empty, misaligned, or not registrable.
    case invalidRange
    /// The descriptor was released or closed.
    case closed
    /// A system call failed for a reason of the environment.
    case systemCall
  }

  /// What went wrong.
  public var code: Code
  /// What went wrong, for a log line or a person.
  public var message: String
  /// The failing call and its errno, when a system call was the cause.
  public var syscall: String?
  /// The errno `syscall` failed with.
  public var errno: Errno?

  /// An error of `code`, with the failed system call and its errno if one was the cause.
  public init(_ code: Code, _ message: String, syscall: String? = nil, errno: Errno? = nil) {
    self.code = code
    self.message = message
    self.syscall = syscall
    self.errno = errno
  }

  public var description: String {
    guard let syscall, let errno else { return message }
    return "\(message) (\(syscall): \(errno))"
  }
}
