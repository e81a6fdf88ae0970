import BrokerProtocol
import Glibc
import PluginSDK

// conformance-plugin NAME: the conformance suite's plugin on the Swift SDK.
// The broker's socket: $UFFD_BROKER_PLUGIN_SOCKET (or the default path).
func fail(_ message: String, status: Int32) -> Never {
  let line = message + "\n"
  _ = line.withCString { write(2, $0, strlen($0)) }
  exit(status)
}

guard CommandLine.arguments.count == 2 else { fail("usage: conformance-plugin NAME", status: 2) }
do {
  try PluginRunner.run(ConformancePlugin(), name: CommandLine.arguments[1])
} catch let error as BrokerError {
  fail("conformance-plugin: \(error) (code \(error.code.rawValue))", status: 1)
} catch {
  fail("conformance-plugin: \(error)", status: 1)
}
