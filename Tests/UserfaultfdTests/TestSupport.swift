// Shared plumbing for the userfaultfd tests: anonymous mappings, page contents,
// threads with a published kernel thread id, bounded waits, a recording handler
// and a fixture that always tears down without hanging.
//
// Everything here uses real userfaultfds and real POSIX threads. A test must
// never block without a bound: waits go through `waitUntil` (which records an
// issue on timeout) and the fixture's teardown closes the userfaultfd, which
// makes the kernel release every thread still blocked on it.

import Glibc
import LinuxSupport
import Synchronization
import SystemPackage
import Testing
import Userfaultfd

/// The root of every suite in this target. Serialized: the tests race threads
/// against the kernel on purpose, and on a 2-core machine parallel suites would
/// only blur the timing; the whole target still runs in a few seconds.
@Suite(.serialized) struct UserfaultfdKernelTests {}

let pageSize = systemPageSize

// MARK: - Memory

extension Range<UInt> {
  /// The address of page `index` of this range.
  func page(_ index: Int) -> UInt { lowerBound + UInt(index * pageSize) }
  /// Pages `indices` of this range, as an address range.
  func pages(_ indices: Range<Int>) -> Range<UInt> { page(indices.lowerBound)..<page(indices.upperBound) }
  var length: Int { Int(upperBound - lowerBound) }
  var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: lowerBound)! }
}

/// An anonymous private mapping of `pages` pages: what a client registers.
func mapAnonymous(pages: Int, protection: CInt = PROT_READ | PROT_WRITE) throws -> Range<UInt> {
  let raw = mmap(nil, pages * pageSize, protection, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
  let failed = UnsafeMutableRawPointer(bitPattern: -1)  // MAP_FAILED does not import
  let base = try #require(raw == failed ? nil : raw.map { UInt(bitPattern: $0) }, "mmap failed: \(Errno(rawValue: errno))")
  return base..<base + UInt(pages * pageSize)
}

/// `madvise(MADV_DONTNEED)`: with EVENT_REMOVE the call blocks until the uffd's reader has read the event.
func dropPages(_ range: Range<UInt>) -> CInt {
  madvise(range.pointer, range.length, MADV_DONTNEED) == 0 ? 0 : errno
}

/// mremap(2) with MREMAP_MAYMOVE | MREMAP_FIXED. mremap is variadic in C, so
/// Swift does not import it; it is called through dlsym with its full
/// five-argument shape (on x86-64 and arm64 Linux a variadic callee receives
/// these integer arguments in the same registers as a plain call).
func remapFixed(_ source: Range<UInt>, to destination: UInt) -> UInt? {
  typealias Mremap = @convention(c) (UnsafeMutableRawPointer?, Int, Int, CInt, UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer?
  let mayMove: CInt = 1, fixed: CInt = 2  // MREMAP_MAYMOVE, MREMAP_FIXED (need _GNU_SOURCE, not imported)
  guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0) /* RTLD_DEFAULT */, "mremap") else { return nil }
  let mremap = unsafeBitCast(symbol, to: Mremap.self)
  let result = mremap(source.pointer, source.length, source.length, mayMove | fixed, UnsafeMutableRawPointer(bitPattern: destination))
  guard let result, UInt(bitPattern: result) != UInt.max else { return nil }
  return UInt(bitPattern: result)
}

// MARK: - Page contents

/// The content the tests' handlers serve: each 8-byte word is derived from its
/// own address (never zero), so a page copied to the wrong place is detected.
@inline(__always) func pattern(_ wordAddress: UInt) -> UInt64 {
  (UInt64(wordAddress) &* 0x9E37_79B9_7F4A_7C15) | 1
}

/// Reads one word (faulting it in if it is missing).
@inline(__always) func load(_ address: UInt) -> UInt64 {
  UnsafeRawPointer(bitPattern: address)!.load(as: UInt64.self)
}

