import BrokerProtocol
import Testing

/// Firecracker's handshake, as its VMMs send it (one JSON array of mappings).
@Suite("Firecracker handshake")
struct FirecrackerHandshakeTests {
  static let whole = Array("""
    [{"base_host_virt_addr": 140000000000000, "size": 8388608, "offset": 0, "page_size": 4096},
     {"base_host_virt_addr": 140000100000000, "size": 4096, "offset": 8388608, "page_size_kib": 4096}]
    """.utf8)

  @Test("two mappings become two regions of the socket's plugin, from their offsets; page_size_kib counts bytes")
  func regions() throws {
    let handshake = try #require(try FirecrackerHandshake.parse(Self.whole))
    let regions = handshake.regions(plugin: "snapshot", argument: "/srv/vm/mem")
    #expect(regions.map(\.id) == [1, 2])
    #expect(regions.map(\.base) == [140_000_000_000_000, 140_000_100_000_000])
    #expect(regions.map(\.length) == [8 << 20, 4096])
    #expect(regions.map(\.pageSize) == [4096, 4096])
    #expect(regions.map(\.backingOffset) == [0, 8 << 20])
    #expect(regions.allSatisfy { $0.plugin == "snapshot" && $0.argument == "/srv/vm/mem" })
  }

  @Test("a handshake read in pieces is whole only at its end")
  func pieces() throws {
    for cut in [1, 10, Self.whole.count / 2, Self.whole.count - 1] {
      #expect(try FirecrackerHandshake.parse(Self.whole[..<cut]) == nil, "cut at \(cut)")
    }
    #expect(try FirecrackerHandshake.parse(Self.whole + Array("\n".utf8)) != nil)
  }

  @Test("bytes that can never become a handshake are refused", arguments: [
    "this is not json", "{\"base_host_virt_addr\": 1}", "[]", "[1, 2]",
    "[{\"base_host_virt_addr\": 4096, \"size\": 4096, \"offset\": 0}]",  // no page size
    "[{\"base_host_virt_addr\": -1, \"size\": 4096, \"offset\": 0, \"page_size\": 4096}]",
  ])
  func refused(text: String) {
    #expect(throws: BrokerError.self) { try FirecrackerHandshake.parse(Array(text.utf8)) }
  }

  @Test("more mappings or bytes than any VMM sends are refused")
  func bounds() {
    let mapping = "{\"base_host_virt_addr\": 4096, \"size\": 4096, \"offset\": 0, \"page_size\": 4096}"
    let many = "[" + Array(repeating: mapping, count: FirecrackerHandshake.maxMappings + 1).joined(separator: ",") + "]"
    #expect(throws: BrokerError.self) { try FirecrackerHandshake.parse(Array(many.utf8)) }
    #expect(throws: BrokerError.self) { try FirecrackerHandshake.parse([UInt8](repeating: 0x5B, count: FirecrackerHandshake.maxBytes + 1)) }
  }
}
