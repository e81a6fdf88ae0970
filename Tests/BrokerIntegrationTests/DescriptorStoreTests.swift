import BrokerProtocol
import CLinux
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// The broker's descriptor store for plugins (FDSTORE-like): what is kept
  /// comes back on the next connection of the name, and no more is kept than
  /// the broker's Hello packet can carry back.
  @Suite("Descriptor store")
  struct DescriptorStores {
    /// Connects as plugin `name`, says Hello, and returns the socket with the broker's answer: kept names and descriptors, or its error.
    static func connect(_ h: Harness, name: String, keeping keep: [CInt] = []) throws -> (socket: PacketSocket, kept: [String], fds: [CInt], error: BrokerError?) {
      let socket = try PacketSocket.connect(path: h.pluginSocket)
      let encoder = DecisionBatchEncoder()
      encoder.setHello(Hello(role: .plugin, name: name))
      let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
      defer { packet.deallocate() }
      _ = try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<encoder.encode(into: packet)]))
      socket.setReceiveTimeout(milliseconds: 5000)
      var fds: [CInt] = []
      guard case .packet(let count) = try socket.receive(into: packet, fds: &fds, blocking: true) else { throw HarnessError("no Hello from the broker") }
      let decoder = EventBatchDecoder()
      try decoder.decode(UnsafeRawBufferPointer(rebasing: packet[..<count]))
      if !keep.isEmpty {
        for (index, fd) in keep.enumerated() { encoder.keep(fd, as: "kept-\(index)") }
        let length = encoder.encode(into: packet)
        _ = try encoder.descriptors.withUnsafeBufferPointer { try socket.send(UnsafeRawBufferPointer(rebasing: packet[..<length]), fds: $0) }
      }
      return (socket, try decoder.keptNames, fds, decoder.error)
    }

    static func memfds(_ count: Int) -> [CInt] { (0..<count).map { clinux_memfd("kept-\($0)") } }

    @Test("eight descriptors kept come back to the next connection of the name; a ninth is refused (the broker's Hello carries at most eight)")
    func eightAtMost() throws {
      try Harness.run("fdstore") { h in
        let eight = Self.memfds(8)
        defer { eight.forEach { close($0) } }
        let first = try Self.connect(h, name: "keeper", keeping: eight)
        #expect(first.error == nil)
        #expect(h.waitForStatus { $0.plugin("keeper")?.packetsApplied == 2 }, h.diagnostics)
        _ = shutdown(first.socket.fd, CInt(SHUT_RDWR))
        #expect(h.waitForStatus { $0.plugin("keeper")?.connectedPID == 0 }, h.diagnostics)
        let second = try Self.connect(h, name: "keeper")
        defer { second.fds.forEach { close($0) } }
        #expect(second.error == nil && second.kept == (0..<8).map { "kept-\($0)" } && second.fds.count == 8, h.diagnostics("\(second.kept), \(second.fds.count) descriptors"))

        // A ninth name is refused, and the plugin told why.
        let ninth = Self.memfds(1)
        defer { ninth.forEach { close($0) } }
        let encoder = DecisionBatchEncoder()
        encoder.keep(ninth[0], as: "kept-8")
        let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: PacketSocket.maxPacketSize, alignment: 16)
        defer { packet.deallocate() }
        let length = encoder.encode(into: packet)
        _ = try encoder.descriptors.withUnsafeBufferPointer { try second.socket.send(UnsafeRawBufferPointer(rebasing: packet[..<length]), fds: $0) }
        let dropped = try Isolation.dropped(second.socket)
        #expect(dropped.closed && dropped.error?.code == .limit, h.diagnostics("\(String(describing: dropped.error))"))
      }
    }
  }
}
