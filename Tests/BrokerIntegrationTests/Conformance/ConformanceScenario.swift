import BrokerProtocol
import Glibc
import Testing

/// The conformance suite (issue 13): one list of what every plugin SDK must
/// get right, each scenario a real plugin process against the real broker,
/// with the fixture client checking every byte or the expected failure.
///
/// The SDK scenarios run against each SDK's conformance plugin
/// (`ConformanceLanguage`), whose behaviour comes from the region's argument
/// (Tests/Fixtures/conformance-plugins/README.md). The wire scenarios test
/// what no SDK can be made to send (a packet over 256 KiB, a Hello of another
/// version): a hand-driven socket, whatever the language.
enum ConformanceScenario: String, CaseIterable, Sendable, CustomTestStringConvertible {
  /// 64 MiB served page by page to 4 threads, every byte checked.
  case exact64MiB
  /// Aligned 16-page blocks: one fault per block for a sequential reader.
  case prefetch
  /// Zero pages for reads and writes.
  case zero
  /// Each page retried once, then served.
  case retry
  /// A poisoned page: the access gets SIGBUS; the plugin serves on.
  case poison
  /// Regions added and removed after Register.
  case regionsAddedRemoved
  /// MADV_DONTNEED racing faults: a dropped page never reads its old bytes.
  case dontneedWhileFaulting
  /// mremap and munmap while another thread faults.
  case mremapWhileFaulting
  /// The plugin kills itself (SIGKILL) with faults in flight, again and again;
  /// each restart is told the live regions and gets the faults redelivered.
  case killedMidFault
  /// A swap-out's Store answered with StoreReply; the dropped pages come back from the plugin.
  case swapStore
  /// The plugin killed (SIGKILL) after a swap-out: its restart finds the stored
  /// pages in the broker's descriptor store, says it holds them, and serves them.
  case swapSurvivesKill
  /// Misaligned decisions refused (badRange), counted, told to the plugin, the faults redelivered.
  case invalidDecision
  /// Decisions over a range longer than the region refused the same way; the neighbours untouched.
  case oversizedDecision
  /// A second plugin of the same name: refused, it says the broker's code and reason; the first serves on.
  case nameTaken
  /// A plugin of a uid the broker does not allow, refused before it reads the Hello (whose send
  /// may fail with EPIPE): it says the broker's code and reason, never a broken pipe.
  case notAuthorized
  /// Wire: a plugin packet over 256 KiB: `ERROR_TOO_LARGE`, the connection closed.
  case oversizedPacket
  /// Wire: a plugin's Hello of protocol version 1: `ERROR_VERSION`, the connection closed.
  case wrongVersion

  var testDescription: String { rawValue }

  /// Whether it runs on a hand-driven socket instead of an SDK's plugin.
  var isWireScenario: Bool { self == .oversizedPacket || self == .wrongVersion }

  static let sdkScenarios = allCases.filter { !$0.isWireScenario }
  static let wireScenarios = allCases.filter(\.isWireScenario)

  /// The plugin name every scenario uses.
  static let name = "conformance"

  /// Runs the scenario against `language`'s conformance plugin.
  func run(_ language: ConformanceLanguage) throws {
    precondition(!isWireScenario, "\(self) runs on a raw socket")
    if self == .notAuthorized { return try runNotAuthorized(language) }
    try Harness.run("conf-\(language.rawValue)-\(rawValue)") { h in
      let plugin = try language.startPlugin(h, name: Self.name)
      try check(h, plugin: plugin, language: language)
      #expect(try h.status().plugin(Self.name)?.connectedPID != 0, h.diagnostics("the plugin is not connected at the end: \(plugin.stderr)"))
    }
  }

  /// The client's environment: the regions' argument, the plugin's behaviour.
  private func behaviour(_ argument: String) -> [String: String] { ["FIXTURE_ARGUMENT": argument] }