@inline(__always) func store(_ value: UInt64, at address: UInt) {
  UnsafeMutableRawPointer(bitPattern: address)!.storeBytes(of: value, as: UInt64.self)
}

/// What a whole page holds, word by word.
enum PageContent: Equatable, CustomStringConvertible {
  case pattern  // every word is `pattern(address)` of the page it is in
  case zeros
  case other(firstWord: UInt64)

  var description: String {
    switch self {
    case .pattern: "pattern"
    case .zeros: "zeros"
    case .other(let word): "other(0x\(String(word, radix: 16)))"
    }
  }
}

/// Classifies the page at `address` (as if it were mapped at `origin`, for a page that moved).
func content(ofPage address: UInt, patternOf origin: UInt? = nil) -> PageContent {
  let origin = origin ?? address
  var isPattern = true, isZero = true
  for offset in stride(from: 0, to: pageSize, by: 8) {
    let word = load(address + UInt(offset))
    if word != pattern(origin + UInt(offset)) { isPattern = false }
    if word != 0 { isZero = false }
  }
  return isPattern ? .pattern : isZero ? .zeros : .other(firstWord: load(address))
}

/// A page-aligned buffer used as the source of UFFDIO_COPY (page-aligned
/// sources copy several times faster). Confined to one thread at a time.
final class PageBuffer: @unchecked Sendable {
  let pointer: UnsafeMutableRawPointer
  let pages: Int

  init(pages: Int = 1) {
    self.pages = pages
    pointer = .allocate(byteCount: pages * pageSize, alignment: pageSize)
  }

  deinit { pointer.deallocate() }

  /// Fills the buffer with what `pages` pages at `destination` should hold.
  func preparePattern(for destination: UInt, pages: Int = 1) {
    precondition(pages <= self.pages)
    for offset in stride(from: 0, to: pages * pageSize, by: 8) {
      pointer.storeBytes(of: pattern(destination + UInt(offset)), toByteOffset: offset, as: UInt64.self)
    }
  }

  func prepareZeros() { pointer.initializeMemory(as: UInt8.self, repeating: 0, count: pages * pageSize) }
}

// MARK: - Threads

/// The calling thread's kernel id. Glibc's gettid() needs _GNU_SOURCE and is not
/// imported into Swift, so it is read from /proc/thread-self ("<pid>/task/<tid>").
func currentThreadID() -> Int32 {
  var buffer = [CChar](repeating: 0, count: 64)
  let count = readlink("/proc/thread-self", &buffer, buffer.count - 1)
  precondition(count > 0, "readlink(/proc/thread-self) failed")
  let text = String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  return Int32(text.split(separator: "/").last!)!
}

/// A POSIX thread started by a test, with its kernel thread id and a finished flag.
struct TestThread: Sendable {
  final class State: Sendable {
    let tid = Atomic<Int32>(0)
    let finished = Atomic<Bool>(false)
  }

  let handle: pthread_t
  let state: State

  var isFinished: Bool { state.finished.load(ordering: .acquiring) }

  /// The thread's kernel id (it publishes it before running its body).
  var tid: Int32 {
    waitUntil("thread id published") { state.tid.load(ordering: .acquiring) != 0 }
    return state.tid.load(ordering: .acquiring)
  }
}

/// Starts `body` on a new thread (LinuxSupport's `spawnThread`).
func startThread(_ body: @escaping @Sendable () -> Void) -> TestThread {
  let state = TestThread.State()
  let handle = spawnThread {
    state.tid.store(currentThreadID(), ordering: .releasing)
    body()
    state.finished.store(true, ordering: .releasing)
  }
  return TestThread(handle: handle, state: state)
}

/// The kernel function a thread sleeps in (/proc/self/task/<tid>/wchan), "" if unknown.
func waitChannel(of tid: Int32) -> String {
  let fd = open("/proc/self/task/\(tid)/wchan", O_RDONLY | O_CLOEXEC)
  guard fd >= 0 else { return "" }
  defer { closeDescriptor(fd) }
  var buffer = [UInt8](repeating: 0, count: 128)
  let count = read(fd, &buffer, buffer.count)
  return count > 0 ? String(decoding: buffer[..<count], as: UTF8.self) : ""
}

