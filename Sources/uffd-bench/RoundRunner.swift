import BrokerProtocol
import CMallocCounter
import ClientSDK
import Glibc
import LinuxSupport
import Userfaultfd

/// Runs one round of one mode: fresh memory, its fault handler (none, an
/// in-process dispatcher, or new BrokerClients of the shared broker), the
/// faulting threads behind a start gate, the timed window, verification of
/// every page, teardown.
final class RoundRunner {
  /// What a mode needs in every round, built once.
  private struct Prepared {
    let layout: Layout
    let plans: [TouchPlan]
    let latencies: [LatencyBuffer]
  }

  private let pages: Int
  private let pageSize = systemPageSize
  private let processes: BenchProcesses?
  private let watchdog: Watchdog
  private var prepared: [String: Prepared] = [:]

  init(pages: Int, modes: [ModeDefinition], processes: BenchProcesses?, watchdog: Watchdog) {
    self.pages = pages
    self.processes = processes
    self.watchdog = watchdog
    for mode in modes {
      let layout = Layout(mode.workload, pages: pages)
      let plans = TouchPlan.plans(for: layout, workload: mode.workload)
      prepared[mode.name] = Prepared(layout: layout, plans: plans, latencies: plans.map { LatencyBuffer(capacity: $0.timedCount) })
    }
  }

  func run(_ mode: ModeDefinition, round: Int) throws(BenchError) -> RoundResult {
    guard let prepared = prepared[mode.name] else { throw BenchError("mode \(mode.name) was not prepared") }
    let workload = mode.workload
    let mapping = try Mapping(length: pages * pageSize)
    let address = mapping.address

    // The fault handler of this round.
    var clients: [BrokerClient] = []
    var inProcess: (uffd: UserfaultFD, handler: InProcessCopyHandler, dispatcher: UserfaultFDDispatcher)?
    do {
      switch workload.backend {
      case .plain:
        break
      case .inProcess:
        let uffd = try UserfaultFD.create(features: BrokerClient.features)
        try uffd.register(address: address, length: mapping.length)
        let handler = InProcessCopyHandler(base: address)
        inProcess = (uffd, handler, try UserfaultFDDispatcher.start(uffd: uffd, handler: handler))
      case .broker:
        guard let processes else { throw BenchError("no broker was started") }
        for client in 0..<prepared.layout.clients {
          let specs = prepared.layout.regions(ofClient: client).map { region in
            RegionSpec(id: region.id, base: address + UInt(region.firstPage * pageSize), length: region.pageCount * pageSize,
                       plugin: region.plugin?.name ?? "", backingOffset: UInt64(region.firstPage * pageSize))
          }
          clients.append(try BrokerClient(regions: specs, socketPath: processes.clientSocket, name: "bench-\(mode.name)-\(client)"))
        }
      }
    } catch let error as BenchError {
      throw error
    } catch {
      throw BenchError("\(mode.name): cannot set up the fault handler: \(error)")
    }

    // The faulting threads wait at the start gate, pass the end gate once done,
    // and exit only after the exit gate: the window closes while they still
    // exist (thread exit frees memory, which is no fault's doing).
    let start = Gate(parties: prepared.plans.count + 1)
    let end = Gate(parties: prepared.plans.count + 1)
    let exit = Gate(parties: prepared.plans.count + 1)
    let workers = zip(prepared.plans, prepared.latencies).map { plan, latencies in
      spawnThread {
        start.pass()
        Toucher.run(plan, base: address, latencies: latencies)
        end.pass()
        exit.pass()
      }
    }

    // The children's counters are read just outside the window (a control round trip each).
    let children = mode.usesBroker ? processes : nil
    let pluginNames = Array(Set(workload.plugins.map(\.name))).sorted()
    if let children { try children.settle() }
    let brokerBefore = try children.map { (p) throws(BenchError) in try p.broker.stats() }
    let pluginsBefore = try children.map { (p) throws(BenchError) in try p.pluginStats(pluginNames) }
    watchdog.arm(seconds: 120 + UInt64(pages / 1_000))
    let usageBefore = ResourceUsage.current()
    let mallocBefore = malloc_counter_calls()
    start.pass()
    let startTime = monotonicNanoseconds()
    end.pass()
    let wallNs = monotonicNanoseconds() - startTime
    let mallocAfter = malloc_counter_calls()
    let usageAfter = ResourceUsage.current()
    exit.pass()
    let brokerAfter = try children.map { (p) throws(BenchError) in try p.broker.stats() }
    let pluginsAfter = try children.map { (p) throws(BenchError) in try p.pluginStats(pluginNames) }
    for worker in workers { pthread_join(worker, nil) }

    // Verify every page while its handler still serves (a missing page would be faulted in, not hang).
    let wrong = verify(mapping, plain: workload.backend == .plain || workload.zeroFilled, mode: mode.name, round: round)
    watchdog.disarm()

    // Teardown. In-process: stop the handler and unregister before munmap (with
    // the unmap event enabled, munmap waits for a reader). Brokered: munmap
    // first (the broker reads the unmap events), then drop the clients.
    var faults = 0
    if let inProcess {
      inProcess.dispatcher.stop()
      faults = inProcess.handler.faults
      try? inProcess.uffd.unregister(address: address, length: mapping.length)
    }
    mapping.unmap()
    withExtendedLifetime(inProcess) {}
    withExtendedLifetime(clients) {}
    clients.removeAll()

    var samples: [UInt64] = []
    samples.reserveCapacity(prepared.latencies.reduce(0) { $0 + $1.count })
    for buffer in prepared.latencies { samples.append(contentsOf: UnsafeBufferPointer(start: buffer.samples, count: buffer.count)) }

    let broker = zip2(brokerAfter, brokerBefore).map { $0 - $1 }
    let plugins = zip2(pluginsAfter, pluginsBefore).map { $0 - $1 }
    switch workload.backend {
    case .plain: faults = Int(usageAfter.minorFaults - usageBefore.minorFaults)
    case .inProcess: break
    // Delegated regions fault in the broker only.
    case .broker: faults = Int(plugins?.faults ?? 0) > 0 ? Int(plugins?.faults ?? 0) : Int(broker?.faults ?? 0)
    }
    return RoundResult(
      mode: mode.name, round: round, pages: pages, faults: faults, wallNs: wallNs, latency: LatencySummary(&samples),
      benchUserNs: usageAfter.userNs - usageBefore.userNs, benchSystemNs: usageAfter.systemNs - usageBefore.systemNs, benchMallocCalls: mallocAfter - mallocBefore,
      broker: broker, plugins: plugins, wrongPages: wrong)
  }

  /// Checks every word of every page; prints the first few wrong pages.
  private func verify(_ mapping: Mapping, plain: Bool, mode: String, round: Int) -> Int {
    var wrong = 0
    for page in 0..<pages {
      let offset = UInt64(page * pageSize)
      guard let word = Pattern.mismatch(mapping.base + page * pageSize, bytes: pageSize, backingOffset: offset, firstWordOnly: plain) else { continue }
      wrong += 1
      if wrong <= 5 {
        let got = mapping.base.load(fromByteOffset: page * pageSize + word * 8, as: UInt64.self)
        let expected = plain && word > 0 ? 0 : Pattern.word(at: offset + UInt64(word * 8))
        print("WRONG PAGE: mode \(mode) round \(round) page \(page) word \(word): got 0x\(String(got, radix: 16)), expected 0x\(String(expected, radix: 16))")
      }
    }
    return wrong
  }
}

private func zip2<A, B>(_ a: A?, _ b: B?) -> (A, B)? {
  guard let a, let b else { return nil }
  return (a, b)
}
