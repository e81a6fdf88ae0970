import Glibc
import Userfaultfd

/// A file a plugin delegated: the descriptor, and the part of the file inside
/// the delegation mapped read-only, so a fault is filled by one UFFDIO_COPY
/// straight from the page cache: no pread and no copy through a buffer. What
/// lay past the end of the file when it was delegated is read with pread (it
/// reads as zeros), and so is anything the kernel cannot read through the
/// mapping because the file shrank since.
final class DelegatedFileMapping {
  let descriptor: OwnedDescriptor
  private var mapping: UnsafeMutableRawPointer?
  /// The file offsets the mapping covers: a page-aligned start, the file's size at delegation time as the end.
  private var mapped: Range<UInt64> = 0..<0

  init(_ descriptor: consuming OwnedDescriptor) { self.descriptor = descriptor }

  deinit { if let mapping { munmap(mapping, Int(mapped.count)) } }

  /// Whether it is a regular file or memfd, and its size.
  func regularFileSize() -> UInt64? {
    var info = stat()
    guard fstat(descriptor.rawValue, &info) == 0, info.st_mode & S_IFMT == S_IFREG else { return nil }
    return UInt64(max(info.st_size, 0))
  }

  /// Maps file offsets `offsets` (page aligned), clipped to the file's `size`; without a mapping, faults use pread.
  func map(_ offsets: Range<UInt64>, size: UInt64) {
    let end = min(offsets.upperBound, size)
    guard mapping == nil, end > offsets.lowerBound, end - offsets.lowerBound <= UInt64(Int.max),
          let pointer = mmap(nil, Int(end - offsets.lowerBound), PROT_READ, MAP_SHARED, descriptor.rawValue, off_t(offsets.lowerBound)),
          pointer != MAP_FAILED
    else { return }
    mapping = pointer
    mapped = offsets.lowerBound..<end
  }

  /// The broker's mapping of file offsets `offsets`, if all of them are mapped.
  func bytes(at offsets: Range<UInt64>) -> UnsafeRawBufferPointer? {
    guard let mapping, mapped.lowerBound <= offsets.lowerBound, offsets.upperBound <= mapped.upperBound else { return nil }
    return UnsafeRawBufferPointer(start: mapping + Int(offsets.lowerBound - mapped.lowerBound), count: offsets.count)
  }

  /// Reads `buffer.count` bytes at `offset` into `buffer`; past the end of the
  /// file they read as zeros. Nil if the file cannot be read.
  func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> UnsafeRawBufferPointer? {
    var done = 0
    while done < buffer.count {
      let n = pread(descriptor.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
      if n < 0 && errno == EINTR { continue }
      if n < 0 { return nil }
      if n == 0 { break }
      done += n
    }
    if done < buffer.count { (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done) }
    return UnsafeRawBufferPointer(buffer)
  }
}
