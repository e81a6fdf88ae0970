import Testing

extension BrokerIntegrationTests {
  /// The conformance suite: every scenario of `ConformanceScenario` against the
  /// conformance plugin of each SDK (`swift test --filter Conformance`).
  @Suite("Conformance")
  struct Conformance {
    @Test("Swift SDK", arguments: ConformanceScenario.sdkScenarios)
    func swiftSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.swift)
    }

    @Test("C SDK", .enabled(if: ConformanceLanguage.cToolchainPresent, "needs cc, make, pkg-config and libprotobuf-c-dev (apt-get install libprotobuf-c-dev)"),
          arguments: ConformanceScenario.sdkScenarios)
    func cSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.c)
    }

    @Test("Python SDK", .enabled(if: PythonPlugin.python != nil, Comment(rawValue: PythonPlugin.missing)), arguments: ConformanceScenario.sdkScenarios)
    func pythonSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.python)
    }

    @Test("any language, on a raw socket (no SDK sends these)", arguments: ConformanceScenario.wireScenarios)
    func wire(_ scenario: ConformanceScenario) throws {
      try scenario.runOnWire()
    }
  }
}
