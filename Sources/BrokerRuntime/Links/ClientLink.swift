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

  init(id: ClientID, socket: PacketSocket?, uffd: UserfaultFD? = nil) {
    self.id = id
    self.socket = socket
    self.uffd = uffd
  }
}
