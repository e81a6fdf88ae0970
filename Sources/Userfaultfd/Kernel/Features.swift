import CUserfaultfd

extension UserfaultFD {
  /// `UFFD_FEATURE_*`: what is asked of `UFFDIO_API`, and what the kernel granted.
  public struct Features: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let pagefaultFlagWP = Features(rawValue: 1 << 0)
    /// Fork events (needs CAP_SYS_PTRACE). `fork()` returns only once the FORK
    /// message is read, and glibc's `fork()` holds every malloc lock meanwhile:
    /// a reader in the *same* process that allocates (any Swift code) deadlocks
    /// it. Read such a uffd from another process (the broker does), or fork with `_Fork()`.
    public static let eventFork = Features(rawValue: 1 << 1)
    public static let eventRemap = Features(rawValue: 1 << 2)
    public static let eventRemove = Features(rawValue: 1 << 3)
    public static let missingHugetlbfs = Features(rawValue: 1 << 4)
    public static let missingShmem = Features(rawValue: 1 << 5)
    public static let eventUnmap = Features(rawValue: 1 << 6)
    public static let sigbus = Features(rawValue: 1 << 7)
    public static let threadID = Features(rawValue: 1 << 8)
    public static let minorHugetlbfs = Features(rawValue: 1 << 9)
    public static let minorShmem = Features(rawValue: 1 << 10)
    public static let exactAddress = Features(rawValue: 1 << 11)
    public static let wpHugetlbfsShmem = Features(rawValue: 1 << 12)
    public static let wpUnpopulated = Features(rawValue: 1 << 13)
    public static let poison = Features(rawValue: 1 << 14)
    public static let wpAsync = Features(rawValue: 1 << 15)
    public static let move = Features(rawValue: 1 << 16)

    /// The non-cooperative events a page server needs to stay correct while the
    /// client changes its mappings: remove, unmap, remap, and the faulting thread id.
    public static let nonCooperative: Features = [.eventRemove, .eventUnmap, .eventRemap, .threadID]

    static let names: [(Features, String)] = [
      (.pagefaultFlagWP, "pagefault_flag_wp"), (.eventFork, "event_fork"), (.eventRemap, "event_remap"),
      (.eventRemove, "event_remove"), (.missingHugetlbfs, "missing_hugetlbfs"), (.missingShmem, "missing_shmem"),
      (.eventUnmap, "event_unmap"), (.sigbus, "sigbus"), (.threadID, "thread_id"),
      (.minorHugetlbfs, "minor_hugetlbfs"), (.minorShmem, "minor_shmem"), (.exactAddress, "exact_address"),
      (.wpHugetlbfsShmem, "wp_hugetlbfs_shmem"), (.wpUnpopulated, "wp_unpopulated"), (.poison, "poison"),
      (.wpAsync, "wp_async"), (.move, "move"),
    ]

    public var description: String {
      let known = Self.names.filter { contains($0.0) }.map(\.1)
      let unknown = subtracting(Features(Self.names.map(\.0)))
      return "[" + (known + (unknown.isEmpty ? [] : ["0x" + String(unknown.rawValue, radix: 16)])).joined(separator: ", ") + "]"
    }
  }

  /// The ioctls a descriptor or a registered range supports (bit `_UFFDIO_*`).
  public struct Ioctls: OptionSet, Hashable, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    private init(bit: CInt) { rawValue = 1 << UInt64(bit) }

    public static let register = Ioctls(bit: cuffd_ioctl_bit_register)
    public static let unregister = Ioctls(bit: cuffd_ioctl_bit_unregister)
    public static let api = Ioctls(bit: cuffd_ioctl_bit_api)
    public static let wake = Ioctls(bit: cuffd_ioctl_bit_wake)
    public static let copy = Ioctls(bit: cuffd_ioctl_bit_copy)
    public static let zeropage = Ioctls(bit: cuffd_ioctl_bit_zeropage)
    public static let move = Ioctls(bit: cuffd_ioctl_bit_move)
    public static let writeProtect = Ioctls(bit: cuffd_ioctl_bit_writeprotect)
    public static let `continue` = Ioctls(bit: cuffd_ioctl_bit_continue)
    public static let poison = Ioctls(bit: cuffd_ioctl_bit_poison)
  }

  /// `UFFDIO_REGISTER_MODE_*`: which faults of a range are reported.
  public struct RegisterMode: OptionSet, Hashable, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Faults on pages that are not present.
    public static let missing = RegisterMode(rawValue: 1 << 0)
    /// Writes to write-protected pages.
    public static let writeProtect = RegisterMode(rawValue: 1 << 1)
    /// Faults on pages present in the page cache but not mapped (shmem, hugetlbfs).
    public static let minor = RegisterMode(rawValue: 1 << 2)
  }
}
