import BrokerProtocol
import Glibc
import Userfaultfd

/// The broker's descriptor store for this plugin's name (as systemd's
/// FDSTORE): memfds or regular files the broker keeps and hands back when the
/// plugin connects again under the same name, after a crash, a `kill -9` or a
/// restart by the broker's supervisor. Data kept in them survives the plugin
/// process (not the broker: the broker's own restart empties the store).
/// Given to `PagePlugin.connected(_:)` once, before any event.
public final class DescriptorStore {
  /// What the broker kept for this name from earlier connections, by name.
  /// The plugin owns these descriptors.
  public let restored: [String: CInt]
  private let encoder: DecisionBatchEncoder

  init(restored: [String: CInt], encoder: DecisionBatchEncoder) {
    self.restored = restored
    self.encoder = encoder
  }

  /// Asks the broker to keep a duplicate of `fd` (a memfd or regular file) as
  /// `name` (1 to 64 bytes; at most 16 names), replacing what that name held.
  /// Sent with the plugin's next packet. A memfd that only grows keeps its
  /// identity: keeping it once is enough. `fd` stays the caller's; if it
  /// cannot be duplicated (EMFILE), nothing is kept. Call it on the runner's
  /// thread (from a `PagePlugin` method).
  public func keep(_ fd: CInt, as name: String) {
    let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
    guard copy >= 0 else { return }
    encoder.keep(copy, as: name)
  }
}
