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

    @Test("C SDK", .enabled(if: ConformanceLanguage.cToolchainPresent, ConformanceLanguage.cMissing),
          arguments: ConformanceScenario.sdkScenarios)
    func cSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.c)
    }

    @Test("Python SDK", .enabled(if: PythonPlugin.python != nil, Comment(rawValue: PythonPlugin.missing)), arguments: ConformanceScenario.sdkScenarios)
    func pythonSDK(_ scenario: ConformanceScenario) throws {
      try scenario.run(.python)
    }

    @Test("every SDK on 2 MiB huge pages (scenario hugePages)", .enabled(if: HugePagePool.available, "needs /proc/sys/vm/nr_hugepages to be raisable (root, hugetlb) to map 2 MiB pages"),
          arguments: ConformanceLanguage.allCases)
    func hugePages(_ language: ConformanceLanguage) throws {
      if let missing = language.missing { try Test.cancel(missing) }
      try ConformanceScenario.hugePages.run(language)
    }

    @Test("any language, on a raw socket (no SDK sends these)", arguments: ConformanceScenario.wireScenarios)
    func wire(_ scenario: ConformanceScenario) throws {
      try scenario.runOnWire()
    }
  }
}
