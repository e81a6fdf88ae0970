import Glibc
import Testing

extension BrokerIntegrationTests {
  /// The C plugin SDK (`sdk/c`) and its sample, `Examples/c-pattern-plugin`, built with
  /// `make` and served through the real broker (issue 13).
  @Suite("C plugin")
  struct CPlugin {
    /// The repository's root, from this file's place in it.
    static let repository: String = {
      var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
      parts.removeLast(3)  // Tests/BrokerIntegrationTests/CPluginTests.swift
      return parts.joined(separator: "/")
    }()

    static let make = "/usr/bin/make"

    /// A C compiler, make and libprotobuf-c's header: what building the SDK needs.
    static let toolchainPresent: Bool = {
      let compilers: [String] = ["/usr/bin/cc", "/usr/local/bin/cc"]
      let compiler = compilers.contains { (path: String) in access(path, X_OK) == 0 }
      return compiler && access(make, X_OK) == 0 && access("/usr/include/protobuf-c/protobuf-c.h", R_OK) == 0
    }()

    /// The warnings a C plugin of this repository must build without.
    static let strictFlags = "-O2 -g -Wall -Wextra -Werror"

    /// Runs `executable arguments...` to its end, its output in `logs`; throws with its stderr unless it exits 0.
    static func runTool(logs: String, _ label: String, _ executable: String, _ arguments: [String]) throws {
      let process = try FixtureProcess(
        label: label, executable: executable, arguments: arguments, environment: ["PATH": "/usr/local/bin:/usr/bin:/bin"],
        stdoutPath: logs + "/\(label).stdout", stderrPath: logs + "/\(label).stderr")
      let status = process.wait(timeout: 120)
      guard status == .exited(0) else { throw HarnessError("\(label) failed (\(String(describing: status))): \(process.stderr)") }
    }

    static func runTool(_ h: Harness, _ label: String, _ executable: String, _ arguments: [String]) throws {
      try runTool(logs: h.directory, label, executable, arguments)
    }

    /// Builds the sample into the harness's directory (never into the source tree); returns the executable.
    static func buildSample(_ h: Harness) throws -> String {
      let build = h.directory + "/c-build"
      try runTool(h, "make", make, ["-s", "-C", repository + "/Examples/c-pattern-plugin", "BUILD=" + build, "CFLAGS=" + strictFlags])
      return build + "/pattern"
    }

    /// `make -C directory BUILD=build` (the repository's C Makefiles' convention); its output goes to `logs`.
    static func runMake(_ directory: String, build: String, logs: String) throws {
      try runTool(logs: logs, "make", make, ["-s", "-C", directory, "BUILD=" + build])
    }

    /// Builds the SDK and the test plugin `Tests/Fixtures/c-plugins/NAME.c` against it, warnings as
    /// errors, into the harness's directory; returns the executable.
    static func buildTestPlugin(_ h: Harness, _ name: String) throws -> String {
      let sdk = h.directory + "/c-build/sdk"
      try runTool(h, "make-sdk", make, ["-s", "-C", repository + "/sdk/c", "BUILD=" + sdk, "CFLAGS=" + strictFlags])
      let executable = h.directory + "/c-build/" + name
      try runTool(h, "cc-" + name, "/bin/sh", ["-c", "cc \(strictFlags) -I'\(repository)/sdk/c/include' -o '\(executable)' "
        + "'\(repository)/Tests/Fixtures/c-plugins/\(name).c' '\(sdk)/libuffdplugin.a' -lprotobuf-c -lpthread"])
      return executable
    }

