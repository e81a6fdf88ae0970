import LinuxSupport
import Userfaultfd

/// The in-process baseline's handler: what the seed did, on the Userfaultfd
/// module. It fills one page-aligned buffer with the faulting page's pattern
/// (the same work a plugin does) and UFFDIO_COPYs it in.
final class InProcessCopyHandler: UserfaultFDHandler {
  private let base: UInt
  private let page: UnsafeMutableRawPointer
  private let pageSize = systemPageSize
  /// Faults resolved; read after the dispatcher stopped.
  private(set) var faults = 0

  init(base: UInt) {
    self.base = base
    page = .allocate(byteCount: systemPageSize, alignment: systemPageSize)
  }

  deinit { page.deallocate() }

  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    let address = fault.address & ~UInt(pageSize - 1)
    Pattern.fill(page, bytes: pageSize, backingOffset: UInt64(address &- base))
    faults += 1
    let outcome = uffd.copy(to: address, from: page, length: pageSize)
    return PagefaultResult(settling: outcome, address: address, length: pageSize, on: uffd)
  }

  func removed(_ range: Range<UInt>) {}
  func unmapped(_ range: Range<UInt>) {}
  func remapped(from: UInt, to: UInt, length: Int) {}
}
