import BrokerProtocol
import Glibc
import LinuxSupport
import SystemPackage

/// A mapping of a shared-memory file (a memfd or tmpfs file), unmapped on
/// deinit: memory for a client to have served by the broker as a region of
/// `.sharedMemory` backing (`region(id:plugin:)`), with the file handed to
/// `BrokerClient(regions:sharedMemory:)`.
///
/// Private (`MAP_PRIVATE`, the default) is the clone of a snapshot: the pages
/// the broker fills are the file's, shared by every process mapping it; a
/// write copies the page into this process alone, and `MADV_DONTNEED` drops
/// that copy (the page reads the file again). Shared (`MAP_SHARED`): writes go
/// to the file, for every mapping of it to see.
public final class SharedMemory: Mapped, @unchecked Sendable {
  // @unchecked: the pointer is immutable; what threads do with the bytes is theirs to order.
  /// The first byte (page aligned); valid while this object lives.
  public let base: UnsafeMutableRawPointer
  /// The mapping's length in bytes: the length asked for, rounded up to pages.
  public let length: Int
  /// Where the mapping starts in the file (page aligned).
  public let fileOffset: UInt64

  /// Maps `length` bytes (rounded up to pages) of `file` at `fileOffset`,
  /// readable and writable, not populated. The file must be that long already.
  public init(file: FileDescriptor, length: Int, fileOffset: UInt64 = 0, private isPrivate: Bool = true) throws(ClientError) {
    let rounded = (length + systemPageSize - 1) / systemPageSize * systemPageSize
    guard fileOffset & UInt64(systemPageSize - 1) == 0 else { throw ClientError("a file offset must be page aligned (got \(fileOffset))") }
    let flags = isPrivate ? MAP_PRIVATE : MAP_SHARED
    guard let pointer = mmap(nil, rounded, PROT_READ | PROT_WRITE, flags, file.rawValue, off_t(fileOffset)), pointer != MAP_FAILED else {
      throw ClientError("cannot map \(rounded) bytes of the shared-memory file", errno: errno)
    }
    base = pointer
    self.length = rounded
    self.fileOffset = fileOffset
  }

  deinit { munmap(base, length) }

  /// The region of this mapping, served by `plugin`.
  public func region(id: UInt64, plugin: String, argument: String = "", backingOffset: UInt64 = 0) -> RegionSpec {
    RegionSpec(id: id, base: address, length: length, plugin: plugin, argument: argument, backingOffset: backingOffset, backing: .sharedMemory(fileOffset: fileOffset))
  }
}