    @Test("the C sample plugin serves a client's memory exactly, from several threads",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func patternExact() throws {
      try Harness.run("c-pattern") { h in
        let plugin = try Self.buildSample(h)
        _ = try h.startPluginProcess(name: "c-pattern", executable: plugin, arguments: ["c-pattern"], waitForConnection: true)
        let outcome = try h.runClient("touch", mib: 16, threads: 4, plugin: "c-pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 16)) pages, 0 wrong", h.diagnostics)
        #expect(try h.status().plugin("c-pattern")?.invalidDecisions == 0, h.diagnostics)
      }
    }

    @Test("the C sample plugin prefetching aligned 16-page blocks: every byte exact",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func patternPrefetch() throws {
      try Harness.run("c-prefetch") { h in
        let plugin = try Self.buildSample(h)
        _ = try h.startPluginProcess(name: "c-prefetch", executable: plugin, arguments: ["c-prefetch", "16"], waitForConnection: true)
        let outcome = try h.runClient("touch", mib: 8, threads: 3, plugin: "c-prefetch", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics)
      }
    }

    @Test("a C swap plugin: swap-out and swap-in round trips are exact, and writes during 20 swap-outs are never lost",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func swapRoundTrips() throws {
      try Harness.run("c-swap") { h in
        let executable = try Self.buildTestPlugin(h, "swap")
        let plugin = try h.startPluginProcess(name: "c-swap", executable: executable, arguments: ["c-swap"], waitForConnection: true)
        let outcome = try h.runClient("swap", mib: 4, threads: 1, plugin: "c-swap", loops: 20, timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary.hasPrefix("swap loops 20, pages dropped ") && outcome.summary.hasSuffix(", 0 wrong"), h.diagnostics(outcome.stdout))
        let status = try h.status()
        #expect(status.faults.swapStoredBytes > 0 && status.faults.swappedOutBytes > 0, h.diagnostics)
        #expect(status.plugin("c-swap")?.invalidDecisions == 0, h.diagnostics)
        #expect(plugin.isRunning, h.diagnostics(plugin.stderr))
      }
    }

    @Test("a C swap plugin killed (-9) after a swap-out: its restart takes its pages back from the broker's descriptor store, every one exact",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func swapPluginKilled() throws {
      try Harness.run("c-swap-kill") { h in
        let executable = try Self.buildTestPlugin(h, "swap")
        let plugin = try h.startPluginProcess(name: "c-swap", executable: executable, arguments: ["c-swap"], waitForConnection: true)
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("swap-hold", mib: 4, threads: 1, plugin: "c-swap", extraEnvironment: gate.environment)
        let step = gate.awaitClient()
        #expect(step == "swapped 1024", h.diagnostics("client: \(String(describing: step)) \(client.stdout) \(client.stderr)"))
        kill(plugin.pid, SIGKILL)
        _ = plugin.wait(timeout: 5)
        let restarted = try h.startPluginProcess(name: "c-swap", executable: executable, arguments: ["c-swap"], waitForConnection: true)
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr))
        #expect(client.stdout.hasSuffix("swap held: dropped 1024; verified 1024 pages, 0 wrong\n"), h.diagnostics(client.stdout))
        #expect(restarted.stderr.contains("swap: recovered 1024 stored pages"), h.diagnostics(restarted.stderr))
        // The restart said it holds every swapped-out page (holds), so none was lost.
        #expect(try h.status().tally[.swappedPagesLost] == 0, h.diagnostics)
      }
    }

    @Test("a C plugin delegating a file, half of it revoked: the broker serves the delegated half itself, the plugin the other, every byte exact",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func fileDelegation() throws {
      try Harness.run("c-delegate-file") { h in
        let executable = try Self.buildTestPlugin(h, "delegate")
        _ = try h.startPluginProcess(name: "c-delegate", executable: executable, arguments: ["c-delegate", "file"], waitForConnection: true)
        let path = try SamplePlugins.writeSnapshot(h, size: 1 << 20)
        let outcome = try h.runClient("snapshot", mib: 1, threads: 2, plugin: "c-delegate", extraEnvironment: ["FIXTURE_FILE": path])
        // The plugin poisons any fault of the delegated half: a wrong split would kill the client.
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified 256 pages of \(1 << 20) bytes, 0 wrong", h.diagnostics)
        let status = try h.status()
        #expect(status.faults.resolvedLocally > 0, h.diagnostics)
        #expect(status.plugin("c-delegate")?.faultsSent == 128 && status.plugin("c-delegate")?.invalidDecisions == 0, h.diagnostics)
      }
    }

    @Test("a C plugin delegating zero pages: the broker serves every fault itself, the plugin none",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func zeroDelegation() throws {
      try Harness.run("c-delegate-zero") { h in
        let executable = try Self.buildTestPlugin(h, "delegate")
        _ = try h.startPluginProcess(name: "c-zero", executable: executable, arguments: ["c-zero", "zero"], waitForConnection: true)
        let outcome = try h.runClient("zero", mib: 2, threads: 2, plugin: "c-zero")
        #expect(outcome.status == .exited(0) && outcome.summary == "verified \(pages(mib: 2)) pages, 0 wrong", h.diagnostics(outcome.stdout + outcome.stderr))
        let status = try h.status()
        #expect(status.faults.resolvedLocally >= pages(mib: 2) && status.plugin("c-zero")?.faultsSent == 0, h.diagnostics)
      }
    }

    @Test("a C plugin answering every fault later, from 3 threads, newest first, some with prefetches: every byte exact",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func laterAnswers() throws {
      try Harness.run("c-later") { h in
        let executable = try Self.buildTestPlugin(h, "later")
        let stats = h.directory + "/later.stats"
        _ = try h.startPluginProcess(name: "c-later", executable: executable, arguments: ["c-later", stats], waitForConnection: true)
        let outcome = try h.runClient("touch", mib: 16, threads: 4, plugin: "c-later", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 16)) pages, 0 wrong", h.diagnostics)
        #expect(try h.status().plugin("c-later")?.invalidDecisions == 0, h.diagnostics)
        // The answers did come out of order (the plugin counts those it gave before an older fault's).
        #expect(waitUntil(timeout: 5) { (SamplePlugins.statistics(stats)["reordered"] ?? 0) > 0 }, h.diagnostics("stats: \(readTextFile(stats))"))
      }
    }

    @Test("a C plugin answering only after the client is gone: the late answers are dropped harmlessly, and the next client is served exactly",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func laterAnswersAfterClose() throws {
      try Harness.run("c-later-gone") { h in
        let executable = try Self.buildTestPlugin(h, "later")
        let stats = h.directory + "/later.stats"
        let plugin = try h.startPluginProcess(name: "c-later", executable: executable, arguments: ["c-later", stats, "hold"], waitForConnection: true)
        let first = try h.runClient("exit-midway", mib: 1, threads: 4, plugin: "c-later")
        #expect(first.status == .exited(0), h.diagnostics(first.stdout + first.stderr))
        // The four faults were answered once the client had gone (and its regions with it).
        #expect(waitUntil(timeout: 5) { SamplePlugins.statistics(stats)["answered"] == 4 }, h.diagnostics("stats: \(readTextFile(stats))"))
        let second = try h.runClient("touch", mib: 4, threads: 2, plugin: "c-later")
        #expect(second.status == .exited(0) && second.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(second.stdout + second.stderr))
        #expect(plugin.isRunning && plugin.stderr.isEmpty, h.diagnostics(plugin.stderr))
        #expect(try h.status().plugin("c-later")?.invalidDecisions == 0, h.diagnostics)
      }
    }

    @Test("the C plugin serves its pattern, not zeros: a client expecting zeros sees every page differ",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func patternIsNotZeros() throws {
      try Harness.run("c-not-zero") { h in
        let plugin = try Self.buildSample(h)
        _ = try h.startPluginProcess(name: "c-pattern", executable: plugin, arguments: ["c-pattern"], waitForConnection: true)
        let outcome = try h.runClient("zero", mib: 1, threads: 2, plugin: "c-pattern", timeout: 30)
        #expect(outcome.summary == "verified \(pages(mib: 1)) pages, \(pages(mib: 1)) wrong", h.diagnostics(outcome.stdout))
      }
    }

    @Test("a C plugin refused before its Hello (the send fails with EPIPE) reports the broker's Error, code and message, not the broken pipe",
          .enabled(if: toolchainPresent, "needs cc, make and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"))
    func refusedBeforeHello() throws {
      try Harness.run("c-refused") { h in
        let executable = try Self.buildTestPlugin(h, "refused")
        let process = try FixtureProcess(label: "refused", executable: executable, arguments: [], environment: [:],
                                         stdoutPath: h.directory + "/refused.stdout", stderrPath: h.directory + "/refused.stderr")
        #expect(process.wait(timeout: 10) == .exited(0), h.diagnostics(process.stdout + process.stderr))
        #expect(process.stdout == "probe: EPIPE\nerrno \(ECONNABORTED): the broker refused: uid 4242 may not serve as a plugin of this broker (code 3)\n",
                h.diagnostics(process.stdout + process.stderr))
      }
    }
  }
}
