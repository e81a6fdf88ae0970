import Glibc
import Testing

/// Real broker, plugin and client processes against real userfaultfds (DESIGN §3).
/// Every test starts its own `uffd-broker` through `Harness.run`; the whole
/// tree runs serialized (the machine is small and the tests measure processes).
@Suite("Broker integration", .serialized, .timeLimit(.minutes(3)))
struct BrokerIntegrationTests {}

let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

/// Pages in `mib` MiB.
func pages(mib: Int) -> Int { (mib << 20) / pageSize }

/// The client ids of the `opened CLIENT REGION` lines of a fixture plugin's event log.
func openedClients(_ events: [String]) -> [UInt64] {
  events.compactMap { line in
    let fields = line.split(separator: " ")
    return fields.count == 3 && fields[0] == "opened" ? UInt64(fields[1]) : nil
  }
}

/// A fixture decision line: `retry|invalid|served CLIENT OFFSET FAULT_ID`.
struct DecisionLine: Equatable {
  var what: String
  var client: UInt64
  var offset: UInt64
  var faultID: UInt64

  init?(_ line: String) {
    let fields = line.split(separator: " ")
    guard fields.count == 4, ["retry", "invalid", "served"].contains(fields[0]),
          let client = UInt64(fields[1]), let offset = UInt64(fields[2]), let faultID = UInt64(fields[3])
    else { return nil }
    what = String(fields[0])
    self.client = client
    self.offset = offset
    self.faultID = faultID
  }
}
