import BrokerCore
import BrokerProtocol
import Userfaultfd

/// The broker's engine driven through a seeded schedule, FoundationDB-style:
/// client processes whose threads fault, drop, unmap and move memory while
/// others fault on it; plugins that answer late, out of order, twice, wrongly
/// or never, crash, hang and come back; time that passes in jumps; fills that
/// the kernel model refuses as the kernel would (EAGAIN, EEXIST, ENOENT,
/// partial). The simulation is the engine's runtime: it performs every action.
///
/// Checked at every step:
/// - every page filled reads what it must: the plugin's data for its region
///   offset, or zeros once the process dropped it (no stale decision applied,
///   no event reordered after a fault, no offset mixed up);
/// - nothing fails closed, no client is killed (none of these schedules needs it);
/// - a fault woken `wakeLimit` times with no map event in between is a livelock;
/// - the broker keeps at most one fault per page of its clients.
/// After the schedule, with the plugins made reliable: every thread gets its
/// page (nothing stuck), and when the clients exit, every plugin that served
/// one is told Closed, once, after everything else of that client.
public final class Simulation {
  public struct Failure: Error, CustomStringConvertible {
    public var seed: UInt64
    public var step: Int
    public var message: String
    public var trace: [String]
    public var description: String {
      "seed \(seed), step \(step): \(message)" + (trace.isEmpty ? "" : "\n" + trace.suffix(80).joined(separator: "\n"))
    }
  }

  public struct Statistics {
    public var steps = 0
    public var faults = 0
    public var fills = 0
    public var mapChanges = 0
    public var pluginCrashes = 0
    public var clientsServed = 0
  }

  public let seed: UInt64
  public internal(set) var statistics = Statistics()
  var random: SimRandom
  var now: UInt64 = 1_000_000_000
  let engine: BrokerEngine
  let pageSize: UInt = 4096
  var processes: [SimProcess] = []
  var slots: [ClientID: Int] = [:]
  var plugins: [SimPlugin]
  var step = 0
  let tracing: Bool
  public private(set) var trace: [String] = []
  var actions: [Action] = []
  /// Plugins answer everything at once and never misbehave (the end of a run).
  var reliable = false
  var nextPid: Int32 = 1000
  /// Bytes of decisions, alive until their fills were performed.
  var buffers: [UnsafeMutableRawBufferPointer] = []
  var failure: String?

  static let wakeLimit = 10
  static let regionPages = 16

  public init(seed: UInt64, tracing: Bool = false) {
    self.seed = seed
    self.tracing = tracing
    random = SimRandom(seed: seed)
    var configuration = BrokerConfiguration(clientSocketPath: "", pluginSocketPath: "", owner: 0)
    configuration.plugins = [.init(name: "p0", executable: "/bin/true"), .init(name: "p1", executable: "/bin/true")]
    configuration.pluginDeadlineMilliseconds = 50
    configuration.registrationTimeoutMilliseconds = 2_000
    var tokens = SimRandom(seed: seed ^ 0x5EED)
    // Checked values: the configuration is valid.
    engine = try! BrokerEngine(configuration: configuration, pageSize: 4096, now: now, makeToken: { UInt128(tokens.next()) << 64 | UInt128(tokens.next()) | 1 })
    plugins = [SimPlugin(name: "p0"), SimPlugin(name: "p1")]
  }

  /// Runs `steps` steps, then settles (plugins made reliable), then ends every client.
  public func run(steps: Int) throws(Failure) {
    for index in plugins.indices { connect(index) }
    for _ in 0..<3 { startClient() }
    try check()
    while step < steps {
      step += 1
      statistics.steps += 1
      takeStep()
      try check()
    }
    try settle()
    for slot in processes.indices where !processes[slot].exited { exitClient(slot) }
    try settle()
    for plugin in plugins {
      for client in plugin.served.subtracting(plugin.closed).sorted() {
        throw fail("plugin \(plugin.name) served client \(client) and was never told Closed")
      }
    }
  }

  func note(_ line: @autoclosure () -> String) {
    if tracing { trace.append("[\(step)] " + line()) }
  }

  func fail(_ message: String) -> Failure {
    Failure(seed: seed, step: step, message: message, trace: trace)
  }

