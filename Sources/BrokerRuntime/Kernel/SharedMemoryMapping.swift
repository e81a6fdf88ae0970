import BrokerProtocol
import CLinux
import Glibc
import SystemPackage
import Userfaultfd

/// A client's shared-memory file (a memfd or tmpfs file, attached to its
/// Register), mapped shared by the broker so that it can fill the file's page
/// cache before mapping a page into the client with `UFFDIO_CONTINUE`.
///
/// 1. Filling is `UFFDIO_COPY` into this mapping, which the broker's own
///    userfaultfd registered in missing mode: the kernel adds a page only where
///    the file has none (EEXIST otherwise), so a page another mapping of the file
///    filled or wrote is never overwritten, and no pread/pwrite race exists.
/// 2. Only a file the client could write itself is accepted: tmpfs, opened
///    read-write, not sealed against writes (checked here, and by `mmap`).
/// 3. The broker never touches the mapping: a fault there would wait on a
///    userfaultfd no one reads.
final class SharedMemoryMapping {
  let descriptor: OwnedDescriptor
  private let base: UnsafeMutableRawPointer
  private let length: Int
  /// The file's size when it was attached: the regions must lie inside it.
  let size: UInt64
  private let uffd: UserfaultFD

  /// Checks and maps `fd` (owned from now on, closed if refused), registering
  /// the mapping with `uffd()` (the broker's own, `memoryUffd`: asked for only once the file passed).
  init(adopting fd: CInt, pageSize: Int, uffd: () throws(BrokerError) -> UserfaultFD) throws(BrokerError) {
    descriptor = OwnedDescriptor(fd)
    switch clinux_shared_memory_kind(fd) {
    case 0: break
    case 1: throw BrokerError(.badRegion, "the shared-memory file is on hugetlbfs: minor faults of huge pages are not supported")
    case 2: throw BrokerError(.badRegion, "the shared-memory file is not a memfd or tmpfs file")
    case 3: throw BrokerError(.badRegion, "the shared-memory file must be opened read-write: the broker writes only where its client could")
    case 4: throw BrokerError(.badRegion, "the shared-memory file is sealed against writes")
    case let rc: throw BrokerError(.badRegion, "the shared-memory file cannot be inspected", errno: Errno(rawValue: -rc))
    }
    var info = stat()
    guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_size > 0 else {
      throw BrokerError(.badRegion, "the shared-memory file is empty or not a regular file")
    }
    size = UInt64(info.st_size)
    length = (Int(info.st_size) + pageSize - 1) / pageSize * pageSize
    guard let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), pointer != MAP_FAILED else {
      throw BrokerError(.badRegion, "the shared-memory file cannot be mapped shared and writable", errno: Errno(rawValue: errno))
    }
    base = pointer
    do {
      self.uffd = try uffd()
    } catch {
      munmap(pointer, length)
      throw error
    }
    do {
      _ = try self.uffd.register(address: UInt(bitPattern: pointer), length: length, mode: .missing)
    } catch {
      munmap(pointer, length)
      throw BrokerError(.internal, "the broker cannot register its mapping of the shared-memory file: \(error)")
    }
  }

  deinit { munmap(base, length) }  // unregisters it too

  /// Adds `bytes` to the file's page cache at `offset` (page aligned), page by
  /// page where a page is missing; pages already there are kept as they are.
  /// `.done` once every page of the range is in the cache.
  func store(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, pageSize: Int) -> IoctlOutcome {
    guard offset <= UInt64(length), UInt64(bytes.count) <= UInt64(length) - offset else { return .failed(.badAddress) }
    var done = 0
    while done < bytes.count {
      let target = UInt(bitPattern: base) + UInt(offset) + UInt(done)
      switch uffd.copy(to: target, from: bytes.baseAddress! + done, length: bytes.count - done, wake: false) {
      case .done: return .done
      case .partial(let count): done += count  // stopped at a page the cache has
      case .alreadyPresent: done += pageSize  // kept: filled before (another client's fault, or a write)
      case let other: return other
      }
    }
    return .done
  }
}
