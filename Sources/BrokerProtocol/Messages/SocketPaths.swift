import Glibc

/// Where the broker listens unless told otherwise. `UFFD_BROKER_CLIENT_SOCKET`,
/// `UFFD_BROKER_PLUGIN_SOCKET` and `UFFD_BROKER_CONTROL_SOCKET` override the
/// defaults for every role.
///
/// A default is only a directory no other user can create first:
/// `$XDG_RUNTIME_DIR/uffd-broker`, or `/run/uffd-broker` for root. Without
/// `XDG_RUNTIME_DIR` a non-root process has none (a directory in `/tmp` can be
/// made by anyone, who then serves the sockets): asking for a default throws,
/// and the path must be given explicitly.
public enum SocketPaths {
  /// `$XDG_RUNTIME_DIR/uffd-broker`, else `/run/uffd-broker` for root; nil otherwise (no safe default).
  public static var runtimeDirectory: String? {
    if let xdg = environment("XDG_RUNTIME_DIR"), !xdg.isEmpty { return xdg + "/uffd-broker" }
    return geteuid() == 0 ? "/run/uffd-broker" : nil
  }

  /// The client socket: `UFFD_BROKER_CLIENT_SOCKET`, else `client.sock` in `runtimeDirectory`.
  public static var client: String {
    get throws(BrokerError) { try path("client.sock", override: "UFFD_BROKER_CLIENT_SOCKET") }
  }

  /// The plugin socket: `UFFD_BROKER_PLUGIN_SOCKET`, else `plugin.sock` in `runtimeDirectory`.
  public static var plugin: String {
    get throws(BrokerError) { try path("plugin.sock", override: "UFFD_BROKER_PLUGIN_SOCKET") }
  }

  /// The daemon's `ControlChannel` (`uffd-broker status`): `UFFD_BROKER_CONTROL_SOCKET`,
  /// else `control.sock` in `runtimeDirectory`.
  public static var control: String {
    get throws(BrokerError) { try path("control.sock", override: "UFFD_BROKER_CONTROL_SOCKET") }
  }

  /// Where the default sockets are, for help texts.
  public static let defaultsDescription = "$XDG_RUNTIME_DIR/uffd-broker/, or /run/uffd-broker/ for root"

  /// A uid besides root and the caller's own that may serve the broker's
  /// sockets (`UFFD_BROKER_UID`; see `PacketSocket.connect(path:trusting:)`).
  public static var trustedBrokerUID: UInt32? {
    get throws(BrokerError) {
      guard let text = environment("UFFD_BROKER_UID"), !text.isEmpty else { return nil }
      guard let uid = UInt32(text) else { throw BrokerError(.malformed, "UFFD_BROKER_UID=\(text) is not a uid (a whole number)") }
      return uid
    }
  }

  private static func path(_ name: String, override variable: String) throws(BrokerError) -> String {
    if let path = environment(variable), !path.isEmpty { return path }
    guard let directory = runtimeDirectory else {
      throw BrokerError(.malformed, """
        no safe default for the \(name.prefix { $0 != "." }) socket: XDG_RUNTIME_DIR is not set, and a directory in /tmp could be \
        created first by another user; set XDG_RUNTIME_DIR or \(variable), or give the socket path explicitly
        """)
    }
    return directory + "/" + name
  }

  private static func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
  }
}
