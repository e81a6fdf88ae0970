import Testing

extension BrokerIntegrationTests {
  /// The conformance suite: every scenario of `ConformanceScenario` against the
  /// conformance plugin of each SDK (`swift test --filter Conformance`).
  @Suite("Conformance")
  struct Conformance {
    @Test("Swift SDK", arguments: ConformanceLanguage.swift.scenarios)
    func swiftSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.swift)
    }

    @Test("C SDK", .enabled(if: ConformanceLanguage.cToolchainPresent, "needs cc, make, pkg-config and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"),
          arguments: ConformanceLanguage.c.scenarios)
    func cSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.c)
    }

    @Test("Python SDK", .enabled(if: PythonPlugin.python != nil, Comment(rawValue: PythonPlugin.missing)), arguments: ConformanceLanguage.python.scenarios)
    func pythonSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.python)
    }

    @Test("any language, on a raw socket (no SDK sends these)", arguments: ConformanceScenario.wireScenarios)
    func wire(_ scenario: ConformanceScenario) throws {
      try scenario.runOnWire()
    }

    /// The cases an SDK cannot run yet (`ConformanceLanguage.pending`), with why: listed, not run.
    static let pendingCases = ConformanceLanguage.allCases.flatMap { language in
      language.pending.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\(language.rawValue) \($0.key.rawValue): \($0.value)" }
    }

    @Test("pending: a feature the SDK lacks today", .disabled(Comment(rawValue: "not run yet: " + pendingCases.joined(separator: "; "))), arguments: pendingCases)
    func pending(_ testCase: String) {}
  }
}
