import BrokerCore
import BrokerProtocol
import Glibc
import LinuxSupport

/// The descriptors a plugin asked the broker to keep for its name (as
/// systemd's FDSTORE): memfds or regular files, handed back with the Hello of
/// the plugin's next connection, so that data it keeps there (a swap store)
/// survives the plugin process. They live as long as the broker does.
final class DescriptorStore {
  private final class Owned {
    let fd: CInt
    init(_ fd: CInt) { self.fd = fd }
    deinit { closeDescriptor(fd) }
  }

  private var entries: [(name: String, descriptor: Owned)] = []

  var names: [String] { entries.map(\.name) }
  var descriptors: [CInt] { entries.map(\.descriptor.fd) }

  /// Takes ownership of `fd` as `name`, replacing what that name held. Only a
  /// regular file or memfd is kept (a socket or pipe could hand the next
  /// plugin something else entirely); the store holds at most
  /// `DescriptorStoreLimits.descriptors`. On a throw `fd` is closed.
  func keep(_ fd: CInt, as name: String) throws(BrokerError) {
    let owned = Owned(fd)
    var info = stat()
    guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
      throw BrokerError(.malformed, "descriptor \"\(name)\" for the store is not a memfd or regular file")
    }
    if let index = entries.firstIndex(where: { $0.name == name }) {
      entries[index].descriptor = owned
      return
    }
    guard entries.count < DescriptorStoreLimits.descriptors else {
      throw BrokerError(.limit, "a plugin may keep at most \(DescriptorStoreLimits.descriptors) descriptors with the broker")
    }
    entries.append((name, owned))
  }
}