/// True when the thread sleeps in the userfaultfd code: a fault waiting in
/// `handle_userfault`, or an madvise/munmap/mremap waiting for its event to be read.
func isBlockedInUserfaultfd(_ tid: Int32) -> Bool {
  waitChannel(of: tid).contains("userfault")
}

/// A value shared between a test and its threads, behind a lock.
final class Shared<Value: Sendable>: Sendable {
  private let lock: Mutex<Value>
  init(_ value: Value) { lock = Mutex(value) }
  var value: Value {
    get { lock.withLock { $0 } }
    set { lock.withLock { $0 = newValue } }
  }
  func update<R>(_ body: (inout Value) -> R) -> R { lock.withLock { body(&$0) } }
}

// MARK: - Bounded waiting

/// Polls `condition` until it holds or `timeout` passes. Does not record anything:
/// usable from a handler on the dispatcher thread (which is not a test's task).
func eventually(timeout: Duration = .seconds(5), _ condition: () -> Bool) -> Bool {
  let (seconds, attoseconds) = timeout.components
  let deadline = monotonicNanoseconds() + UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
  while !condition() {
    if monotonicNanoseconds() >= deadline { return false }
    usleep(50)
  }
  return true
}

/// Waits until `condition` holds, or records an issue after `timeout` and returns false.
@discardableResult
func waitUntil(
  _ what: @autoclosure () -> String, timeout: Duration = .seconds(5), sourceLocation: SourceLocation = #_sourceLocation,
  _ condition: () -> Bool
) -> Bool {
  if eventually(timeout: timeout, condition) { return true }
  Issue.record(Comment(rawValue: "timed out after \(timeout) waiting for \(what())"), sourceLocation: sourceLocation)
  return false
}

/// Drives `core` on the calling thread the way `UserfaultFDDispatcher` does
/// (wait for the uffd, drain, redeliver what is due) until `done` holds;
/// records an issue after `timeout`.
@discardableResult
func pump(
  _ core: EventDispatcher, timeout: Duration = .seconds(5), sourceLocation: SourceLocation = #_sourceLocation,
  until done: () -> Bool
) -> Bool {
  waitUntil("the dispatcher to resolve the faults", timeout: timeout, sourceLocation: sourceLocation) {
    var ready = pollfd(fd: core.uffd.fileDescriptor.rawValue, events: Int16(POLLIN), revents: 0)
    if Glibc.poll(&ready, 1, 1) > 0 { core.drain() }
    core.redeliverDue()
    return done()
  }
}

/// A flag one thread raises and another spins on (no lock, no syscall).
final class Flag: Sendable {
  private let raised = Atomic<Bool>(false)
  func raise() { raised.store(true, ordering: .releasing) }
  var isRaised: Bool { raised.load(ordering: .acquiring) }
  /// Spins briefly, then polls; false if not raised within `timeout`.
  func wait(timeout: Duration = .seconds(5)) -> Bool {
    for _ in 0..<100_000 where isRaised { return true }
    return eventually(timeout: timeout) { isRaised }
  }
}

// MARK: - A recording handler

/// One call a handler received.
enum Recorded: Equatable, Sendable {
  case pagefault(Pagefault)
  case removed(Range<UInt>)
  case unmapped(Range<UInt>)
  case remapped(from: UInt, to: UInt, length: Int)
  case forked
  case closed(UserfaultFDError?)

  var isPagefault: Bool { if case .pagefault = self { true } else { false } }
}

/// A handler that records every call in order (under a lock, so tests read it
/// from their own thread) and answers faults with a closure. Its page buffer and
/// `removedPages` are used only by the thread that drives the dispatcher.
final class RecordingHandler: UserfaultFDHandler, @unchecked Sendable {
  typealias Answer = @Sendable (RecordingHandler, Pagefault, UserfaultFD) -> PagefaultResult