  private func check(_ h: Harness, plugin: FixtureProcess, language: ConformanceLanguage) throws {
    let name = Self.name
    switch self {
    case .exact64MiB:
      let outcome = try h.runClient("touch", mib: 64, threads: 4, plugin: name, timeout: 120, extraEnvironment: behaviour("pattern"))
      expectExact(h, outcome, pages: pages(mib: 64), plugin: plugin)
      #expect(try h.status().plugin(name)?.invalidDecisions == 0, h.diagnostics)

    case .prefetch:
      let outcome = try h.runClient("touch", mib: 4, threads: 1, plugin: name, extraEnvironment: behaviour("prefetch=16"))
      expectExact(h, outcome, pages: pages(mib: 4), plugin: plugin)
      // One thread in order: one fault per block, the other 15 pages arrive with it.
      #expect(try h.status().plugin(name)?.faultsSent == UInt64(pages(mib: 4) / 16), h.diagnostics)

    case .zero:
      let outcome = try h.runClient("zero", mib: 4, threads: 2, plugin: name, extraEnvironment: behaviour("zero"))
      expectExact(h, outcome, pages: pages(mib: 4), plugin: plugin)
      let applied = try h.status().plugin(name)?.decisionsAppliedByKind
      #expect(applied?.zero == UInt64(pages(mib: 4)) && applied?.copy == 0, h.diagnostics("\(String(describing: applied))"))

    case .retry:
      let outcome = try h.runClient("touch", mib: 2, threads: 2, plugin: name, extraEnvironment: behaviour("retry-once"))
      expectExact(h, outcome, pages: pages(mib: 2), plugin: plugin)
      #expect(try h.status().plugin(name)?.retries == UInt64(pages(mib: 2)), h.diagnostics)

    case .poison:
      let outcome = try h.runClient("touch", mib: 1, threads: 1, plugin: name, extraEnvironment: behaviour("poison"))
      #expect(outcome.status == .signaled(SIGBUS), h.diagnostics(outcome.stdout + outcome.stderr))
      #expect(try h.status().plugin(name)?.decisionsAppliedByKind.poison == 1, h.diagnostics)
      // The plugin serves on: another client's regions, another behaviour.
      let after = try h.runClient("touch", mib: 1, threads: 2, plugin: name, extraEnvironment: behaviour("pattern"))
      expectExact(h, after, pages: pages(mib: 1), plugin: plugin)

    case .regionsAddedRemoved:
      let outcome = try h.runClient("add-remove", mib: 1, threads: 1, plugin: name)
      #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
      #expect(outcome.summary == "regions: added 1, overlap refused: bad region, refused range plain: true, verified 512 pages, 0 wrong, removed region reads zeros: true",
              h.diagnostics(outcome.stdout))

    case .dontneedWhileFaulting:
      let outcome = try h.runClient("dontneed-race", mib: 0, threads: 1, plugin: name, loops: 300, timeout: 60)
      #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
      #expect(outcome.summary == "dontneed races 300, stale pages 0", h.diagnostics(outcome.stdout))

    case .mremapWhileFaulting:
      let outcome = try h.runClient("remap", mib: 4, threads: 1, plugin: name)
      #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
      #expect(outcome.summary == "remapped \((4 << 20) / 2) bytes, 0 wrong pages", h.diagnostics(outcome.stdout))

    case .killedMidFault:
      try killedMidFault(h, first: plugin, language: language)

    case .swapStore:
      // Behaviour zero: only the bytes the plugin stored can give the pages their pattern back.
      let outcome = try h.runClient("swap-once", mib: 2, threads: 1, plugin: name, extraEnvironment: behaviour("zero"))
      #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
      #expect(outcome.summary == "swap-out dropped \(pages(mib: 2)), kept 0; verified \(pages(mib: 2)) pages, 0 wrong", h.diagnostics(outcome.stdout))
      #expect(try h.status().plugin(name)?.swapStoredBytes == UInt64(2 << 20), h.diagnostics)

    case .swapSurvivesKill:
      let gate = try Gate(in: h.directory)
      let client = try h.startClient("swap-hold", mib: 2, threads: 1, plugin: name, extraEnvironment: behaviour("zero").merging(gate.environment) { $1 })
      let step = gate.awaitClient()
      #expect(step == "swapped \(pages(mib: 2))", h.diagnostics("client: \(String(describing: step)) \(client.stdout) \(client.stderr)"))
      kill(plugin.pid, SIGKILL)
      #expect(plugin.wait(timeout: 5) == .signaled(SIGKILL), h.diagnostics)
      #expect(h.waitForStatus { $0.plugin(name)?.connectedPID != plugin.pid }, h.diagnostics)
      let restarted = try language.startPlugin(h, name: name)
      gate.release()
      #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr + "\nplugin: " + restarted.stderr))
      #expect(client.stdout.hasSuffix("swap held: dropped \(pages(mib: 2)); verified \(pages(mib: 2)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
      #expect(try h.status().tally[.swappedPagesLost] == 0, h.diagnostics)

    case .invalidDecision, .oversizedDecision:
      // 8 pages between two guard regions of the same plugin: a decision let
      // through would write into a guard. 8 refusals stay under the 16 that disconnect.
      let argument = self == .invalidDecision ? "invalid" : "oversized"
      let outcome = try h.runClient("guarded", mib: 0, threads: 1, plugin: name, loops: 8, extraEnvironment: behaviour(argument))
      #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
      #expect(outcome.summary == "verified 8 pages, 0 wrong, 0 guard pages written", h.diagnostics(outcome.stdout))
      let status = try h.status()
      #expect(status.plugin(name)?.invalidDecisions == 8 && status.tally[.decisionRefused, "badRange"] == 8, h.diagnostics("\(status.tally)"))
      // Each refusal reached the plugin through its SDK (DecisionRefused).
      #expect(waitUntil(timeout: 5) { plugin.stderr.split(separator: "\n").filter { $0 == "refused badRange" }.count == 8 }, h.diagnostics(plugin.stderr))

    case .nameTaken:
      let second = try language.startPlugin(h, name: name, waitForConnection: false)
      #expect(second.wait(timeout: 15) == .exited(1), h.diagnostics(second.stderr))
      #expect(second.stderr.contains("plugin \"\(name)\" is already connected (code \(BrokerError.Code.nameTaken.rawValue))"), h.diagnostics(second.stderr))
      #expect(try h.status().plugin(name)?.connectedPID == plugin.pid, h.diagnostics)

    case .notAuthorized, .oversizedPacket, .wrongVersion:
      preconditionFailure("not run against a connected plugin")
    }
  }

  /// Rounds of a plugin the broker refuses by uid: each says why (whether its Hello's send met the shut connection or not).
  private func runNotAuthorized(_ language: ConformanceLanguage) throws {
    try Harness.run("conf-\(language.rawValue)-\(rawValue)", configFields: ["\"pluginUIDs\": [4242]"]) { h in
      for round in 0..<5 {
        let plugin = try language.startPlugin(h, name: Self.name, waitForConnection: false)
        #expect(plugin.wait(timeout: 15) == .exited(1), h.diagnostics("round \(round): \(plugin.stderr)"))
        #expect(plugin.stderr.contains("may not serve as a plugin of this broker (code \(BrokerError.Code.notAuthorized.rawValue))"),
                h.diagnostics("round \(round): \(plugin.stderr)"))
      }
      #expect(try h.status().tally[.pluginRefused, "notAuthorized"] == 5, h.diagnostics)
    }
  }

  /// The client ended well and checked every byte of `pages` pages.
  private func expectExact(_ h: Harness, _ outcome: Harness.ClientOutcome, pages: Int, plugin: FixtureProcess) {
    #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
    #expect(outcome.summary == "verified \(pages) pages, 0 wrong", h.diagnostics(outcome.stdout))
  }

  /// Each incarnation of the plugin kills itself at its 101st fault; the test
  /// starts the next once the broker has seen the last one go, until the
  /// client has all 512 pages.
  private func killedMidFault(_ h: Harness, first: FixtureProcess, language: ConformanceLanguage) throws {
    let client = try h.startClient("touch", mib: 2, threads: 2, plugin: Self.name, extraEnvironment: behaviour("die=100"))
    var plugin = first
    var kills = 0
    let deadline = now() + 60
    while client.isRunning && now() < deadline {
      FixtureProcess.waitForAnyExit([client, plugin], timeout: 1)
      guard !plugin.isRunning else { continue }
      #expect(plugin.poll() == .signaled(SIGKILL), h.diagnostics("the plugin ended otherwise: \(plugin.stderr)"))
      kills += 1
      let dead = plugin.pid
      #expect(h.waitForStatus { $0.plugin(Self.name)?.connectedPID != dead }, h.diagnostics)
      plugin = try language.startPlugin(h, name: Self.name, waitForConnection: false)
    }
    #expect(client.wait(timeout: 5) == .exited(0), h.diagnostics(client.stdout + client.stderr))
    #expect(client.stdout.hasSuffix("verified \(pages(mib: 2)) pages, 0 wrong\n"), h.diagnostics(client.stdout))
    #expect(kills >= 2, h.diagnostics("\(kills) kills"))
    // The last incarnation is connected (the check in `run`).
    #expect(h.waitForStatus { $0.plugin(Self.name)?.connectedPID == plugin.pid }, h.diagnostics(plugin.stderr))
  }

  /// Runs a wire scenario: a hand-driven plugin connection.
  func runOnWire() throws {
    precondition(isWireScenario, "\(self) runs against an SDK")
    try Harness.run("conf-wire-\(rawValue)") { h in
      switch self {
      case .oversizedPacket:
        let plugin = try ManualPlugin(socketPath: h.pluginSocket, name: Self.name)
        try plugin.sendRaw(garbageBytes(count: PacketSocket.maxPacketSize + 4096))
        let dropped = try BrokerIntegrationTests.Isolation.dropped(plugin.socket)
        #expect(dropped.closed && dropped.error?.code == .tooLarge, h.diagnostics("\(String(describing: dropped.error))"))
        #expect(h.waitForStatus { $0.plugin(Self.name)?.tally[.pluginDisconnected, "tooLarge"] == 1 }, h.diagnostics)
      case .wrongVersion:
        let socket = try PacketSocket.connect(path: h.pluginSocket)
        let encoder = DecisionBatchEncoder()
        encoder.setHello(Hello(role: .plugin, name: Self.name, version: 1))
        let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
        defer { packet.deallocate() }
        let count = encoder.encode(into: packet)
        _ = try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<count]))
        let dropped = try BrokerIntegrationTests.Isolation.dropped(socket)
        #expect(dropped.closed && dropped.error?.code == .version && dropped.error?.message.contains("version 1") == true,
                h.diagnostics("\(String(describing: dropped.error))"))
        #expect(h.waitForStatus { $0.tally[.pluginDisconnected, "version"] == 1 }, h.diagnostics)
      default:
        preconditionFailure("an SDK scenario")
      }
      // Nothing of the refused connection is left under the name (the teardown checks the broker lives on).
      #expect(try h.status().plugin(Self.name)?.connectedPID ?? 0 == 0, h.diagnostics)
    }
  }
}
