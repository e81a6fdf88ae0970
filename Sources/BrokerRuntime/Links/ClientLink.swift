import BrokerCore
import BrokerProtocol
import Userfaultfd

/// The runtime's side of one client: its socket (none for a forked child),
/// its userfaultfd and its pidfd.
final class ClientLink {
  let id: ClientID
  let socket: PacketSocket?
  var uffd: UserfaultFD?
  var pidfd = OwnedDescriptor()
  /// A VMM on a Firecracker socket (nil: a client speaking our protocol).
  var vmm: VMMHandshake?
  /// Where its uffd is read (a client speaking our protocol: its SDK recovers from it).
  var journal: ReadJournal?
  /// Its Register was answered with an Ack: from then on a refusal does not end the connection.
  var acked = false

  init(id: ClientID, socket: PacketSocket?, uffd: UserfaultFD? = nil) {
    self.id = id
    self.socket = socket
    self.uffd = uffd
  }
}

/// A VMM's side of the Firecracker handshake: which socket it came to, and
/// what it has sent so far (the JSON may come in several reads; the
/// userfaultfd with one of them).
struct VMMHandshake {
  let socket: BrokerConfiguration.FirecrackerSocket
  let pid: Int32
  var received: [UInt8] = []
  var uffd: UserfaultFD?
  /// Its regions went to the engine: what it sends from now on is ignored.
  var registered = false
}

/// A Firecracker-style socket: from the config (for as long as the broker
/// runs), or opened for one VM through the control socket (gone once its VMM
/// connected).
final class FirecrackerListener {
  let listener: PacketListener
  let socket: BrokerConfiguration.FirecrackerSocket
  /// The VM's name, for a socket opened for one VM; nil: a configured one.
  let vmName: String?

  init(_ listener: PacketListener, socket: BrokerConfiguration.FirecrackerSocket, vmName: String?) {
    (self.listener, self.socket, self.vmName) = (listener, socket, vmName)
  }
}
