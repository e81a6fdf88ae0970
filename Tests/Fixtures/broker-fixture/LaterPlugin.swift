import Glibc
import LinuxSupport
import PluginSDK
import Synchronization

/// The fixture's plugin that answers every fault later (`PluginDecision.later`)
/// from a pool of 4 worker threads taking the newest job first, so answers
/// come out of order and from several threads. Per page (its index in the backing):
/// a hole (`Pattern.isHole`) gets `.zero`; every 3rd page `.retry` the first
/// time (the broker sends it again with a new id, deferred again); every 5th
/// a `.copyRange` of its aligned 16 KiB block (holes in it as zeros); the rest `.copy`.
///
/// Modes: `later`, as above; `later-hold`: the faults of region 1 of the
/// first client are held unanswered until that region closes, then all
/// answered at once with wrong bytes (0xEE), answers the runner must drop;
/// the other faults as in `later`.
/// Event log lines: `opened CLIENT REGION`, `regionClosed CLIENT REGION`,
/// `closed CLIENT`, `held CLIENT COUNT` (answered late). The runner's
/// statistics (`answersDropped=`...) go to EVENT_LOG.stats.
final class LaterPlugin: PagePlugin {
  private let pool = WorkerPool(threads: 4)
  private let eventLog: UnsafeMutablePointer<FILE>?
  private var answers: FaultAnswers?
  /// (client, offset) of the pages answered `.retry` once already.
  private var retried = Set<[UInt64]>()
  /// In mode later-hold: the client whose region 1's faults are held (the first one), and its held faults.
  private var holding: UInt64?
  private var held: [PluginFault] = []
  private let holds: Bool

  init(mode: String, eventLogPath: String?) {
    holds = mode == "later-hold"
    eventLog = eventLogPath.flatMap { fopen($0, "a") }
  }

  func log(_ line: String) {
    guard let eventLog else { return }
    fputs(line + "\n", eventLog)
    fflush(eventLog)
  }

  func connected(_ store: DescriptorStore, answers: FaultAnswers) { self.answers = answers }

  func regionOpened(_ region: PluginRegion) throws {
    log("opened \(region.clientID) \(region.spec.id)")
    if holds && holding == nil { holding = region.clientID }
  }

  func regionClosed(_ region: PluginRegion) {
    log("regionClosed \(region.clientID) \(region.spec.id)")
    guard region.clientID == holding && region.spec.id == 1, let answers else { return }
    // Too late: the runner has answered these `.retry` already and must drop these.
    let late = held
    held = []
    log("held \(region.clientID) \(late.count)")
    pool.submit { wrong in
      wrong.initializeMemory(as: UInt8.self, repeating: 0xEE)
      for (index, fault) in late.enumerated() {
        let decision: PluginDecision = switch index % 3 {
        case 0: .copy
        case 1: .copyRange(offset: fault.offset / 16384 * 16384, length: 16384)
        default: .zero
        }
        answers.answer(fault.faultID, decision, bytes: UnsafeRawBufferPointer(wrong))
      }
    }
  }

  func clientClosed(_ clientID: UInt64, reason: String) { log("closed \(clientID)") }

  func pagefault(_ fault: PluginFault, in region: PluginRegion, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    guard let answers else { return .retry }
    if region.clientID == holding && region.spec.id == 1 {
      held.append(fault)
      return .later
    }
    let page = (region.spec.backingOffset + fault.offset) / UInt64(region.pageSize)
    let firstTime = page % 3 == 0 && retried.insert([region.clientID, fault.offset]).inserted
    let backing = region.spec.backingOffset
    let length = UInt64(region.length)
    pool.submit {
      answers.answer(fault.faultID, Self.decide(fault, backing: backing, regionLength: length, firstTime: firstTime, buffer: $0), bytes: UnsafeRawBufferPointer($0))
    }
    return .later
  }

  /// What a worker answers, the bytes written into its own `buffer` (16 KiB).
  private static func decide(_ fault: PluginFault, backing: UInt64, regionLength: UInt64, firstTime: Bool, buffer: UnsafeMutableRawBufferPointer) -> PluginDecision {
    let pageSize = UInt64(systemPageSize)
    let page = (backing + fault.offset) / pageSize
    if Pattern.isHole(backingOffset: backing + fault.offset) { return .zero }
    if firstTime { return .retry }
    guard page % 5 == 1 else {
      Pattern.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(pageSize)]), backingOffset: backing + fault.offset)
      return .copy
    }
    let block = UInt64(buffer.count)
    let start = fault.offset / block * block
    let length = min(block, regionLength - start)
    for at in stride(from: UInt64(0), to: length, by: Int(pageSize)) {
      let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(at)..<Int(at + pageSize)])
      if Pattern.isHole(backingOffset: backing + start + at) {
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
      } else {
        Pattern.fill(bytes, backingOffset: backing + start + at)
      }
    }
    return .copyRange(offset: start, length: Int(length))
  }
}

/// Worker threads that run submitted jobs, newest first; each worker has its
/// own 16 KiB page-aligned buffer, handed to the job.
final class WorkerPool: @unchecked Sendable {
  // @unchecked: `semaphore` is a sem_t, made for sharing between threads.
  typealias Job = @Sendable (UnsafeMutableRawBufferPointer) -> Void
  private let jobs = Mutex<[Job]>([])
  /// Counts the jobs waiting; the workers sleep on it.
  private let semaphore: UnsafeMutablePointer<sem_t>

  init(threads: Int) {
    semaphore = .allocate(capacity: 1)
    sem_init(semaphore, 0, 0)
    for _ in 0..<threads {
      _ = spawnThread { [self] in work() }
    }
  }

  func submit(_ job: @escaping Job) {
    jobs.withLock { $0.append(job) }
    sem_post(semaphore)
  }

  private func work() {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 << 10, alignment: 4096)
    while true {
      while sem_wait(semaphore) != 0 {}  // EINTR
      guard let job = jobs.withLock({ $0.popLast() }) else { continue }
      job(buffer)
    }
  }
}
