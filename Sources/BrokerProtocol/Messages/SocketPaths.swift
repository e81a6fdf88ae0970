import Glibc

/// Where the broker listens unless told otherwise. `UFFD_BROKER_CLIENT_SOCKET`,
/// `UFFD_BROKER_PLUGIN_SOCKET` and `UFFD_BROKER_CONTROL_SOCKET` override the
/// defaults for every role.
public enum SocketPaths {
  /// `$XDG_RUNTIME_DIR/uffd-broker`, else `/run/uffd-broker` for root, `/tmp/uffd-broker-UID` otherwise.
  public static var runtimeDirectory: String {
    if let xdg = environment("XDG_RUNTIME_DIR"), !xdg.isEmpty { return xdg + "/uffd-broker" }
    return getuid() == 0 ? "/run/uffd-broker" : "/tmp/uffd-broker-\(getuid())"
  }

  public static var client: String { environment("UFFD_BROKER_CLIENT_SOCKET") ?? runtimeDirectory + "/client.sock" }
  public static var plugin: String { environment("UFFD_BROKER_PLUGIN_SOCKET") ?? runtimeDirectory + "/plugin.sock" }
  /// The daemon's `ControlChannel` (`uffd-broker status`).
  public static var control: String { environment("UFFD_BROKER_CONTROL_SOCKET") ?? runtimeDirectory + "/control.sock" }

  private static func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
  }
}
