import CUserfaultfd
import Glibc
import LinuxSupport
import Synchronization
import SystemPackage

/// A userfaultfd: the Swift form of the seed's `UserfaultFD`.
///
/// A userfaultfd is bound to the address space (mm) of the process that created
/// it; any process holding the descriptor may resolve that space's faults. This
/// type owns the descriptor and closes it when deallocated, unless `release()`
/// handed it on. All methods are safe to call from any thread: the kernel
/// serializes them.
///
/// Errors of the environment (a refused `userfaultfd(2)`, a missing feature,
/// a range the kernel will not register) throw `UserfaultFDError`; races with
/// the faulting process are the resolving ioctls' `IoctlOutcome`, not errors;
/// EBADF in a resolving ioctl (a descriptor used after `release()`, or closed
/// behind this object's back) is a bug and traps.
///
/// **Closing the last reference to a uffd stops interception**: registered pages
/// that were never filled then read as zeros. Keep one open for as long as the
/// registered memory lives.
public final class UserfaultFD: Sendable {
  private let descriptor: Atomic<CInt>
  /// The features the kernel granted at `UFFDIO_API` (or that the creator reported).
  public let features: Features
  /// The ioctls the descriptor supports (as reported by `UFFDIO_API`).
  public let ioctls: Ioctls

  /// The descriptor, or -1 after `release()`.
  public var fileDescriptor: FileDescriptor { FileDescriptor(rawValue: descriptor.load(ordering: .relaxed)) }
  var fd: CInt { descriptor.load(ordering: .relaxed) }

  private init(fd: CInt, features: Features, ioctls: Ioctls) {
    self.descriptor = Atomic(fd)
    self.features = features
    self.ioctls = ioctls
  }

  deinit { closeDescriptor(descriptor.load(ordering: .relaxed)) }

  /// Options of the descriptor itself (`userfaultfd(2)` flags).
  public struct Options: Sendable {
    /// Reads return EAGAIN instead of blocking (the dispatcher needs this).
    public var nonBlocking = true
    /// Handle only faults from user mode: permitted to unprivileged users even
    /// when `vm.unprivileged_userfaultfd` is 0, but kernel-mode faults (a
    /// `read(2)` into the range, for instance) then get EFAULT.
    public var userModeOnly = false
    /// Options with the defaults above: non-blocking, all faults.
    public init(nonBlocking: Bool = true, userModeOnly: Bool = false) {
      self.nonBlocking = nonBlocking
      self.userModeOnly = userModeOnly
    }
  }

  /// Creates a userfaultfd for the calling process and negotiates `UFFDIO_API`.
  ///
  /// Enables those of `features` that this kernel offers; they are `features`
  /// of the result. If any of `required` (default: all of `features`) is not
  /// offered, throws `.featureUnavailable` naming them. Tries `userfaultfd(2)`
  /// and falls back to `/dev/userfaultfd`. EPERM is explained (the sysctl and
  /// the user-mode-only flag) as `.notPermitted`; a kernel without userfaultfd
  /// throws `.unsupported`, any other failure `.systemCall`. No descriptor is
  /// left open when it throws.
  ///
  /// The descriptor is bound to the calling process's memory: create it in the
  /// process whose faults it will report (before any sandboxing), then hand it
  /// on (`release()`, SCM_RIGHTS) if another process is to serve them.
  public static func create(
    features: Features = .nonCooperative, required: Features? = nil, options: Options = Options()
  ) throws(UserfaultFDError) -> UserfaultFD {
    var flags = O_CLOEXEC
    if options.nonBlocking { flags |= O_NONBLOCK }
    if options.userModeOnly { flags |= UFFD_USER_MODE_ONLY }
    let fd: CInt
    switch valueOrErrno(cuffd_create(flags)) {
    case .success(let value): fd = value
    case .failure(let errno):
      switch errno {
      case .notPermitted:
        throw UserfaultFDError(
          .notPermitted,
          "userfaultfd is not permitted to this process: run as root (or with CAP_SYS_PTRACE), set sysctl vm.unprivileged_userfaultfd=1, grant access to /dev/userfaultfd, or create it with userModeOnly",
          syscall: "userfaultfd", errno: errno)
      case .noFunction:
        throw UserfaultFDError(.unsupported, "this kernel has no userfaultfd (CONFIG_USERFAULTFD)", syscall: "userfaultfd", errno: errno)
      default:
        throw UserfaultFDError(.systemCall, "cannot create a userfaultfd", syscall: "userfaultfd", errno: errno)
      }
    }
    // UFFDIO_API fails as a whole on a feature the kernel lacks, and on success
    // reports every feature it supports, not the ones enabled: so ask only for
    // what it offers, and remember what was asked.
    let available: Features
    do {
      available = try probeFeatures(userModeOnly: options.userModeOnly)
    } catch {
      closeDescriptor(fd)
      throw error
    }
    let missing = (required ?? features).subtracting(available)
    if !missing.isEmpty {
      closeDescriptor(fd)
      throw UserfaultFDError(.featureUnavailable(missing), "the kernel does not support userfaultfd features \(missing)")
    }
    var enabled = features.intersection(available)
    if enabled.contains(.wpAsync) { enabled.insert(.wpUnpopulated) }  // the kernel implies it
    var offered: UInt64 = 0
    var ioctls: UInt64 = 0
    let rc = cuffd_api_handshake(fd, enabled.rawValue, &offered, &ioctls)
    if rc < 0 {
      closeDescriptor(fd)
      throw UserfaultFDError(.systemCall, "UFFDIO_API failed for features \(enabled)", syscall: "UFFDIO_API", errno: Errno(rawValue: -rc))
    }
    return UserfaultFD(fd: fd, features: enabled, ioctls: Ioctls(rawValue: ioctls))
  }

