import BrokerProtocol
import CLinux
import FoundationEssentials
import Glibc
import LinuxSupport

/// The control socket (`ControlChannel`): its owner and root ask, the broker answers and closes.
extension BrokerRuntime {
  func acceptControl() {
    guard let listener = controlListener else { return }
    while let socket = accept(from: listener, role: "control", refusal: refuseControl) {
      guard let peer = try? socket.peerCredentials() else { continue }
      guard peer.uid == 0 || peer.uid == getuid() else {
        refuseControl(socket, BrokerError(.notAuthorized, "uid \(peer.uid) may not use the control socket"))
        continue
      }
      guard controls.count < ControlLink.maxConnections else {
        refuseControl(socket, BrokerError(.limit, "\(ControlLink.maxConnections) control connections are open already"))
        continue
      }
      let link = ControlLink(id: nextControl, socket: socket, openedAt: loopTime)
      nextControl += 1
      guard (try? loop.add(socket.fd, Token(.control, link.id))) != nil else { continue }
      controls[link.id] = link
    }
  }

  func serveControl(_ link: ControlLink) {
    if link.reply == nil {
      var fds: [CInt] = []
      let result = try? link.socket.receive(into: packet, fds: &fds)
      fds.forEach(closeDescriptor)
      switch result {
      case .packet(let count)?:
        let command = String(decoding: UnsafeRawBufferPointer(rebasing: packet[..<count]), as: UTF8.self)
        link.reply = replyPackets(answering(command))
      case .wouldBlock?: return
      case .closed?, nil: return closeControl(link)
      }
    }
    while let first = link.reply?.first {
      let sent = first.withUnsafeBytes { try? link.socket.send($0) }
      if sent == .wouldBlock { return loop.modify(link.socket.fd, Token(.control, link.id), events: clinux_epollout) }
      if sent == nil { break }
      link.reply?.removeFirst()
    }
    closeControl(link)
  }

  /// Closes control connections open longer than `ControlLink.timeout` (on the housekeeping tick).
  func expireControls() {
    for link in controls.values where loopTime - link.openedAt > ControlLink.timeout { closeControl(link) }
  }

  func closeControl(_ link: ControlLink) {
    loop.remove(link.socket.fd)
    finish(link.socket, shutdownFirst: false)
    controls[link.id] = nil
  }

  /// The status as the engine, the supervisor and the runtime know it.
  func status() -> BrokerStatus {
    var status = engine.status()
    status.pid = getpid()
    status.uptimeSeconds = Double(loopTime - startedAt) / 1e9
    status.tally = status.tally + tally
    supervisor?.annotate(&status)
    status.descriptors = Self.openDescriptors()
    var limit = rlimit()
    if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 { status.descriptorLimit = Int(clamping: limit.rlim_cur) }
    status.metricsListen = publisher?.listenAddress
    for index in status.plugins.indices {
      status.plugins[index].packetsApplied = plugins[status.plugins[index].connection]?.packetsApplied ?? 0
    }
    return status
  }

  /// The entries of /proc/self/fd, less the one reading it (-1: unreadable).
  static func openDescriptors() -> Int {
    guard let directory = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(directory) }
    var count = -1
    while let entry = readdir(directory) {
      let dot = withUnsafeBytes(of: entry.pointee.d_name) { $0[0] == UInt8(ascii: ".") }
      if !dot { count += 1 }
    }
    return count
  }

  private func answering(_ command: String) -> [UInt8] {
    let encoder = JSONEncoder()
    encoder.outputFormatting = .sortedKeys
    switch command {
    case ControlChannel.statusCommand:
      if let json = try? encoder.encode(status()) { return Array(json) }
      return refusal(BrokerError(.internal, "the status could not be encoded"))
    default:
      if let vm = try? JSONDecoder().decode(VMSocketCommand.self, from: Data(command.utf8)), vm.command == "vmSocket" {
        let reply: VMSocketReply
        do { reply = try vmSocket(vm) } catch { return refusal(error) }
        if let json = try? encoder.encode(reply) { return Array(json) }
        return refusal(BrokerError(.internal, "the reply could not be encoded"))
      }
      return refusal(BrokerError(.malformed, "unknown command \"\(command.prefix(64))\" (known: \(ControlChannel.statusCommand), a vmSocket command as JSON)"))
    }
  }

  private func refusal(_ error: BrokerError) -> [UInt8] {
    (try? JSONEncoder().encode(ControlChannel.Refusal(error))).map(Array.init) ?? []
  }

  private func replyPackets(_ bytes: [UInt8]) -> PacketQueue {
    var queue = PacketQueue()
    bytes.withUnsafeBytes { raw in
      for start in stride(from: 0, to: raw.count, by: ControlChannel.replyPacketSize) {
        queue.append(UnsafeRawBufferPointer(rebasing: raw[start..<min(start + ControlChannel.replyPacketSize, raw.count)]))
      }
    }
    return queue
  }

  private func refuseControl(_ socket: PacketSocket, _ error: BrokerError) {
    report(.warning, "refused a control connection", .controlRefused, cause: error.code.name, ["reason": "\(error)"])
    _ = refusal(error).withUnsafeBytes { try? socket.send($0) }
    finish(socket)
  }
}
