import Glibc
import Testing

/// An SDK whose conformance plugin (Tests/Fixtures/conformance-plugins) the
/// suite runs, every SDK scenario: how to start it.
enum ConformanceLanguage: String, CaseIterable, Sendable, CustomTestStringConvertible {
  case swift, c, python

  var testDescription: String { rawValue }

  /// What building the C plugin needs: the C sample's toolchain and pkg-config.
  static let cToolchainPresent = BrokerIntegrationTests.CPlugin.toolchainPresent && access("/usr/bin/pkg-config", X_OK) == 0

  static let sources = BrokerIntegrationTests.CPlugin.repository + "/Tests/Fixtures/conformance-plugins"

  /// The C plugin, built once per test run beside the test bundle (never in the
  /// source tree): `make` installs sdk/c into the build directory and compiles
  /// the plugin with `pkg-config --cflags --libs uffd-plugin`, as a user of the SDK would.
  static let cExecutable: Result<String, any Error> = Result {
    let build = Harness.binDirectory + "/conformance-c"
    guard mkdir(build, 0o755) == 0 || errno == EEXIST else { throw HarnessError("cannot create \(build): \(errno)") }
    try BrokerIntegrationTests.CPlugin.runMake(sources + "/c", build: build, logs: build)
    return build + "/conformance-plugin"
  }

  /// Starts the conformance plugin as `name` and, unless told not to, waits until it is connected.
  func startPlugin(_ h: Harness, name: String, waitForConnection: Bool = true) throws -> FixtureProcess {
    switch self {
    case .swift:
      return try h.startPluginProcess(name: name, executable: Harness.binDirectory + "/conformance-plugin", arguments: [name], waitForConnection: waitForConnection)
    case .c:
      return try h.startPluginProcess(name: name, executable: Self.cExecutable.get(), arguments: [name], waitForConnection: waitForConnection)
    case .python:
      let python = try #require(BrokerIntegrationTests.PythonPlugin.python, Comment(rawValue: BrokerIntegrationTests.PythonPlugin.missing))
      return try h.startPluginProcess(
        name: name, executable: python, arguments: [Self.sources + "/python/conformance_plugin.py", name],
        extraEnvironment: ["PYTHONPATH": BrokerIntegrationTests.PythonPlugin.sdk, "PYTHONDONTWRITEBYTECODE": "1"], waitForConnection: waitForConnection)
    }
  }
}