  /// The features this kernel offers, read from a throw-away descriptor
  /// (`UFFDIO_API` with no features). Throws `.systemCall` if no userfaultfd
  /// can be created (with `userModeOnly`, a user-mode-only one) or the handshake fails.
  public static func probeFeatures(userModeOnly: Bool = false) throws(UserfaultFDError) -> Features {
    let fd: CInt
    switch valueOrErrno(cuffd_create(O_CLOEXEC | O_NONBLOCK | (userModeOnly ? UFFD_USER_MODE_ONLY : 0))) {
    case .success(let value): fd = value
    case .failure(let errno): throw UserfaultFDError(.systemCall, "cannot create a userfaultfd", syscall: "userfaultfd", errno: errno)
    }
    defer { closeDescriptor(fd) }
    var granted: UInt64 = 0
    var ioctls: UInt64 = 0
    let rc = cuffd_api_handshake(fd, 0, &granted, &ioctls)
    guard rc == 0 else { throw UserfaultFDError(.systemCall, "UFFDIO_API failed", syscall: "UFFDIO_API", errno: Errno(rawValue: -rc)) }
    return Features(rawValue: granted)
  }

  /// Whether this kernel supports userfaultfd and this process may create one
  /// (a full one, not user-mode only): creates one and closes it.
  public static var isSupported: Bool {
    (try? create(features: [])) != nil
  }

  /// Takes ownership of a descriptor received from elsewhere (another process,
  /// SCM_RIGHTS, a fork event). Refuses a descriptor that is not a userfaultfd.
  /// `UFFDIO_API` was already negotiated by its creator, so `features` and
  /// `ioctls` are what the creator reports it was granted. On failure the
  /// descriptor is left open (the caller still owns it).
  ///
  /// With `features` nil they are read from the kernel (`negotiatedFeatures(of:)`),
  /// and a userfaultfd that has not negotiated its API is refused: trust the
  /// kernel, not the sender. Throws `.notAUserfaultfd` when refused. An adopted
  /// descriptor is made non-blocking (reads must never block an event loop).
  public init(adopting fileDescriptor: FileDescriptor, features: Features?, ioctls: Ioctls = []) throws(UserfaultFDError) {
    switch valueOrErrno(cuffd_is_userfaultfd(fileDescriptor.rawValue)) {
    case .success(1): break
    case .success: throw UserfaultFDError(.notAUserfaultfd, "descriptor \(fileDescriptor.rawValue) is not a userfaultfd")
    case .failure(let errno):
      throw UserfaultFDError(.notAUserfaultfd, "descriptor \(fileDescriptor.rawValue) cannot be inspected", syscall: "readlink(/proc/self/fd)", errno: errno)
    }
    guard let features = features ?? Self.negotiatedFeatures(of: fileDescriptor) else {
      throw UserfaultFDError(.notAUserfaultfd, "descriptor \(fileDescriptor.rawValue) is a userfaultfd that has not negotiated its API (UFFDIO_API)")
    }
    // Reads must never block the caller's event loop.
    let flags = fcntl(fileDescriptor.rawValue, F_GETFL)
    if flags >= 0 && flags & O_NONBLOCK == 0 { _ = fcntl(fileDescriptor.rawValue, F_SETFL, flags | O_NONBLOCK) }
    self.descriptor = Atomic(fileDescriptor.rawValue)
    self.features = features
    self.ioctls = ioctls
  }