  private func check() throws(Failure) {
    if let failure { throw fail(failure) }
    // At most one per page of a live client: a second fault of a page merges into the first.
    let bound = processes.filter { !$0.exited }.count * 2 * Self.regionPages
    if engine.outstandingFaults > bound {
      throw fail("the broker keeps \(engine.outstandingFaults) faults, more than the \(bound) pages its clients have")
    }
    for process in processes where !process.exited {
      for (thread, state) in process.threads.enumerated() {
        if case .faulting(let page, _, let wakes) = state, wakes > Self.wakeLimit {
          throw fail("livelock: client \(process.id) thread \(thread) woken \(wakes) times at 0x\(String(page, radix: 16)) with no map event between")
        }
      }
    }
  }

  // MARK: - Steps

  private func takeStep() {
    switch random.below(1000) {
    case 0..<380: threadActs()
    case 380..<600: readSomeUffd()
    case 600..<880: pluginWorks(random.below(plugins.count))
    case 880..<970: passTime(UInt64(random.below(4_000_000)))
    case 970..<980: passTime(UInt64(random.below(80_000_000)))
    case 980..<992: pluginLifecycle(random.below(plugins.count))
    default: clientLifecycle()
    }
  }

  private func passTime(_ nanoseconds: UInt64) {
    now += nanoseconds
    note("time +\(nanoseconds / 1_000) µs")
    engine.tick(now: now)
    perform()
  }

  // MARK: Clients

