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
  func acceptVMMs(at index: Int) {
    let socketConfiguration = configuration.firecrackerSockets[index]
    acceptAll(from: firecrackerListeners[index], role: "vmm", refusal: { socket, _ in finish(socket) }) { socket, peer in
      guard let pidfd = takePidfd(of: socket) else { return }
      admitClient(socket, pidfd: pidfd, engine.clientConnected(peer, isVMM: true, now: loopTime),
                  vmm: VMMHandshake(socket: socketConfiguration, pid: peer.pid))
    }
  }

  /// Reads the VMM's handshake until it is whole, then registers its guest
  /// memory. After that the connection only tells when the VMM closes it;
  /// the VM still runs until its process exits (its pidfd says when), so
  /// its memory is served until then.
  func readVMM(_ link: ClientLink) {
    guard let socket = link.socket else { return }
    while clients[link.id] === link, var vmm = link.vmm {
      receivedFDs.removeAll(keepingCapacity: true)
      let result: PacketSocket.ReceiveResult
      do {
        result = try socket.receive(into: packet, fds: &receivedFDs)
      } catch {
        receivedFDs.forEach(closeDescriptor)
        return engine.clientFailed(link.id, error, now: loopTime)
      }
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
