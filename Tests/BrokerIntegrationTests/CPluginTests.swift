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

    /// Builds the sample into the harness's directory (never into the source tree); returns the executable.
    static func buildSample(_ h: Harness) throws -> String {
      let build = h.directory + "/c-build"
      try runMake(repository + "/Examples/c-pattern-plugin", build: build, logs: h.directory)
      return build + "/pattern"
    }

    /// `make -C directory BUILD=build` (the repository's C Makefiles' convention); its output goes to `logs`.
    static func runMake(_ directory: String, build: String, logs: String) throws {
      let process = try FixtureProcess(
        label: "make", executable: make, arguments: ["-s", "-C", directory, "BUILD=" + build],
        environment: ["PATH": "/usr/local/bin:/usr/bin:/bin"], stdoutPath: logs + "/make.stdout", stderrPath: logs + "/make.stderr")
      let status = process.wait(timeout: 120)
      guard status == .exited(0) else { throw HarnessError("make failed (\(String(describing: status))): \(process.stderr)") }
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
  }
}