  private func startClient() {
    let slot = processes.count
    var process = SimProcess(pid: nextPid, threads: 3, pageSize: pageSize)
    nextPid += 1
    guard case .success(let id) = engine.clientConnected(PeerCredentials(pid: process.pid, uid: 0, gid: 0), now: now) else { return }
    process.id = id
    let base = UInt(0x1000_0000) * UInt(slot + 1)
    var specs: [RegionSpec] = []
    for region in 0..<2 {
      let start = base + UInt(region) * 0x10_0000
      specs.append(RegionSpec(id: UInt64(region + 1), base: start, length: Self.regionPages * Int(pageSize), pageSize: Int(pageSize), plugin: "p\(region)"))
      for page in 0..<Self.regionPages {
        process.pages[start + UInt(page) * pageSize] = .init(origin: .init(region: UInt64(region + 1), offset: UInt64(page) * UInt64(pageSize)), present: nil)
      }
    }
    processes.append(process)
    slots[id] = slot
    note("client \(id) (pid \(process.pid)) connects")
    engine.clientRequest(id, ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "sim"))), descriptors: .none, now: now)
    let register = RegisterRequest(pid: process.pid, features: [.eventRemove, .eventUnmap, .eventRemap], ioctls: [], regions: specs)
    engine.clientRequest(id, ClientRequest(requestID: 2, .register(register)), descriptors: .userfaultfd([.eventRemove, .eventUnmap, .eventRemap]), now: now)
    perform()
  }

  private func exitClient(_ slot: Int) {
    processes[slot].exited = true
    note("client \(processes[slot].id) exits")
    engine.clientGone(processes[slot].id, BrokerError(.disconnected, "exited"), now: now)
    perform()
  }

  private func clientLifecycle() {
    let live = processes.indices.filter { !processes[$0].exited }
    if live.count < 2 || (live.count < 4 && random.chance(50)) {
      startClient()
    } else if let slot = live.randomElement(using: &random) {
      statistics.clientsServed += 1
      exitClient(slot)
    }
  }

  private func threadActs() {
    let live = processes.indices.filter { processes[$0].registered && !processes[$0].exited }
    guard let slot = live.randomElement(using: &random) else { return }
    let thread = random.below(processes[slot].threads.count)
    guard processes[slot].threads[thread] == .running else { return }
    let roll = random.below(100)
    if roll < 60 {
      // Mostly where a fault is: the pages not present.
      let missing = random.chance(80)
      guard let page = processes[slot].pages.filter({ !missing || $0.value.present == nil }).keys.sorted().randomElement(using: &random)
        ?? processes[slot].pages.keys.sorted().randomElement(using: &random)
      else { return }
      let write = random.chance(30)
      processes[slot].touch(page, thread: thread, write: write, now: now)
      if case .faulting = processes[slot].threads[thread] { statistics.faults += 1 }
      note("client \(processes[slot].id) thread \(thread) \(write ? "writes" : "reads") 0x\(String(page, radix: 16))")
      return
    }
    guard let range = changeableRange(in: slot, pages: 1 + random.below(roll < 90 ? 4 : 8)) else { return }
    statistics.mapChanges += 1
    if roll < 75 {
      note("client \(processes[slot].id) thread \(thread) drops \(describe(range))")
      processes[slot].dropPages(range)
      processes[slot].beginMapChange([.remove(range, thread: thread)], thread: thread)
    } else if roll < 85 {
      guard processes[slot].pages.count > 8 else { return }
      note("client \(processes[slot].id) thread \(thread) unmaps \(describe(range))")
      processes[slot].unmapPages(range)
      processes[slot].beginMapChange([.unmap(range, thread: thread)], thread: thread)
    } else {
      guard let destination = hole(in: slot, length: range.count) else { return }
      note("client \(processes[slot].id) thread \(thread) moves \(describe(range)) to 0x\(String(destination, radix: 16))")
      processes[slot].movePages(from: range.lowerBound, to: destination, length: range.count)
      processes[slot].beginMapChange([
        .remap(from: range.lowerBound, to: destination, length: range.count, thread: thread),
        .unmap(range, thread: thread),
      ], thread: thread)
      busy[slot, default: []].append((thread, destination..<destination + UInt(range.count)))
    }
    busy[slot, default: []].append((thread, range))
  }

  /// Ranges a map change in progress touches, per process: a program hands
  /// memory on only once the change returned (a thread may still move
  /// memory into a hole another thread is making).
  var busy: [Int: [(thread: Int, range: Range<UInt>)]] = [:]

  /// A run of up to `pages` registered pages, none of them in a change in progress.
  private func changeableRange(in slot: Int, pages count: Int) -> Range<UInt>? {
    busy[slot] = busy[slot]?.filter { processes[slot].threads[$0.thread] == .changingMaps }
    guard let start = processes[slot].pages.keys.sorted().randomElement(using: &random) else { return nil }
    var end = start
    while end - start < UInt(count) * pageSize, processes[slot].pages[end] != nil { end += pageSize }
    let range = start..<end
    guard !(busy[slot] ?? []).contains(where: { $0.range.overlaps(range) }) else { return nil }
    return range
  }

  /// An unregistered range of `length` bytes in the process's part of the
  /// address space: often the hole another thread's move is leaving (its
  /// trailing UNMAP then comes after this move's REMAP).
  private func hole(in slot: Int, length: Int) -> UInt? {
    let leaving = (busy[slot] ?? []).filter { processes[slot].threads[$0.thread] == .changingMaps && processes[slot].pages[$0.range.lowerBound] == nil }
    if random.chance(60), let source = leaving.randomElement(using: &random),
       !stride(from: source.range.lowerBound, to: source.range.lowerBound + UInt(length), by: Int(pageSize)).contains(where: { processes[slot].pages[$0] != nil }) {
      return source.range.lowerBound
    }
    let base = UInt(0x1000_0000) * UInt(slot + 1)
    for _ in 0..<8 {
      let start = base + UInt(random.below(0x300)) * pageSize
      if !stride(from: start, to: start + UInt(length), by: Int(pageSize)).contains(where: { processes[slot].pages[$0] != nil }) { return start }
    }
    return nil
  }

  private func readSomeUffd() {
    let ready = processes.indices.filter { processes[$0].watched && !processes[$0].exited && !processes[$0].queue.isEmpty }
    guard let slot = ready.randomElement(using: &random) else { return }
    readUffd(slot)
  }

  private func readUffd(_ slot: Int) {
    let messages = processes[slot].queue
    processes[slot].queue.removeAll()
    let events = messages.map { message -> KernelEvent in
      switch message {
      case .fault(let page, let thread): .pagefault(Pagefault(address: page, flags: [], thread: Int32(thread)))
      case .remove(let range, _): .remove(range)
      case .unmap(let range, _): .unmap(range)
      case .remap(let from, let to, let length, _): .remap(from: from, to: to, length: length)
      }
    }
    note("broker reads client \(processes[slot].id): \(events.map(describe).joined(separator: ", "))")
    if messages.contains(where: \.isMapChange) { processes[slot].forgetWakes() }
    engine.uffdEvents(processes[slot].id, events, now: now)
    // The readers of map changes are released at the read: their next
    // messages may be queued before or after the broker's fills.
    let releaseFirst = random.chance(50)
    if releaseFirst { for message in messages { processes[slot].read(message) } }
    perform()
    if !releaseFirst { for message in messages { processes[slot].read(message) } }
  }

  // MARK: Plugins

  private func connect(_ index: Int) {
    guard plugins[index].connection == nil, !plugins[index].down else { return }
    guard case .success(let id) = engine.pluginConnected(PeerCredentials(pid: Int32(100 + index), uid: 0, gid: 0), now: now) else { return }
    plugins[index].connection = id
    note("plugin \(plugins[index].name) connects as \(id)")
    do {
      try engine.pluginHello(id, Hello(role: .plugin, name: plugins[index].name), sharedAreaSize: 0, now: now)
    } catch {
      failure = "plugin \(plugins[index].name)'s Hello was refused: \(error)"
    }
    perform()
  }

  private func pluginLifecycle(_ index: Int) {
    if plugins[index].down {
      if random.chance(30) { plugins[index].down = false }
    } else if plugins[index].connection == nil {
      connect(index)
    } else if !reliable && random.chance(20) {
      plugins[index].hung = true
      note("plugin \(plugins[index].name) hangs")
    } else if !reliable && random.chance(50) {
      statistics.pluginCrashes += 1
      note("plugin \(plugins[index].name) crashes")
      let id = plugins[index].connection!
      dropConnection(index)
      engine.pluginGone(id, BrokerError(.disconnected, "crashed"), now: now)
      perform()
    }
  }

  /// The plugin's connection is gone, and with its process all it knew
  /// (as the sample plugins: what they know lives in memory).
  func dropConnection(_ index: Int) {
    plugins[index] = SimPlugin(name: plugins[index].name, down: plugins[index].down)
  }

  /// The plugin reads some of its messages and sends some of its answers.
  private func pluginWorks(_ index: Int) {
    guard let id = plugins[index].connection, plugins[index].welcomed else { return }
    let reads = reliable ? plugins[index].inbox.count : min(plugins[index].inbox.count, 1 + random.below(8))
    for _ in 0..<reads {
      guard plugins[index].connection == id else { return }
      receive(plugins[index].inbox.removeFirst(), plugin: index, connection: id)
    }
    guard !plugins[index].hung, plugins[index].connection == id else { return }
    var answers = plugins[index].answers
    plugins[index].answers.removeAll()
    if !reliable { answers.shuffle(using: &random) }
    for answer in answers {
      if !reliable && random.chance(30) {
        plugins[index].answers.append(answer)  // later
        continue
      }
      send(answer, plugin: index, connection: id)
      if !reliable && random.chance(3) { send(answer, plugin: index, connection: id) }  // twice
    }
    perform()
    for buffer in buffers { buffer.deallocate() }
    buffers.removeAll()
  }

  private func send(_ answer: SimPlugin.Answer, plugin index: Int, connection: PluginID) {
    guard plugins[index].connection == connection else { return }
    let length = answer.pages.count * Int(pageSize)
    var data = UnsafeRawBufferPointer(start: nil, count: 0)
    if answer.kind == .copy {
      let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 16)
      buffers.append(buffer)
      for (page, content) in answer.pages.enumerated() { Self.encode(content, into: UnsafeMutableRawBufferPointer(rebasing: buffer[page * Int(pageSize)..<(page + 1) * Int(pageSize)])) }
      data = UnsafeRawBufferPointer(buffer)
    }
    note("plugin \(plugins[index].name) answers fault \(answer.faultID): \(answer.kind) 0x\(String(answer.address, radix: 16)) + \(answer.pages.count) pages \(answer.pages)")
    engine.decision(connection, DecodedDecision(faultID: answer.faultID, kind: answer.kind, address: answer.address, length: answer.kind == .retry ? 0 : length, data: data), now: now)
  }

  func receive(_ event: BrokerEvent, plugin index: Int, connection: PluginID) {
    let client = event.clientID
    if plugins[index].closed.contains(client) {
      failure = "plugin \(plugins[index].name) got \(event) for client \(client) after Closed"
      return
    }
    switch event {
    case .regionOpened(_, _, let region, _, _):
      plugins[index].regions[.init(client: client, region: region.id)] = region.length
      plugins[index].served.insert(client)
      engine.regionReply(connection, RegionReply(clientID: client, regionID: region.id, error: nil), now: now)
      perform()
    case .removed(let range):
      for offset in stride(from: range.startOffset, to: range.startOffset + UInt64(range.range.count), by: Int(pageSize)) {
        plugins[index].removed.insert(.init(client: client, region: range.regionID, offset: offset))
      }
    case .regionClosed(_, let region):
      plugins[index].regions[.init(client: client, region: region)] = nil
    case .closed:
      plugins[index].closed.insert(client)
    case .pagefault(let fault):
      decide(fault, plugin: index)
    case .unmapped, .remapped:
      break
    case .store:
      failure = "plugin \(plugins[index].name) got a store, and no client swaps out here"
    }
  }

  /// What the plugin answers a fault with, decided from what it knows now.
  private func decide(_ fault: PagefaultEvent, plugin index: Int) {
    guard let length = plugins[index].regions[.init(client: fault.clientID, region: fault.regionID)] else {
      failure = "plugin \(plugins[index].name) got a fault of region \(fault.regionID) of client \(fault.clientID) it was never opened"
      return
    }
    let roll = reliable ? 99 : random.below(100)
    if roll < 4 {
      plugins[index].answers.append(.init(faultID: fault.faultID, kind: .retry, address: fault.address, pages: []))
      return
    }
    if roll < 6 {
      // Misaligned: refused (and counted).
      plugins[index].answers.append(.init(faultID: fault.faultID, kind: .zero, address: fault.address + 8, pages: [.zero]))
      return
    }
    // A prefetch around the page, inside the region's offsets.
    let before = roll < 40 ? min(UInt64(random.below(4)), fault.offset / UInt64(pageSize)) : 0
    let after = roll < 40 ? min(UInt64(random.below(4)), (UInt64(length) - fault.offset) / UInt64(pageSize) - 1) : 0
    let first = fault.offset - before * UInt64(pageSize)
    let contents = (0...(before + after)).map { page in
      plugins[index].content(client: fault.clientID, region: fault.regionID, offset: first + page * UInt64(pageSize))
    }
    let kind: DecisionKind = contents.allSatisfy { $0 == .zero } && random.chance(50) ? .zero : .copy
    plugins[index].answers.append(.init(faultID: fault.faultID, kind: kind, address: fault.address - UInt(before) * pageSize, pages: contents))
  }

  static func encode(_ content: SimProcess.Content, into page: UnsafeMutableRawBufferPointer) {
    page.initializeMemory(as: UInt8.self, repeating: 0)
    if case .data(let origin) = content {
      page.storeBytes(of: origin.region, toByteOffset: 0, as: UInt64.self)
      page.storeBytes(of: origin.offset, toByteOffset: 8, as: UInt64.self)
    }
  }

  static func decode(_ page: UnsafeRawBufferPointer) -> SimProcess.Content {
    let region = page.load(fromByteOffset: 0, as: UInt64.self)
    return region == 0 ? .zero : .data(.init(region: region, offset: page.load(fromByteOffset: 8, as: UInt64.self)))
  }

  // MARK: - Settling

  /// With plugins reliable and back, runs until every thread has its page
  /// and every message was read; fails if that does not happen.
  private func settle() throws(Failure) {
    reliable = true
    for index in plugins.indices {
      plugins[index].hung = false
      plugins[index].down = false
    }
    for _ in 0..<2_000 {
      step += 1
      for index in plugins.indices {
        connect(index)
        pluginWorks(index)
      }
      for slot in processes.indices where processes[slot].watched && !processes[slot].exited && !processes[slot].queue.isEmpty { readUffd(slot) }
      passTime(5_000_000)
      try check()
      let busyThreads = processes.indices.filter { slot in
        !processes[slot].exited && processes[slot].threads.contains { $0 != .running }
      }
      if busyThreads.isEmpty && plugins.allSatisfy({ $0.inbox.isEmpty && $0.answers.isEmpty }) { return }
    }
    let stuck = processes.filter { !$0.exited }.flatMap { process in
      process.threads.enumerated().compactMap { thread, state in state == .running ? nil : "client \(process.id) thread \(thread): \(state)" }
    }
    throw fail("stuck after the plugins came back: \(stuck.joined(separator: "; "))")
  }

  func describe(_ range: Range<UInt>) -> String { "0x\(String(range.lowerBound, radix: 16))+\(range.count / Int(pageSize))p" }

  func describe(_ event: KernelEvent) -> String {
    switch event {
    case .pagefault(let fault): "fault 0x\(String(fault.address, radix: 16))"
    case .remove(let range): "REMOVE \(describe(range))"
    case .unmap(let range): "UNMAP \(describe(range))"
    case .remap(let from, let to, let length): "REMAP 0x\(String(from, radix: 16))→0x\(String(to, radix: 16)) \(length / Int(pageSize))p"
    case .fork: "FORK"
    }
  }
}
