import BrokerProtocol
import CLinux
import Glibc
import LinuxSupport
import Synchronization

/// The handle with which any thread answers the faults its plugin deferred:
/// those `PagePlugin.pagefault` answered with `PluginDecision.later`. It is how
/// an I/O-bound plugin (a network store, a disk read) keeps many faults in flight.
///
/// The runner makes one per connection and hands it to
/// `PagePlugin.connected(_:answers:)`. Guarantees:
/// 1. `answer(_:_:bytes:)` may be called from any thread, any number of times,
///    in any order; it copies what it needs and never waits for the runner's
///    thread or the socket (it takes a short lock, never held across a send).
/// 2. The runner's thread takes the answers promptly (an eventfd it polls
///    beside the socket) and sends them batched, with the decisions of the
///    packet it is handling, if any.
/// 3. An answer is sent only for a fault that this connection sent and that
///    waits for one. Any other is dropped and counted
///    (`PluginRunner.answersDropped`, `answersDropped=` in the stats file),
///    never sent and never a crash: a second answer for a fault, a fault id
///    the plugin made up, a fault of a region that closed meanwhile (the
///    runner answered it `.retry` when the `RegionClosed` came), and every
///    answer once the connection has ended (a reconnected plugin gets a new
///    handle; the old one drops everything, so an old id can never answer a
///    new connection's fault).
/// 4. The broker's rules apply as to any decision: it checks the answer against
///    the client as it is when the answer arrives (an event read since the
///    fault was sent makes it stale: dropped, and the fault sent again with a
///    new id), and it must come within `pluginDeadlineMilliseconds` of the
///    fault's sending (default 5 s) or the broker drops the plugin. A plugin
///    that cannot make it answers `.retry`. At most `maxInFlightPerPlugin`
///    faults (default 65,536) are unanswered at once: the broker holds back
///    the rest until answers come.
public final class FaultAnswers: Sendable {
  /// An answer waiting for the runner's thread; its bytes lie at `bytes` in `Queue.bytes`.
  struct Answer {
    var faultID: UInt64
    var decision: PluginDecision
    var bytes: Range<Int>
  }

  /// What `answer` appends to and the runner swaps out whole (no copy, no allocation once warm).
  struct Queue {
    var answers: [Answer] = []
    var bytes: [UInt8] = []
    var isClosed = false
  }

  private let queue = Mutex(Queue())
  /// Readable while answers wait; closed only when the last reference goes, so
  /// an answering thread never writes to a descriptor number reused since.
  let event: CInt
  private let pageSize = systemPageSize
  /// The largest copy one answer may carry (the runner's `maxPrefetch`).
  private let maxPrefetch: Int

  init(maxPrefetch: Int) throws(BrokerError) {
    self.maxPrefetch = maxPrefetch
    switch valueOrErrno(clinux_eventfd()) {
    case .success(let fd): event = fd
    case .failure(let errno): throw BrokerError(.io, "cannot create the deferred answers' eventfd", errno: errno)
    }
  }

  deinit { closeDescriptor(event) }

  /// Answers fault `faultID` (a `PluginFault.faultID` the plugin answered
  /// `.later`) with `decision`, from any thread. A copy takes its bytes from
  /// `bytes`: a `.copy` the first page of it, a `.copyRange` the first
  /// `length` bytes; they are copied before this returns, so the buffer is the
  /// caller's again (an aligned buffer of the caller's own serves `O_DIRECT`
  /// reads). Other decisions ignore `bytes`.
  ///
  /// Nothing is returned: an answer that finds no fault waiting for it is
  /// dropped and counted by the runner (see the type's guarantee 3).
  /// Preconditions (a bug in the plugin, as `copyRange` past the buffer is):
  /// `decision` is not `.later`; a copy has the bytes it names, at most the
  /// runner's `maxPrefetch` of them.
  public func answer(_ faultID: UInt64, _ decision: PluginDecision, bytes: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)) {
    let length: Int
    switch decision {
    case .later: preconditionFailure("answer a deferred fault with a decision, not .later")
    case .copy: length = pageSize
    case .copyRange(_, let rangeLength): length = rangeLength
    case .zero, .zeroRange, .retry, .poison: length = 0
    }
    precondition(length <= bytes.count && length <= maxPrefetch, "a copy of \(length) bytes given \(bytes.count), at most \(maxPrefetch)")
    if case .copyRange = decision { precondition(length > 0, "a copyRange of \(length) bytes") }
    let wasEmpty = queue.withLock { queue -> Bool in
      guard !queue.isClosed else { return false }
      let start = queue.bytes.count
      if length > 0 { queue.bytes.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[..<length])) }
      queue.answers.append(Answer(faultID: faultID, decision: decision, bytes: start..<start + length))
      return queue.answers.count == 1
    }
    // The first answer of a batch wakes the runner; the rest ride along.
    if wasEmpty {
      var one: UInt64 = 1
      _ = write(event, &one, 8)
    }
  }

  /// The runner's thread: takes every waiting answer, leaving `drained`'s
  /// emptied storage in its place (the two alternate, keeping their capacity).
  func take(into drained: inout Queue) {
    var count: UInt64 = 0
    _ = read(event, &count, 8)  // before the swap: an answer after it signals again
    drained.answers.removeAll(keepingCapacity: true)
    drained.bytes.removeAll(keepingCapacity: true)
    queue.withLock { queue in
      swap(&queue.answers, &drained.answers)
      swap(&queue.bytes, &drained.bytes)
    }
  }

  /// The connection ended: every answer from now on is dropped, and those waiting are freed.
  func close() {
    queue.withLock { $0 = Queue(isClosed: true) }
  }
}
