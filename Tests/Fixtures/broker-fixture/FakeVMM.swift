import BrokerProtocol
import ClientSDK
import Glibc
import Synchronization
import LinuxSupport
import Userfaultfd

/// A VMM restoring a snapshot the way Firecracker does (`mem_backend: Uffd`):
/// it creates a userfaultfd asking only for remove events, maps its guest
/// memory (two regions, anonymous and private), registers it for missing
/// faults, connects to the handler's SOCK_STREAM socket and sends one JSON
/// array of region mappings with the uffd attached, then runs its "guest":
/// threads touch every page and compare it with the snapshot file, and a
/// balloon drops part of the second region (MADV_DONTNEED), which must then
/// read zeros. It keeps the connection open until it exits.
///
/// Scenarios: `vmm` as above; `vmm-garbage` sends bytes that are no JSON;
/// `vmm-no-remove` a uffd without remove events. The broker must kill those
/// two (their guest could not be served): they wait to be killed.
/// The last line of stdout says what was checked; exit 0 when every byte was right.
struct FakeVMM {
  let scenario: String
  let socketPath: String
  let snapshotPath: String
  let mib: Int
  let threads: Int

  func run() -> Int32 {
    alarm(120)  // never outlive a test that forgot it
    do {
      return try restore()
    } catch {
      print("vmm failed: \(error)")
      return 2
    }
  }

  private func restore() throws -> Int32 {
    let snapshot = open(snapshotPath, O_RDONLY | O_CLOEXEC)
    guard snapshot >= 0 else { throw BrokerError(.io, "cannot open \(snapshotPath)") }
    defer { close(snapshot) }
    let features: UserfaultFD.Features = scenario == "vmm-no-remove" ? [] : [.eventRemove]
    let uffd = try UserfaultFD.create(features: features, required: features)
    let half = mib << 19
    // Two guest regions, the second one page after the first ends (as a guest's
    // memory below and above a hole), each from its own offset in the snapshot.
    let first = try AnonymousMemory(length: half)
    let second = try AnonymousMemory(length: half)
    for memory in [first, second] { _ = try uffd.register(address: memory.address, length: memory.length) }
    let mappings = """
      [{"base_host_virt_addr": \(first.address), "size": \(half), "offset": 0, "page_size": \(systemPageSize)},
       {"base_host_virt_addr": \(second.address), "size": \(half), "offset": \(half), "page_size_kib": \(systemPageSize)}]
      """
    let connection = try connect()
    let message = scenario == "vmm-garbage" ? "this is not json" : mappings
    let sent = Array(message.utf8).withUnsafeBytes { bytes in
      [uffd.fileDescriptor.rawValue].withUnsafeBufferPointer { fds in try? connection.send(bytes, fds: fds) }
    }
    guard sent == .sent else { throw BrokerError(.io, "cannot send the mappings") }
    if scenario != "vmm" {
      pause()  // the broker must kill this VMM
      return 1
    }
    var wrong = touchAll([first, second], snapshot: snapshot, offsets: [0, UInt64(half)])
    // The balloon takes 64 pages of the second region back: they must read zeros
    // after (never the snapshot's bytes again).
    let ballooned = 64 * systemPageSize
    guard madvise(UnsafeMutableRawPointer(bitPattern: second.address), ballooned, MADV_DONTNEED) == 0 else { throw BrokerError(.io, "madvise failed") }
    let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: second.address), count: ballooned)
    let nonZero = bytes.contains { $0 != 0 }
    if nonZero { wrong += 1 }
    print("vmm verified \(2 * half / systemPageSize) pages, \(wrong) wrong; ballooned \(ballooned / systemPageSize) pages read \(nonZero ? "old bytes" : "zeros")")
    withExtendedLifetime(connection) {}
    return wrong == 0 ? 0 : 1
  }

  private func connect() throws -> PacketSocket {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { path in
      for (index, byte) in socketPath.utf8.prefix(path.count - 1).enumerated() { path[index] = byte }
    }
    let connected = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard fd >= 0, connected == 0 else { throw BrokerError(.io, "cannot connect to \(socketPath): errno \(errno)") }
    return PacketSocket(adopting: fd)
  }

  /// Every page of the regions from `threads` threads, compared with the
  /// snapshot from each region's offset; returns the wrong pages.
  private func touchAll(_ regions: [AnonymousMemory], snapshot: CInt, offsets: [UInt64]) -> Int {
    let pagesPerRegion = regions[0].length / systemPageSize
    let total = pagesPerRegion * regions.count
    let threadCount = threads
    let addresses = regions.map(\.address)
    let wrong = WrongPages()
    let workers = (0..<threadCount).map { thread in
      spawnThread {
        let expected = UnsafeMutableRawBufferPointer.allocate(byteCount: systemPageSize, alignment: systemPageSize)
        defer { expected.deallocate() }
        for page in stride(from: thread, to: total, by: threadCount) {
          let region = page / pagesPerRegion
          let offset = (page % pagesPerRegion) * systemPageSize
          _ = pread(snapshot, expected.baseAddress, systemPageSize, off_t(offsets[region]) + off_t(offset))
          let actual = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: addresses[region] + UInt(offset)), count: systemPageSize)
          if !actual.elementsEqual(expected) { wrong.count.add(1, ordering: .relaxed) }
        }
      }
    }
    workers.forEach { pthread_join($0, nil) }
    return wrong.count.load(ordering: .relaxed)
  }
}

private final class WrongPages: Sendable {
  let count = Atomic<Int>(0)
}