  private let log = Mutex<[Recorded]>([])
  private let outcomeLog = Mutex<[(page: UInt, zeros: Bool, outcome: IoctlOutcome)]>([])
  private let answer: Answer
  let buffer = PageBuffer()
  /// Pages seen in `removed` or `unmapped` ranges so far.
  private(set) var removedPages = Set<UInt>()

  /// The default answer: fill the page with the pattern.
  init(answer: @escaping Answer = { handler, fault, uffd in handler.fill(fault.address, on: uffd) }) {
    self.answer = answer
  }

  /// The answer of a page server that must not restore bytes a remove dropped:
  /// zeros for a page that was removed, the pattern otherwise.
  static let zeroIfRemoved: Answer = { handler, fault, uffd in
    let page = fault.address & ~UInt(pageSize - 1)
    return handler.fill(page, on: uffd, zeros: handler.removedPages.contains(page))
  }

  var recorded: [Recorded] { log.withLock { $0 } }
  var faults: [Pagefault] { recorded.compactMap { if case .pagefault(let f) = $0 { f } else { nil } } }
  /// Every resolving ioctl the handler made, in order.
  var outcomes: [(page: UInt, zeros: Bool, outcome: IoctlOutcome)] { outcomeLog.withLock { $0 } }

  /// Copies the pattern (or zeros) into the page at `address` and settles the fault.
  func fill(_ address: UInt, on uffd: UserfaultFD, zeros: Bool = false) -> PagefaultResult {
    let page = address & ~UInt(pageSize - 1)
    if zeros { buffer.prepareZeros() } else { buffer.preparePattern(for: page) }
    let outcome = uffd.copy(to: page, from: buffer.pointer, length: pageSize)
    outcomeLog.withLock { $0.append((page, zeros, outcome)) }
    return PagefaultResult(settling: outcome, address: page, length: pageSize, on: uffd)
  }

  func pagefault(_ fault: Pagefault, on uffd: UserfaultFD) -> PagefaultResult {
    log.withLock { $0.append(.pagefault(fault)) }
    return answer(self, fault, uffd)
  }

  func removed(_ range: Range<UInt>) {
    insertPages(range)
    log.withLock { $0.append(.removed(range)) }
  }

  func unmapped(_ range: Range<UInt>) {
    insertPages(range)
    log.withLock { $0.append(.unmapped(range)) }
  }

  func remapped(from: UInt, to: UInt, length: Int) {
    log.withLock { $0.append(.remapped(from: from, to: to, length: length)) }
  }

  func forked(_ child: UserfaultFD) { log.withLock { $0.append(.forked) } }

  func closed(_ error: UserfaultFDError?) { log.withLock { $0.append(.closed(error)) } }

  private func insertPages(_ range: Range<UInt>) {
    for page in stride(from: range.lowerBound, to: range.upperBound, by: pageSize) { removedPages.insert(page) }
  }
}

// MARK: - Fixture

/// A userfaultfd with an anonymous region registered on it, the threads a test
/// started, and a teardown that cannot hang: it stops the dispatcher, closes
/// the uffd (the kernel then releases every thread blocked on it: faults
/// retry as plain anonymous faults, madvise/munmap/mremap proceed), joins the
/// threads with a bound and unmaps what is still mapped.
final class Fixture {
  let uffd: UserfaultFD
  let region: Range<UInt>
  private(set) var dispatcher: UserfaultFDDispatcher?
  private var threads: [TestThread] = []
  private var mapped: [Range<UInt>]

  init(pages: Int, features: UserfaultFD.Features = .nonCooperative, register: Bool = true) throws {
    uffd = try UserfaultFD.create(features: features)
    region = try mapAnonymous(pages: pages)
    mapped = [region]
    if register { try uffd.register(address: region.lowerBound, length: region.length) }
  }

