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
/// Scenarios: `vmm` as above; `vmm-huge` the same with guest memory of 2 MiB
/// huge pages (`MAP_HUGETLB`, `page_size` 2097152; the balloon drops whole
/// huge pages); `vmm-garbage` sends bytes that are no JSON;
/// `vmm-no-remove` a uffd without remove events. The broker must kill those
/// two (their guest could not be served): they wait to be killed.
/// The last line of stdout says what was checked; exit 0 when every byte was right.
struct FakeVMM {
  let scenario: String
  let socketPath: String
  let snapshotPath: String
  let mib: Int
  let threads: Int

  func run() -> Int32 { runVMM(scenario == "vmm-huge" ? "vmm-huge" : "vmm", restore) }

  private func restore() throws -> Int32 {
    let snapshot = open(snapshotPath, O_RDONLY | O_CLOEXEC)
    guard snapshot >= 0 else { throw BrokerError(.io, "cannot open \(snapshotPath)") }
    defer { close(snapshot) }
    let features: UserfaultFD.Features = scenario == "vmm-no-remove" ? [] : [.eventRemove]
    let uffd = try UserfaultFD.create(features: features, required: features)
    let half = mib << 19
    let hugePageSize: Int? = scenario == "vmm-huge" ? 2 << 20 : nil
    let pageSize = hugePageSize ?? systemPageSize
    // Two guest regions, the second one page after the first ends (as a guest's
    // memory below and above a hole), each from its own offset in the snapshot.
    let first = try AnonymousMemory(length: half, hugePageSize: hugePageSize)
    let second = try AnonymousMemory(length: half, hugePageSize: hugePageSize)
    for memory in [first, second] { _ = try uffd.register(address: memory.address, length: memory.length) }
    // The second region names its page size with the deprecated field.
    let mappings = FirecrackerHandshake.json([.init(address: first.address, size: half, offset: 0, pageSize: pageSize),
                                              .init(address: second.address, size: half, offset: UInt64(half), legacyPageSize: true, pageSize: pageSize)])
    let message = scenario == "vmm-garbage" ? "this is not json" : mappings
    let connection = try FirecrackerHandshake(socketPath: socketPath).send(message, uffd: uffd)
    if scenario != "vmm" && scenario != "vmm-huge" {
      pause()  // the broker must kill this VMM
      return 1
    }
    var wrong = touchAll([first, second], snapshot: snapshot, offsets: [0, UInt64(half)])
    // The balloon takes 64 pages (one huge page) of the second region back: they
    // must read zeros after (never the snapshot's bytes again).
    let ballooned = hugePageSize ?? 64 * systemPageSize
    guard madvise(UnsafeMutableRawPointer(bitPattern: second.address), ballooned, MADV_DONTNEED) == 0 else { throw BrokerError(.io, "madvise failed") }
    let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: second.address), count: ballooned)
    let nonZero = bytes.contains { $0 != 0 }
    if nonZero { wrong += 1 }
    print("vmm verified \(2 * half / systemPageSize) pages, \(wrong) wrong; ballooned \(ballooned / systemPageSize) pages read \(nonZero ? "old bytes" : "zeros")")
    withExtendedLifetime(connection) {}
    return wrong == 0 ? 0 : 1
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
