import Glibc

/// The tables printed at the end: medians over rounds, ratios per round then medianed.
enum Report {
  static func roundLine(_ r: RoundResult, rounds: Int) -> String {
    var line = "round \(r.round)/\(rounds) " + Format.left(r.mode, 16)
      + " pages/s " + Format.right(Format.fixed(r.pagesPerSecond), 9)
      + "  faults " + Format.right(String(r.faults), 6)
      + "  lat µs mean " + Format.right(Format.fixed(r.latency.mean / 1e3, 1), 6)
      + " p50 " + Format.right(Format.fixed(Double(r.latency.p50) / 1e3, 1), 6)
      + " p99 " + Format.right(Format.fixed(Double(r.latency.p99) / 1e3, 1), 7)
      + "  cpu µs/fault " + Format.fixed(r.totalCPUPerFault, 2)
    if r.wrongPages > 0 { line += "  WRONG PAGES \(r.wrongPages)" }
    return line
  }

  static func summary(_ results: [RoundResult], modes: [ModeDefinition], options: BenchOptions) {
    func rounds(_ mode: String) -> [RoundResult] { results.filter { $0.mode == mode } }
    /// Median over rounds of this mode's pages/s divided by `baseline`'s in the same round.
    func ratio(_ mode: String, to baseline: String) -> Double {
      let base = Dictionary(rounds(baseline).map { ($0.round, $0.pagesPerSecond) }, uniquingKeysWith: { a, _ in a })
      let ratios = rounds(mode).compactMap { r in base[r.round].map { r.pagesPerSecond / $0 } }
      return Statistics.median(ratios)
    }
    func median(_ mode: String, _ value: (RoundResult) -> Double?) -> Double {
      Statistics.median(rounds(mode).compactMap(value))
    }
    let hasBaseline = modes.contains { $0.name == Modes.baseline }
    let hasSingle = modes.contains { $0.name == Modes.singleClient }

    print("")
    print("== summary: medians of \(options.rounds) rounds, \(options.pages) pages x 4 KiB; ratios are pages/s over the baseline's in the same round ==")
    let widths = [16, 4, 10, 10, 8, 8, 9, 12, 11]
    print(Format.row(["mode", "item", "pages/s", "faults/s", "mean µs", "p50 µs", "p99 µs", "x inprocess", "x brokered"], widths: widths))
    for mode in modes {
      let name = mode.name
      print(Format.row([
        name, String(mode.item),
        Format.fixed(median(name) { $0.pagesPerSecond }),
        Format.fixed(median(name) { $0.faultsPerSecond }),
        Format.fixed(median(name) { $0.latency.mean / 1e3 }, 2),
        Format.fixed(median(name) { Double($0.latency.p50) / 1e3 }, 2),
        Format.fixed(median(name) { Double($0.latency.p99) / 1e3 }, 2),
        hasBaseline ? Format.fixed(ratio(name, to: Modes.baseline), 3) : "n/a",
        hasSingle && mode.usesBroker ? Format.fixed(ratio(name, to: Modes.singleClient), 3) : "",
      ], widths: widths))
    }

    print("")
    print("== CPU time per fault (µs, user/system) and malloc-family calls per fault, in the timed window (medians) ==")
    print("   bench = this process: the faulting threads (and the handler thread in inprocess); broker, plugins = the child processes")
    let cpuWidths = [16, 6, 11, 11, 11, 6, 7, 7, 7]
    print(Format.row(["mode", "faults", "bench u/s", "broker u/s", "plugin u/s", "total", "bench", "broker", "plugin"], widths: cpuWidths)
      + "   <- cpu µs/fault | mallocs/fault")
    func split(_ name: String, _ user: (RoundResult) -> Double?, _ system: (RoundResult) -> Double?) -> String {
      Format.fixed(median(name, user), 1) + "/" + Format.fixed(median(name, system), 1)
    }
    for mode in modes {
      let name = mode.name
      let brokered = mode.usesBroker
      print(Format.row([
        name,
        Format.fixed(median(name) { Double($0.faults) }),
        split(name, { $0.benchUserPerFault }, { $0.benchSystemPerFault }),
        brokered ? split(name, { $0.brokerUserPerFault }, { $0.brokerSystemPerFault }) : "-",
        brokered ? split(name, { $0.pluginUserPerFault }, { $0.pluginSystemPerFault }) : "-",
        Format.fixed(median(name) { $0.totalCPUPerFault }, 1),
        Format.fixed(median(name) { $0.benchMallocsPerFault }, 3),
        brokered ? Format.fixed(median(name) { $0.brokerMallocsPerFault }, 3) : "-",
        brokered ? Format.fixed(median(name) { $0.pluginMallocsPerFault }, 3) : "-",
      ], widths: cpuWidths))
    }
    let brokeredModes = modes.filter(\.usesBroker)
    if !brokeredModes.isEmpty {
      print("broker mallocs per fault: " + brokeredModes.map { "\($0.name) \(Format.fixed(median($0.name) { $0.brokerMallocsPerFault }, 3))" }.joined(separator: ", "))
      print("plugin mallocs per fault: " + brokeredModes.map { "\($0.name) \(Format.fixed(median($0.name) { $0.pluginMallocsPerFault }, 3))" }.joined(separator: ", "))
    }
  }

