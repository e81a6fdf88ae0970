import BrokerCore
import BrokerProtocol
import Glibc
import LinuxSupport
import SystemPackage
import Userfaultfd

/// Firecracker's page-fault handler protocol (`FirecrackerHandshake`): a VMM
/// connects to a Firecracker socket, sends its guest regions and userfaultfd,
/// and from then on is a client like any other, except that it reads nothing:
/// its regions are registered for it, and what the broker would tell it is
/// not sent. A VMM whose registration is refused cannot learn why, and its
/// guest would wait forever on its faults: it is killed (fail closed).
extension BrokerRuntime {
  /// At most this many sockets opened for one VM wait for their VMM at once.
  static let maxVMSockets = 256

  /// Watches a Firecracker-style listener.
  func listen(_ listener: FirecrackerListener) throws(BrokerError) {
    let id = nextFirecrackerListener
    nextFirecrackerListener += 1
    try loop.add(listener.listener.fd, Token(.firecrackerListener, id))
    firecrackerListeners[id] = listener
  }

  func acceptVMMs(listener id: UInt64) {
    guard let listener = firecrackerListeners[id] else { return }
    acceptAll(from: listener.listener, role: "vmm", refusal: { socket, _ in finish(socket) }) { socket, peer in
      guard firecrackerListeners[id] != nil, let pidfd = takePidfd(of: socket, peer: peer) else { return finish(socket) }
      admitClient(socket, pidfd: pidfd, engine.clientConnected(peer, isVMM: true, now: loopTime),
                  vmm: VMMHandshake(socket: listener.socket, pid: peer.pid))
      // A VM's own socket serves its one VMM: another process must not take its place.
      if listener.vmName != nil { closeVMSocket(id) }
    }
  }

  private func closeVMSocket(_ id: UInt64) {
    guard let listener = firecrackerListeners.removeValue(forKey: id) else { return }
    loop.remove(listener.listener.fd)  // its file goes with it (PacketListener's deinit)
  }

  /// The control socket's `VMSocketCommand`: a socket for one VM, beside the
  /// client socket, or the end of one no VMM used.
  func vmSocket(_ command: VMSocketCommand) throws(BrokerError) -> VMSocketReply {
    guard VMSocketCommand.isValidName(command.name) else {
      throw BrokerError(.malformed, "a VM's name is 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)")
    }
    let path = vmSocketPath(command.name)
    let existing = firecrackerListeners.first { $0.value.vmName == command.name }?.key
    switch command.action {
    case .close:
      guard let existing else { throw BrokerError(.malformed, "no socket of VM \"\(command.name)\" is waiting for its VMM") }
      closeVMSocket(existing)
    case .open:
      guard existing == nil else { throw BrokerError(.nameTaken, "VM \"\(command.name)\" has a socket already: \(path)") }
      guard firecrackerListeners.values.lazy.filter({ $0.vmName != nil }).count < Self.maxVMSockets else {
        throw BrokerError(.limit, "\(Self.maxVMSockets) VM sockets wait for their VMMs already")
      }
      guard let plugin = command.plugin else { throw BrokerError(.malformed, "opening a VM's socket needs the plugin that serves its memory") }
      var candidate = configuration
      candidate.firecrackerSockets = [.init(path: path, plugin: plugin, argument: command.argument ?? "")]
      try candidate.validate()
      let socket = candidate.firecrackerSockets[0]
      let mode: mode_t = Self.privateSockets(configuration).client ? 0o600 : 0o666
      try listen(FirecrackerListener(try PacketListener(path: path, mode: mode, stream: true), socket: socket, vmName: command.name))
      logger.info("VM socket opened", metadata: ["vm": "\(command.name)", "path": "\(path)", "plugin": "\(plugin)"])
    }
    return VMSocketReply(path: path)
  }

  /// `vm-NAME.sock` beside the client socket.
  private func vmSocketPath(_ name: String) -> String {
    let client = configuration.clientSocketPath
    let directory = client.lastIndex(of: "/").map { String(client[..<$0]) } ?? "."
    return directory + "/vm-" + name + ".sock"
  }

  /// Reads the VMM's handshake until it is whole, then registers its guest
  /// memory. After that the connection only tells when the VMM closes it;
  /// the VM still runs until its process exits (its pidfd says when), so
  /// its memory is served until then.
  func readVMM(_ link: ClientLink) {
    guard let socket = link.socket else { return }
    while clients[link.id] === link, var vmm = link.vmm {
      guard let result = receive(from: socket, of: link) else { return }
      switch result {
      case .wouldBlock:
        return
      case .closed:
        guard vmm.registered else {
          return engine.clientGone(link.id, BrokerError(.disconnected, "the VMM closed its connection before sending its guest regions"), now: loopTime)
        }
        loop.remove(socket.fd)
        return
      case .packet(let count):
        defer { receivedFDs.forEach(closeDescriptor) }
        guard !vmm.registered else { continue }
        do throws(BrokerError) {
          try take(&receivedFDs, into: &vmm)
          vmm.received.append(contentsOf: packet[..<count])
          guard let handshake = try FirecrackerHandshake.parse(vmm.received) else {
            link.vmm = vmm
            continue
          }
          vmm.registered = true
          vmm.received = []
          let uffd = vmm.uffd
          vmm.uffd = nil
          link.vmm = vmm
          register(link, handshake, uffd: uffd, pid: vmm.pid, socket: vmm.socket)
        } catch {
          link.vmm = vmm
          return engine.clientFailed(link.id, error, now: loopTime)
        }
      }
    }
  }

  /// The userfaultfd, adopted as it comes (with any read of the handshake).
  private func take(_ fds: inout [CInt], into vmm: inout VMMHandshake) throws(BrokerError) {
    guard !fds.isEmpty else { return }
    guard fds.count == 1, vmm.uffd == nil else {
      throw BrokerError(.notUserfaultfd, "a VMM must send exactly one descriptor, its userfaultfd")
    }
    do {
      vmm.uffd = try UserfaultFD(adopting: FileDescriptor(rawValue: fds[0]), features: nil)
      fds.removeAll()  // the uffd object owns (and closes) the descriptor now
    } catch {
      throw BrokerError(.notUserfaultfd, "the VMM's descriptor: \(error.message)")
    }
  }

  /// The requests a client of ours would have sent: Hello, then Register with
  /// the guest regions, each served by the socket's plugin from its offset.
  private func register(_ link: ClientLink, _ handshake: FirecrackerHandshake, uffd: UserfaultFD?, pid: Int32,
                        socket: BrokerConfiguration.FirecrackerSocket) {
    engine.clientRequest(link.id, ClientRequest(requestID: 1, .hello(Hello(role: .client, name: "vmm"))), descriptors: .none, now: loopTime)
    let descriptors: AttachedDescriptors = if let uffd { .userfaultfd(uffd.features) } else { .none }
    registering = uffd
    let register = RegisterRequest(pid: pid, features: uffd?.features ?? [], ioctls: [], regions: handshake.regions(plugin: socket.plugin, argument: socket.argument))
    engine.clientRequest(link.id, ClientRequest(requestID: 2, .register(register)), descriptors: descriptors, now: loopTime)
    perform()  // `.adoptUffd` takes `registering`
    registering = nil
  }
}
