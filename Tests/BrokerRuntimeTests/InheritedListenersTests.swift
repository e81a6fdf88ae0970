import BrokerProtocol
import Testing
@testable import BrokerRuntime

/// Which socket handed over by systemd is which: by name, else by path; the refusals.
@Suite("Inherited listeners")
struct InheritedListenersTests {
  typealias Candidate = InheritedListeners.Candidate
  let configured: [InheritedListeners.Role: String] = [.client: "/run/b/client.sock", .plugin: "/run/b/plugin.sock", .control: "/run/b/control.sock"]

  func refusal(_ candidates: [Candidate]) -> String? {
    do {
      _ = try InheritedListeners.assign(candidates, configured: configured)
      return nil
    } catch {
      return error.message
    }
  }

  @Test("named descriptors take their role whatever their path; unnamed ones are placed by path; no descriptors, no roles")
  func assignment() throws {
    let named = [Candidate(fd: 3, name: "plugin", path: "/elsewhere/p.sock", isPacketListener: true),
                 Candidate(fd: 4, name: "client", path: "/elsewhere/c.sock", isPacketListener: true)]
    let roles = try InheritedListeners.assign(named, configured: configured)
    #expect(roles[.client]?.fd == 4 && roles[.plugin]?.fd == 3 && roles[.control] == nil)
    let byPath = [Candidate(fd: 3, name: "uffd-broker.socket", path: "/run/b/client.sock", isPacketListener: true),
                  Candidate(fd: 4, name: "unknown", path: "/run/b/plugin.sock", isPacketListener: true),
                  Candidate(fd: 5, name: "control", path: "/run/b/control.sock", isPacketListener: true)]
    let placed = try InheritedListeners.assign(byPath, configured: configured)
    #expect(placed.mapValues(\.fd) == [.client: 3, .plugin: 4, .control: 5])
    #expect(try InheritedListeners.assign([], configured: configured).isEmpty)
  }

  @Test("refused: the wrong kind of socket, no path, unknown, a name against a path, two for one role, a missing client or plugin socket")
  func refusals() {
    let client = Candidate(fd: 3, name: "client", path: "/run/b/client.sock", isPacketListener: true)
    let plugin = Candidate(fd: 4, name: "plugin", path: "/run/b/plugin.sock", isPacketListener: true)
    let cases: [([Candidate], String)] = [
      ([client, Candidate(fd: 4, name: "plugin", path: "/run/b/plugin.sock", isPacketListener: false)], "descriptor 4 (name \"plugin\", bound at /run/b/plugin.sock), handed over by the service manager, is not a listening AF_UNIX SOCK_SEQPACKET socket"),
      ([client, Candidate(fd: 4, name: "plugin", path: nil, isPacketListener: true)], "is not bound to a filesystem path"),
      ([client, plugin, Candidate(fd: 5, name: "extra", path: "/run/b/other.sock", isPacketListener: true)], "descriptor 5 (name \"extra\", bound at /run/b/other.sock), handed over by the service manager, is none of the broker's sockets"),
      ([client, Candidate(fd: 4, name: "client", path: "/run/b/plugin.sock", isPacketListener: true)], "is named client but bound at the plugin socket's configured path"),
      ([client, plugin, Candidate(fd: 5, name: "client", path: "/run/b/c2.sock", isPacketListener: true)], "two client sockets, descriptors 3 and 5"),
      ([client], "handed over no plugin socket"),
      ([plugin], "handed over no client socket"),
    ]
    for (candidates, expected) in cases {
      let message = refusal(candidates)
      #expect(message?.contains(expected) == true, "\(candidates.map(\.fd)): \(message ?? "accepted")")
      #expect(message?.contains("refusing to start") == true)
    }
  }
}