  static func micro(_ result: (event: Micro.Result, decision: Micro.Result), iterations: Int) {
    print("")
    print("== micro: the wire codecs, medians of 5 x \(iterations) iterations ==")
    let event = result.event
    print("pagefault event encode+decode (EventBatchEncoder.append+encode, EventBatchDecoder.decode+event(at:), protobuf-c): "
      + "\(Format.fixed(event.nanosecondsPerOperation, 1)) ns/event (target <= 1000: \(event.nanosecondsPerOperation <= 1000 ? "met" : "MISSED")), "
      + "\(Format.fixed(event.mallocCallsPerOperation, 3)) mallocs/event")
    let decision = result.decision
    print("4 KiB copy decision encode+decode (DecisionBatchEncoder.append+encode, DecisionBatchDecoder.decode+decision(at:), protobuf-c): "
      + "\(Format.fixed(decision.nanosecondsPerOperation, 1)) ns/decision, \(Format.fixed(decision.mallocCallsPerOperation, 3)) mallocs/decision")
  }

  /// The first three fields of /proc/loadavg: how busy the (shared) machine was.
  static func loadAverage() -> String {
    guard let line = firstLine(of: "/proc/loadavg") else { return "?" }
    return line.split(separator: " ").prefix(3).joined(separator: " ")
  }

  static func machine(loadBefore: String) {
    print("")
    print("== machine ==")
    var names = utsname()
    uname(&names)
    func field<T>(_ value: inout T) -> String {
      withUnsafeBytes(of: &value) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }
    print("nproc \(sysconf(Int32(_SC_NPROCESSORS_ONLN))); kernel \(field(&names.sysname)) \(field(&names.release)) \(field(&names.version)) \(field(&names.machine))")
    if let model = cpuModel() { print("cpu \(model)") }
    print("load average (1/5/15 min) before the run \(loadBefore), after \(loadAverage())")
    // In a VM, how an idle vCPU waits decides what a cross-CPU wakeup costs, and
    // every brokered fault takes several: halting (poll 0 ns) makes them slow.
    let governor = firstLine(of: "/sys/devices/system/cpu/cpuidle/current_governor") ?? "?"
    let haltPoll = firstLine(of: "/sys/module/haltpoll/parameters/guest_halt_poll_ns").map { "\($0) ns" } ?? "n/a"
    print("cpuidle governor \(governor); guest halt polling \(haltPoll)")
  }

  private static func firstLine(of path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var buffer = [CChar](repeating: 0, count: 256)
    guard fgets(&buffer, Int32(buffer.count), file) != nil else { return nil }
    return String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  private static func cpuModel() -> String? {
    guard let file = fopen("/proc/cpuinfo", "r") else { return nil }
    defer { fclose(file) }
    var line: UnsafeMutablePointer<CChar>?
    var capacity = 0
    defer { free(line) }
    while getline(&line, &capacity, file) > 0 {
      guard let line else { break }
      let text = String(cString: line)
      if text.hasPrefix("model name"), let colon = text.firstIndex(of: ":") {
        return text[text.index(after: colon)...].trimmingCharacters()
      }
    }
    return nil
  }
}

extension Substring {
  fileprivate func trimmingCharacters() -> String {
    String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == "\n" || $0 == " " }.reversed())
  }
}