  /// The features a userfaultfd's `UFFDIO_API` enabled, as the kernel reports
  /// them (`/proc/self/fdinfo`), not as whoever sent the descriptor claims;
  /// nil if it has not negotiated its API yet (its reads would fail with
  /// EINVAL: a reader polling it would spin) or cannot be inspected.
  public static func negotiatedFeatures(of fileDescriptor: FileDescriptor) -> Features? {
    let fd = open("/proc/self/fdinfo/\(fileDescriptor.rawValue)", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 4096)
    let count = read(fd, &buffer, buffer.count)
    guard count > 0 else { return nil }
    // "API:\t<api>:<features>:<ioctls>", in hex; the features carry the kernel's "initialized" bit.
    let text = String(decoding: buffer[..<count], as: UTF8.self)
    guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("API:") }) else { return nil }
    let fields = line.dropFirst(4).trimmingPrefix(while: { $0 == "\t" || $0 == " " }).split(separator: ":")
    let initialized: UInt64 = 1 << 31
    guard fields.count == 3, let features = UInt64(fields[1], radix: 16), features & initialized != 0 else { return nil }
    return Features(rawValue: features & ~initialized)
  }

  /// Gives up ownership: returns the descriptor, which this object will no
  /// longer close; the caller owns it (and must keep it, or a copy, open while
  /// the registered memory lives). The object is spent: its ioctls must not be
  /// called afterwards (the resolving ones trap on EBADF). A second call returns -1.
  public func release() -> FileDescriptor {
    FileDescriptor(rawValue: descriptor.exchange(-1, ordering: .relaxed))
  }

  // MARK: - Ranges

  /// Registers `length` bytes at `address` (page aligned) for `mode`; returns the
  /// ioctls the kernel allows on that range (for instance no `.zeropage` on hugetlbfs).
  ///
  /// `address` is in the address space the descriptor is bound to (its
  /// creator's). Throws `.invalidRange` for EINVAL (misaligned, not mapped, a
  /// kind of memory or a `mode` this kernel cannot register there: a caller may
  /// retry with a narrower mode), `.systemCall` otherwise.
  @discardableResult
  public func register(address: UInt, length: Int, mode: RegisterMode = .missing) throws(UserfaultFDError) -> Ioctls {
    var ioctls: UInt64 = 0
    let rc = cuffd_register(fd, UInt64(address), UInt64(length), mode.rawValue, &ioctls)
    if rc < 0 {
      let errno = Errno(rawValue: -rc)
      let code: UserfaultFDError.Code = errno == .invalidArgument ? .invalidRange : .systemCall
      throw UserfaultFDError(code, "cannot register \(length) bytes at 0x\(String(address, radix: 16))", syscall: "UFFDIO_REGISTER", errno: errno)
    }
    return Ioctls(rawValue: ioctls)
  }

  /// Stops intercepting faults in the range. Faults already queued are still
  /// read. Throws `.systemCall` if the kernel refuses.
  public func unregister(address: UInt, length: Int) throws(UserfaultFDError) {
    let rc = cuffd_unregister(fd, UInt64(address), UInt64(length))
    if rc < 0 {
      throw UserfaultFDError(.systemCall, "cannot unregister \(length) bytes at 0x\(String(address, radix: 16))", syscall: "UFFDIO_UNREGISTER", errno: Errno(rawValue: -rc))
    }
  }

  // MARK: - Resolving faults

  /// `UFFDIO_COPY`: atomically fills `length` bytes at `address` (page aligned,
  /// in a registered missing-mode range) with the bytes at `source` (in this
  /// process) and wakes the threads waiting on the range unless `wake` is false.
  /// `source` must hold `length` readable bytes. With `writeProtect`, the
  /// filled pages are write-protected (a range registered with `.writeProtect`).
  /// Races are outcomes (see `IoctlOutcome`); EBADF traps.
  public func copy(to address: UInt, from source: UnsafeRawPointer, length: Int, wake: Bool = true, writeProtect: Bool = false) -> IoctlOutcome {
    var done: Int64 = 0
    var mode: UInt64 = wake ? 0 : UInt64(UFFDIO_COPY_MODE_DONTWAKE)
    if writeProtect { mode |= UInt64(UFFDIO_COPY_MODE_WP) }
    let rc = cuffd_copy(fd, UInt64(address), source, UInt64(length), mode, &done)
    return IoctlOutcome.classify(rc: rc, result: done, length: length)
  }

  /// `UFFDIO_ZEROPAGE`: maps zero pages over the range (page aligned, in a
  /// registered missing-mode range; a later write takes a copy-on-write fault).
  /// Races are outcomes (see `IoctlOutcome`); EBADF traps.
  public func zero(address: UInt, length: Int, wake: Bool = true) -> IoctlOutcome {
    var done: Int64 = 0
    let rc = cuffd_zeropage(fd, UInt64(address), UInt64(length), wake ? 0 : UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE), &done)
    return IoctlOutcome.classify(rc: rc, result: done, length: length)
  }

  /// `UFFDIO_CONTINUE`: maps the page-cache pages already present (a range
  /// registered with `.minor`). Races are outcomes (see `IoctlOutcome`); EBADF traps.
  public func `continue`(address: UInt, length: Int, wake: Bool = true) -> IoctlOutcome {
    var done: Int64 = 0
    let rc = cuffd_continue(fd, UInt64(address), UInt64(length), wake ? 0 : UInt64(UFFDIO_CONTINUE_MODE_DONTWAKE), &done)
    return IoctlOutcome.classify(rc: rc, result: done, length: length)
  }

  /// `UFFDIO_POISON`: marks the range (page aligned, needs `.poison`) so that
  /// accesses get SIGBUS (fail closed). Races are outcomes (see `IoctlOutcome`); EBADF traps.
  public func poison(address: UInt, length: Int, wake: Bool = true) -> IoctlOutcome {
    var done: Int64 = 0
    let rc = cuffd_poison(fd, UInt64(address), UInt64(length), wake ? 0 : 1, &done)
    return IoctlOutcome.classify(rc: rc, result: done, length: length)
  }

  /// Poisons every missing page of the range; present pages keep their bytes
  /// (`UFFDIO_POISON` stops at each with EEXIST, and goes on after it). For
  /// memory no one will serve any more: it fails with SIGBUS at the access
  /// instead of reading zeros once the uffd is closed. A fill must lie in one
  /// mapping (ENOENT otherwise), so a range that spans several is halved until
  /// each part does. Best effort: it stops where the process exited or a map
  /// change is pending.
  public func poisonMissing(address: UInt, length: Int) {
    let end = address + UInt(length)
    var start = address
    while start < end {
      switch poison(address: start, length: Int(end - start)) {
      case .done, .targetExited, .failed, .notNow: return
      case .partial(let bytes): start += UInt(bytes)
      case .alreadyPresent: start += UInt(systemPageSize)
      case .rangeGone:
        let pages = Int(end - start) / systemPageSize
        guard pages > 1 else { return }  // unmapped, or not this uffd's
        let middle = start + UInt(pages / 2 * systemPageSize)
        poisonMissing(address: start, length: Int(middle - start))
        poisonMissing(address: middle, length: Int(end - middle))
        return
      }
    }
  }

  /// `UFFDIO_WAKE`: wakes the threads waiting on faults in the range (after
  /// DONTWAKE fills, or when a fault's range went away). Wakes nobody harmlessly.
  /// Returns the errno of a failed ioctl (EINVAL for a misaligned range).
  @discardableResult
  public func wake(address: UInt, length: Int) -> Result<Void, Errno> {
    valueOrErrno(cuffd_wake(fd, UInt64(address), UInt64(length))).map { _ in () }
  }

  /// `UFFDIO_WRITEPROTECT`: write-protects (or, with `protect: false`, unprotects
  /// and wakes) the range, which must be registered with `.writeProtect`.
  /// Returns the errno of a failed ioctl: EAGAIN while a map change is unread,
  /// like the resolving ioctls.
  public func writeProtect(address: UInt, length: Int, protect: Bool, wake: Bool = true) -> Result<Void, Errno> {
    var mode: UInt64 = protect ? UInt64(UFFDIO_WRITEPROTECT_MODE_WP) : 0
    if !wake { mode |= UInt64(UFFDIO_WRITEPROTECT_MODE_DONTWAKE) }
    return valueOrErrno(cuffd_writeprotect(fd, UInt64(address), UInt64(length), mode)).map { _ in () }
  }
}
