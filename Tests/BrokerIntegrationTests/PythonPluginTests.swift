import ChildProcess
import Foundation
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// The Python SDK's sample plugin (sdk/python/examples/pattern_plugin.py), a
  /// real Python process against the real broker: the fixture client checks
  /// every byte it serves (issue 13).
  @Suite("Python plugin")
  struct PythonPlugin {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static var sdk: String { packageRoot + "/sdk/python" }

    /// A python3 that imports `google.protobuf`: `UFFD_IT_PYTHON`, else the
    /// first on PATH, else /usr/bin/python3 (Debian's python3-protobuf is
    /// installed for that one, which a python3 of pyenv's or a venv's earlier on PATH cannot see).
    static let python: String? = {
      let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
      let candidates = [ProcessInfo.processInfo.environment["UFFD_IT_PYTHON"]].compactMap { $0 }
        + path.split(separator: ":").map { "\($0)/python3" } + ["/usr/bin/python3"]
      return candidates.first { candidate in
        guard access(candidate, X_OK) == 0,
              let probe = try? ChildProcess(candidate, ["-c", "import google.protobuf"], options: .init(stdin: "/dev/null", stdout: "/dev/null", stderr: "/dev/null"))
        else { return false }
        return probe.wait(timeoutMilliseconds: 20_000) == .exited(0)
      }
    }()

    static let missing = "needs python3 with the protobuf module (Debian: python3-protobuf; PyPI: protobuf), or UFFD_IT_PYTHON naming one"

    /// Starts the sample plugin as `pattern` (with `arguments`) and waits until it is connected.
    @discardableResult
    static func startPattern(_ h: Harness, arguments: [String] = []) throws -> FixtureProcess {
      try startExample(h, "pattern_plugin.py", name: "pattern", arguments: arguments)
    }

    /// Starts `sdk/python/examples/SCRIPT NAME ARGUMENTS...` and waits until it is connected.
    @discardableResult
    static func startExample(_ h: Harness, _ script: String, name: String, arguments: [String] = []) throws -> FixtureProcess {
      let python = try #require(python, Comment(rawValue: missing))
      return try h.startPluginProcess(
        name: name, executable: python, arguments: [sdk + "/examples/" + script, name] + arguments,
        extraEnvironment: ["PYTHONPATH": sdk, "PYTHONDONTWRITEBYTECODE": "1"], waitForConnection: true)
    }

    @Test("pages through the shared memfd: every byte of 8 MiB exact, from two threads", .enabled(if: python != nil, Comment(rawValue: missing)))
    func sharedMemory() throws {
      try Harness.run("python-shared") { h in
        let plugin = try Self.startPattern(h)
        let outcome = try h.runClient("touch", mib: 8, threads: 2, plugin: "pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics(outcome.stdout))
        #expect(plugin.isRunning, h.diagnostics("the plugin exited: " + plugin.stderr))
      }
    }

    @Test("pages inline in the packets (answers split at 256 KiB): every byte of 8 MiB exact, from two threads",
          .enabled(if: python != nil, Comment(rawValue: missing)))
    func inline() throws {
      try Harness.run("python-inline") { h in
        let plugin = try Self.startPattern(h, arguments: ["--inline"])
        let outcome = try h.runClient("touch", mib: 8, threads: 2, plugin: "pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics(outcome.stdout))
        #expect(plugin.isRunning, h.diagnostics("the plugin exited: " + plugin.stderr))
      }
    }

    @Test("swap: what 20 swap-outs store in a Python plugin reads back exactly, and writes during them are never lost",
          .enabled(if: python != nil, Comment(rawValue: missing)))
    func swap() throws {
      try Harness.run("python-swap") { h in
        let stats = h.directory + "/swap.stats"
        let plugin = try Self.startExample(h, "swap_plugin.py", name: "swap", arguments: ["--stats", stats])
        let outcome = try h.runClient("swap", mib: 4, threads: 1, plugin: "swap", loops: 20, timeout: 60)
        // Exit 0: every page exact and some pages were dropped (so read back through the plugin).
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
        #expect(outcome.summary.hasPrefix("swap loops 20, pages dropped ") && outcome.summary.hasSuffix(", 0 wrong"), h.diagnostics(outcome.stdout))
        #expect(plugin.isRunning, h.diagnostics("the plugin exited: " + plugin.stderr))
        // The plugin stored pages and served them back (its stats file, rewritten when idle).
        #expect(waitUntil(timeout: 3) { (BrokerIntegrationTests.SamplePlugins.statistics(stats)["pages_restored"] ?? 0) > 0 },
                h.diagnostics("stats: \(BrokerIntegrationTests.SamplePlugins.statistics(stats))"))
      }
    }

    @Test("swap: the Python swap plugin killed (-9) after a swap-out: its restart finds every page in the broker's descriptor store",
          .enabled(if: python != nil, Comment(rawValue: missing)))
    func swapPluginKilled() throws {
      try Harness.run("python-swap-kill") { h in
        let plugin = try Self.startExample(h, "swap_plugin.py", name: "swap")
        let gate = try Gate(in: h.directory)
        let client = try h.startClient("swap-hold", mib: 4, threads: 1, plugin: "swap", extraEnvironment: gate.environment)
        let step = gate.awaitClient()
        #expect(step == "swapped 1024", h.diagnostics("client: \(String(describing: step)) \(client.stdout) \(client.stderr)"))
        kill(plugin.pid, SIGKILL)
        _ = plugin.wait(timeout: 5)
        let restarted = try Self.startExample(h, "swap_plugin.py", name: "swap")
        gate.release()
        #expect(client.wait(timeout: 30) == .exited(0), h.diagnostics(client.stdout + client.stderr + "\nplugin: " + restarted.stderr))
        #expect(client.stdout.hasSuffix("swap held: dropped 1024; verified 1024 pages, 0 wrong\n"), h.diagnostics(client.stdout))
        #expect(restarted.stderr.contains("recovered 1024 stored pages"), h.diagnostics(restarted.stderr))
        #expect(try h.status().tally[.swappedPagesLost] == 0, h.diagnostics)
      }
    }

    @Test("file delegation: the broker serves every byte of 4 MiB from the plugin's memfd (a fault reaching the plugin would be poisoned)",
          .enabled(if: python != nil, Comment(rawValue: missing)))
    func fileDelegation() throws {
      try Harness.run("python-delegate-file") { h in
        let plugin = try Self.startPattern(h, arguments: ["--delegate-file"])
        let outcome = try h.runClient("touch", mib: 4, threads: 2, plugin: "pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 4)) pages, 0 wrong", h.diagnostics(outcome.stdout))
        #expect(plugin.isRunning, h.diagnostics("the plugin exited: " + plugin.stderr))
      }
    }

    @Test("later: every fault answered later from a pool of 4 threads, in any order: every byte of 8 MiB exact, from two threads",
          .enabled(if: python != nil, Comment(rawValue: missing)))
    func later() throws {
      try Harness.run("python-later") { h in
        let plugin = try Self.startPattern(h, arguments: ["--later"])
        let outcome = try h.runClient("touch", mib: 8, threads: 2, plugin: "pattern", timeout: 60)
        #expect(outcome.status == .exited(0), h.diagnostics(outcome.stdout + outcome.stderr + "\nplugin: " + plugin.stderr))
        #expect(outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics(outcome.stdout))
        #expect(plugin.isRunning, h.diagnostics("the plugin exited: " + plugin.stderr))
      }
    }
  }
}
