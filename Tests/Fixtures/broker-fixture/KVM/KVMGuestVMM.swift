import BrokerProtocol
import ClientSDK
import Glibc
import LinuxSupport
import Userfaultfd

/// A VMM that restores a real KVM guest from a snapshot through a
/// Firecracker-compatible handler socket: it maps anonymous guest memory,
/// registers it with a userfaultfd that asks only for remove events (as
/// Firecracker does), sends the region and the uffd to the socket, gives the
/// memory to KVM and runs one vCPU from the "vmstate" (long mode, ring 3). Every
/// byte the guest reads (page tables, code, data) is a fault KVM takes in this
/// process (get_user_pages) and the broker serves from the snapshot.
///
/// The guest (`GuestImage.program`) checksums its data pages, adds to every
/// qword of its scratch pages, then checksums its free area; it reports in
/// RAX/RBX at its last OUT. The VMM checks both checksums against the
/// snapshot file and reads back the scratch pages. With `balloon`, a VMM
/// thread drops the free area (MADV_DONTNEED, in chunks) while the guest
/// writes its scratch pages; the guest then must read zeros there, though the
/// data it sums next is prefetched in blocks that reach into the area.
///
/// With `hugePages`, the guest's memory is of 2 MiB huge pages (`MAP_HUGETLB`,
/// `page_size` 2097152): each fault KVM takes brings in a whole huge page.
///
/// The last line of stdout says what was checked; exit 0 when all was right.
struct KVMGuestVMM {
  let socketPath: String
  let snapshotPath: String
  let image: GuestImage
  let balloon: Bool
  var hugePages = false

  func run() -> Int32 { runVMM("kvm vmm", restore) }

  private func restore() throws -> Int32 {
    let snapshot = try mapSnapshot()
    defer { munmap(UnsafeMutableRawPointer(mutating: snapshot.baseAddress), snapshot.count) }

    let memory = try AnonymousMemory(length: image.size, hugePageSize: hugePages ? 2 << 20 : nil)
    let uffd = try UserfaultFD.create(features: [.eventRemove], required: [.eventRemove])
    _ = try uffd.register(address: memory.address, length: memory.length)
    let mappings = FirecrackerHandshake.json([.init(address: memory.address, size: memory.length, offset: 0, pageSize: memory.pageSize)])
    let connection = try FirecrackerHandshake(socketPath: socketPath).send(mappings, uffd: uffd)

    let machine = try KVMMachine()
    try machine.map(memory.bytes, at: 0)
    let vcpu = try machine.createVCPU()
    try vcpu.enterUserLongMode(pageTables: GuestImage.pml4, entry: GuestImage.code, stack: GuestImage.stackTop,
                               tss: GuestImage.tss, tssLimit: GuestImage.tssLimit)

    let started = monotonicNanoseconds()
    var balloonThread: pthread_t?
    var balloonWait: UInt64 = 0
    var exits = 0
    running: while true {
      let exit = try vcpu.run()
      exits += 1
      switch exit {
      case .out(GuestImage.Port.halfway.rawValue, _):
        if balloon { balloonThread = startBalloon(memory) }
      case .out(GuestImage.Port.balloonDone.rawValue, _):
        // The balloon ran while the guest wrote its scratch pages; the guest
        // waits here only for what is left of it.
        let waiting = monotonicNanoseconds()
        if let thread = balloonThread { pthread_join(thread, nil) }
        balloonThread = nil
        balloonWait = monotonicNanoseconds() - waiting
      case .out(GuestImage.Port.done.rawValue, _):
        break running
      case .interrupted:
        continue
      default:
        let regs = try vcpu.registers()
        print("kvm guest stopped: \(exit) at rip 0x\(String(regs.rip, radix: 16)) rsp 0x\(String(regs.rsp, radix: 16)) after \(exits) exits")
        return 1
      }
    }
    let milliseconds = Double(monotonicNanoseconds() - started) / 1e6
    let regs = try vcpu.registers()

    var wrong: [String] = []
    let expectedData = image.checksummed.reduce(GuestImage.fnvBasis) { GuestImage.checksum(snapshot, $1, continuing: $0) }
    if regs.rax != expectedData { wrong.append("data checksum 0x\(String(regs.rax, radix: 16)), not 0x\(String(expectedData, radix: 16))") }
    // Over zeros, each qword's step is only the multiplication.
    let expectedFree = balloon ? (0..<image.free.count / 8).reduce(GuestImage.fnvBasis) { hash, _ in hash &* GuestImage.fnvPrime }
                               : GuestImage.checksum(snapshot, image.free)
    if regs.rbx != expectedFree { wrong.append("free area checksum 0x\(String(regs.rbx, radix: 16)), not the \(balloon ? "zeros'" : "snapshot's")") }
    let wrongScratch = wrongScratchPages(memory, snapshot: snapshot)
    if wrongScratch > 0 { wrong.append("\(wrongScratch) scratch pages wrong") }

    let freePages = image.free.count / GuestImage.pageSize
    let scratchPages = image.scratch.count / GuestImage.pageSize
    let problems = wrong.isEmpty ? "" : ": " + wrong.joined(separator: "; ")
    let waited = balloon ? " (\(balloonWait / 1000) µs of them waiting for the balloon)" : ""
    print("kvm guest ran \(Int(milliseconds)) ms\(waited), \(exits) exits\(problems)")
    print("kvm guest checksummed \(image.dataPages) pages, wrote \(scratchPages) pages, read \(freePages) \(balloon ? "ballooned" : "free") pages; \(wrong.count) wrong")
    withExtendedLifetime((connection, uffd)) {}
    return wrong.isEmpty ? 0 : 1
  }

  /// The snapshot file, mapped read-only: what the guest should have seen.
  private func mapSnapshot() throws -> UnsafeRawBufferPointer {
    let fd = open(snapshotPath, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw KVMError("cannot open \(snapshotPath)", errno: errno) }
    defer { close(fd) }
    guard let mapped = mmap(nil, image.size, PROT_READ, MAP_PRIVATE, fd, 0), mapped != MAP_FAILED else {
      throw KVMError("cannot map \(snapshotPath)", errno: errno)
    }
    return UnsafeRawBufferPointer(start: mapped, count: image.size)
  }

  /// The balloon: drops the free area in four chunks while the guest runs.
  /// Each MADV_DONTNEED blocks until the broker has read its remove event.
  private func startBalloon(_ memory: AnonymousMemory) -> pthread_t {
    let start = memory.address + UInt(image.free.lowerBound)
    let chunk = image.free.count / 4
    return spawnThread {
      for index in 0..<4 {
        let rc = madvise(UnsafeMutableRawPointer(bitPattern: start + UInt(index * chunk)), chunk, MADV_DONTNEED)
        precondition(rc == 0, "madvise(MADV_DONTNEED) failed: errno \(errno)")
      }
    }
  }

  /// Scratch pages whose qwords are not the snapshot's plus the guest's increment.
  private func wrongScratchPages(_ memory: AnonymousMemory, snapshot: UnsafeRawBufferPointer) -> Int {
    var wrongPages = 0
    for page in stride(from: image.scratch.lowerBound, to: image.scratch.upperBound, by: GuestImage.pageSize) {
      for address in stride(from: page, to: page + UInt64(GuestImage.pageSize), by: 8) {
        let expected = snapshot.load(fromByteOffset: Int(address), as: UInt64.self) &+ image.scratchIncrement(at: address)
        if memory.bytes.load(fromByteOffset: Int(address), as: UInt64.self) != expected {
          wrongPages += 1
          break
        }
      }
    }
    return wrongPages
  }
}
