import BrokerProtocol
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Issue 14: the broker reloads its config on SIGHUP, or says why it will not.
  @Suite("Configuration reload")
  struct Reload {
    /// Whether a new client connection is refused for the per-uid limit.
    static func refusedForLimit(_ h: Harness) throws -> Bool {
      let client = try ManualClient(socketPath: h.clientSocket)
      let (reply, _) = try Isolation.dropped(client)
      if case .error(let error)? = reply?.body { return error.code == .limit }
      return false
    }

    @Test("SIGHUP reloads the config: a raised limit applies at once; a file the broker would not start with, or with other spawned plugins, is refused and the running one kept")
    func reloadOnSIGHUP() throws {
      try Harness.run("reload", configFields: ["\"maxClientsPerUID\": 1"]) { h in
        let config = h.directory + "/config.json"
        let first = try ManualClient(socketPath: h.clientSocket)
        try first.hello()
        #expect(try Self.refusedForLimit(h), h.diagnostics)

        try writeTextFile(config, #"{"maxClientsPerUID": 2}"#)
        kill(h.broker.pid, SIGHUP)
        #expect(h.waitForStatus { $0.tally[.configReloaded] == 1 }, h.diagnostics)
        let second = try ManualClient(socketPath: h.clientSocket)
        try second.hello()

        for (text, cause) in [(#"{"maxClientsPerUID": 0}"#, "malformed"), (#"{"maxClientsPerUID": 3, "plugins": [{"name": "x", "executable": "/bin/true"}]}"#, "malformed")] {
          let before = try h.status().tally[.configReloadRefused, cause]
          try writeTextFile(config, text)
          kill(h.broker.pid, SIGHUP)
          #expect(h.waitForStatus { $0.tally[.configReloadRefused, cause] == before + 1 }, h.diagnostics(text))
          // The running limit (2) still holds.
          #expect(try Self.refusedForLimit(h), h.diagnostics(text))
        }
        #expect(try h.status().tally[.configReloaded] == 1, h.diagnostics)
        _ = (first, second)
      }
    }
  }
}
