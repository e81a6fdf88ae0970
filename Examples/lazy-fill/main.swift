// lazy-fill: pages filled on first touch by an in-process userfaultfd handler.
//
//   swift run lazy-fill [--mib N] [--threads N]      (defaults: 64 MiB, 2 threads; needs root
//                                                    or vm.unprivileged_userfaultfd=1;
//                                                    add -c release for meaningful timings)
//
// Maps an anonymous region, registers it with a userfaultfd and starts a
// UserfaultFDDispatcher. Nothing is in the region yet: the first access to each
// page blocks the accessing thread in the kernel until the handler fills the
// page with UFFDIO_COPY. The handler computes each 8-byte word from its address,
// the threads read every word and check it. Exits 1 on an error or a mismatch.

import Glibc
import LinuxSupport
import Synchronization
import Userfaultfd

let pageSize = systemPageSize

/// The content of the word at `address`: a cheap hash of the address (splitmix64's finalizer).
@inline(__always) func word(at address: UInt) -> UInt64 {
  var x = UInt64(address) &+ 0x9E37_79B9_7F4A_7C15
  x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
  x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
  return x ^ (x >> 31)
}

/// Serves every fault with the page's computed content. The dispatcher calls it
/// on its own thread only, so the one source buffer needs no lock.
final class LazyFill: UserfaultFDHandler {
  // UFFDIO_COPY copies from our own memory; a page-aligned source copies several times faster.
  private let source = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
  deinit { source.deallocate() }

  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    let page = fault.address & ~UInt(pageSize - 1)  // the kernel reports the page, not the exact address
    for offset in stride(from: 0, to: pageSize, by: 8) {
      source.storeBytes(of: word(at: page + UInt(offset)), toByteOffset: offset, as: UInt64.self)
    }
    // The copy fills the page atomically and wakes every thread waiting on it.
    // Races are outcomes, not errors: if two threads faulted on this page, the
    // second copy finds it present (EEXIST) and only needs a wake; EAGAIN
    // (the mappings are changing) means "deliver this fault again later".
    // `settling` does exactly that.
    let outcome = uffd.copy(to: page, from: source, length: pageSize)
    return PagefaultResult(settling: outcome, address: page, length: pageSize, on: uffd)
  }

  // This program never changes the region while it is served, so it asks for
  // none of these events (see `create` below); a server of someone else's
  // memory must handle them (see Tests/UserfaultfdTests).
  func removed(_ range: Range<UInt>) {}
  func unmapped(_ range: Range<UInt>) {}
  func remapped(from: UInt, to: UInt, length: Int) {}
}

func fail(_ message: String) -> Int32 {
  let line = "lazy-fill: \(message)\n"
  _ = line.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
  return 1
}

/// Words that did not hold what the handler should have put there.
final class Tally: Sendable {
  let mismatches = Atomic<Int>(0)
}

func run(arguments: [String]) -> Int32 {
  var options = ["--mib": 64, "--threads": 2]
  var rest = arguments.dropFirst()
  while let flag = rest.popFirst() {
    guard options[flag] != nil, let value = rest.popFirst().flatMap({ Int($0) }), value > 0 else {
      return fail("usage: lazy-fill [--mib N] [--threads N]")
    }
    options[flag] = value
  }
  let mib = options["--mib"]!, threads = options["--threads"]!
  let length = mib << 20, pages = length / pageSize

  // No events asked for: the dispatcher's thread then only ever sees page faults.
  let uffd: UserfaultFD
  do { uffd = try UserfaultFD.create(features: []) } catch { return fail(error.description) }
  guard let mapped = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
        mapped != UnsafeMutableRawPointer(bitPattern: -1) else { return fail("mmap of \(mib) MiB failed (errno \(errno))") }
  let base = UInt(bitPattern: mapped)
  defer { munmap(mapped, length) }
  let dispatcher: UserfaultFDDispatcher
  do {
    try uffd.register(address: base, length: length)
    dispatcher = try UserfaultFDDispatcher.start(uffd: uffd, handler: LazyFill())
  } catch { return fail(error.description) }

  // Each thread reads its own share of the pages (interleaved, so the threads
  // fault side by side) and checks every word.
  let tally = Tally()
  let start = monotonicNanoseconds()
  let workers = (0..<threads).map { index in
    spawnThread {
      var bad = 0
      for page in stride(from: index, to: pages, by: threads) {
        for address in stride(from: base + UInt(page * pageSize), to: base + UInt((page + 1) * pageSize), by: 8) {
          // The first load of a page blocks here until the handler has filled it.
          if UnsafeRawPointer(bitPattern: address)!.load(as: UInt64.self) != word(at: address) { bad += 1 }
        }
      }
      tally.mismatches.add(bad, ordering: .relaxed)
    }
  }
  for worker in workers { pthread_join(worker, nil) }
  let elapsed = monotonicNanoseconds() - start

  // Stop serving only now: every page has been filled. Closing the uffd while
  // pages were still missing would not fail anything: the kernel would stop
  // intercepting and those pages would silently read as zeros.
  dispatcher.stop()
  let bad = tally.mismatches.load(ordering: .relaxed)
  print("lazy-fill: \(pages) pages (\(mib) MiB), \(threads) threads: \(dispatcher.faultsRead) faults read, \(elapsed / 1_000_000) ms, "
    + "\(UInt64(pages) * 1_000_000_000 / max(elapsed, 1)) pages/s; \(bad == 0 ? "every byte verified" : "\(bad) words WRONG")")
  return bad == 0 ? 0 : 1
}

exit(run(arguments: CommandLine.arguments))
