import CUserfaultfd

extension UserfaultFD {
  /// `UFFD_FEATURE_*`: what is asked of `UFFDIO_API`, and what the kernel granted.
  public struct Features: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Fault messages carry the write-protect flag (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    public static let pagefaultFlagWP = Features(rawValue: 1 << 0)
    /// Fork events (needs CAP_SYS_PTRACE). `fork()` returns only once the FORK
    /// message is read, and glibc's `fork()` holds every malloc lock meanwhile:
    /// a reader in the *same* process that allocates (any Swift code) deadlocks
    /// it. Read such a uffd from another process (the broker does), or fork with `_Fork()`.
    public static let eventFork = Features(rawValue: 1 << 1)
    /// `mremap` of a registered range is reported (`remapped`); the caller of `mremap` waits until the event is read.
    public static let eventRemap = Features(rawValue: 1 << 2)
    /// `MADV_DONTNEED`/`MADV_REMOVE` over a registered range is reported (`removed`); the madvising thread waits until the event is read.
    public static let eventRemove = Features(rawValue: 1 << 3)
    /// Missing-mode registration of hugetlbfs mappings.
    public static let missingHugetlbfs = Features(rawValue: 1 << 4)
    /// Missing-mode registration of shmem and memfd mappings.
    public static let missingShmem = Features(rawValue: 1 << 5)
    /// `munmap` of a registered range is reported (`unmapped`).
    public static let eventUnmap = Features(rawValue: 1 << 6)
    /// No fault is reported: a missing page raises SIGBUS in the faulting thread instead.
    public static let sigbus = Features(rawValue: 1 << 7)
    /// Fault messages carry the faulting thread's id (`Pagefault.thread`).
    public static let threadID = Features(rawValue: 1 << 8)
    /// Minor-mode registration (`RegisterMode.minor`) of hugetlbfs mappings.
    public static let minorHugetlbfs = Features(rawValue: 1 << 9)
    /// Minor-mode registration (`RegisterMode.minor`) of shmem mappings.
    public static let minorShmem = Features(rawValue: 1 << 10)
    /// Fault addresses are exact, not rounded down to the page.
    public static let exactAddress = Features(rawValue: 1 << 11)
    /// Write-protect mode on hugetlbfs and shmem mappings.
    public static let wpHugetlbfsShmem = Features(rawValue: 1 << 12)
    /// Write-protect mode also covers pages never populated (they are protected as if zero-filled).
    public static let wpUnpopulated = Features(rawValue: 1 << 13)
    /// `UFFDIO_POISON` is available (`UserfaultFD.poison(address:length:wake:)`).
    public static let poison = Features(rawValue: 1 << 14)
    /// Write faults on protected pages are resolved by the kernel itself, with no message (implies `wpUnpopulated`).
    public static let wpAsync = Features(rawValue: 1 << 15)
    /// `UFFDIO_MOVE` is available.
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

    /// `UFFDIO_REGISTER`.
    public static let register = Ioctls(bit: cuffd_ioctl_bit_register)
    /// `UFFDIO_UNREGISTER`.
    public static let unregister = Ioctls(bit: cuffd_ioctl_bit_unregister)
    /// `UFFDIO_API`.
    public static let api = Ioctls(bit: cuffd_ioctl_bit_api)
    /// `UFFDIO_WAKE`.
    public static let wake = Ioctls(bit: cuffd_ioctl_bit_wake)
    /// `UFFDIO_COPY`.
    public static let copy = Ioctls(bit: cuffd_ioctl_bit_copy)
    /// `UFFDIO_ZEROPAGE` (not on hugetlbfs).
    public static let zeropage = Ioctls(bit: cuffd_ioctl_bit_zeropage)
    /// `UFFDIO_MOVE`.
    public static let move = Ioctls(bit: cuffd_ioctl_bit_move)
    /// `UFFDIO_WRITEPROTECT`.
    public static let writeProtect = Ioctls(bit: cuffd_ioctl_bit_writeprotect)
    /// `UFFDIO_CONTINUE`.
    public static let `continue` = Ioctls(bit: cuffd_ioctl_bit_continue)
    /// `UFFDIO_POISON`.
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