  /// Starts the in-process dispatcher thread with `handler`.
  @discardableResult
  func startDispatcher(_ handler: some UserfaultFDHandler) throws -> UserfaultFDDispatcher {
    let started = try UserfaultFDDispatcher.start(uffd: uffd, handler: handler)
    dispatcher = started
    return started
  }

  /// Starts a thread that teardown will join.
  @discardableResult
  func spawn(_ body: @escaping @Sendable () -> Void) -> TestThread {
    let thread = startThread(body)
    threads.append(thread)
    return thread
  }

  /// Waits (bounded) for the thread to finish and joins it; records an issue on timeout.
  @discardableResult
  func join(_ thread: TestThread, timeout: Duration = .seconds(5), sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    guard waitUntil("thread \(thread.state.tid.load(ordering: .relaxed)) to finish", timeout: timeout, sourceLocation: sourceLocation, { thread.isFinished }) else { return false }
    pthread_join(thread.handle, nil)
    threads.removeAll { $0.handle == thread.handle }
    return true
  }

  /// Runs `body` on a new thread and waits (bounded) for its result: for
  /// anything that may block on the dispatcher (touching registered memory,
  /// madvise, munmap, mremap), so a broken dispatcher fails the test instead of hanging it.
  func run<T: Sendable>(sourceLocation: SourceLocation = #_sourceLocation, _ body: @escaping @Sendable () -> T) -> T? {
    let result = Shared<T?>(nil)
    let thread = spawn { result.value = body() }
    return join(thread, sourceLocation: sourceLocation) ? result.value : nil
  }

  /// munmap(2) of part of what this fixture mapped (on a thread: with
  /// EVENT_UNMAP it returns only once the event was read).
  func unmap(_ range: Range<UInt>, sourceLocation: SourceLocation = #_sourceLocation) {
    let errno = run(sourceLocation: sourceLocation) { munmap(range.pointer, range.length) == 0 ? 0 : Glibc.errno }
    #expect(errno == 0, "munmap failed", sourceLocation: sourceLocation)
    mapped = mapped.flatMap { piece -> [Range<UInt>] in
      guard piece.overlaps(range) else { return [piece] }
      return [piece.lowerBound..<max(piece.lowerBound, range.lowerBound), min(piece.upperBound, range.upperBound)..<piece.upperBound].filter { !$0.isEmpty }
    }
  }

  /// Moves `range` to `destination` (which this fixture then owns); nil on failure.
  func remap(_ range: Range<UInt>, to destination: UInt) -> UInt? {
    guard let moved = run({ remapFixed(range, to: destination) }) ?? nil else { return nil }
    let destination = moved..<moved + UInt(range.length)
    mapped = mapped.filter { !$0.overlaps(range) && !$0.overlaps(destination) } + [destination]
    return moved
  }

  /// Records a mapping made by the test, so teardown unmaps it.
  func own(_ range: Range<UInt>) { mapped.append(range) }

  func teardown() {
    dispatcher?.stop()
    closeDescriptor(uffd.release().rawValue)
    var allJoined = true
    for thread in threads {
      if eventually(timeout: .seconds(5), { thread.isFinished }) {
        pthread_join(thread.handle, nil)
      } else {
        Issue.record("a test thread did not finish after its userfaultfd was closed; leaking it and its memory")
        pthread_detach(thread.handle)
        allJoined = false
      }
    }
    threads = []
    if allJoined {
      for range in mapped { _ = munmap(range.pointer, range.length) }
    }
  }
}

/// Runs `body` with a fresh fixture and always tears it down.
func withFixture<R>(
  pages: Int, features: UserfaultFD.Features = .nonCooperative, register: Bool = true, _ body: (Fixture) throws -> R
) throws -> R {
  let fixture = try Fixture(pages: pages, features: features, register: register)
  defer { fixture.teardown() }
  return try body(fixture)
}
