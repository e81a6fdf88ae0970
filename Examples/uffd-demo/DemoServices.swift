import ChildProcess
import Glibc

/// The demo's real processes: the broker, which spawns and supervises the
/// sample plugins from its config file, in a private temp directory that is
/// removed at the end, on failure, and on Ctrl-C.
final class DemoServices {
  let directory: String
  let clientSocket: String
  let snapshotStats: String
  let swapStats: String
  /// The plugins' own directory (their stats files, the snapshot): the broker
  /// spawns them as `nobody` when the demo runs as root, so it is nobody's.
  let pluginDirectory: String
  /// Who owns it (nil: the demo's own user, not root).
  let pluginOwner: (uid: uid_t, gid: gid_t)?
  private var broker: ChildProcess?

  init(prefetchPages: Int, delegate: Bool) throws {
    var template = Array("/tmp/uffd-demo-XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw DemoError("cannot create a temp directory") }
    directory = String(cString: made)
    clientSocket = directory + "/client.sock"
    pluginDirectory = directory + "/plugins"
    snapshotStats = pluginDirectory + "/snapshot.stats"
    swapStats = pluginDirectory + "/swap.stats"
    if geteuid() == 0, let nobody = getpwnam("nobody") {
      pluginOwner = (nobody.pointee.pw_uid, nobody.pointee.pw_gid)
    } else {
      pluginOwner = nil
    }
    // Reachable by the plugins' user; its sockets keep their own 0600.
    chmod(directory, 0o755)
    mkdir(pluginDirectory, 0o700)
    if let pluginOwner { chown(pluginDirectory, pluginOwner.uid, pluginOwner.gid) }
    let user = pluginOwner == nil ? "" : ", \"user\": \"nobody\""
    let products = ChildProcess.productsDirectory
    for product in ["uffd-broker", "snapshot-plugin", "swap-plugin"] where access(products + "/" + product, X_OK) != 0 {
      throw DemoError("\(products)/\(product) is missing: build every product first (swift build -c release)")
    }
    let config = """
      {"plugins": [
        {"name": "snapshot", "executable": "\(products)/snapshot-plugin", "arguments": ["snapshot", "--root", "\(pluginDirectory)", "--prefetch", "\(prefetchPages)", "--stats", "\(snapshotStats)"\(delegate ? ", \"--delegate\"" : "")]\(user)},
        {"name": "swap", "executable": "\(products)/swap-plugin", "arguments": ["swap", "--stats", "\(swapStats)"]\(user)}
      ]}
      """
    guard let file = fopen(directory + "/broker.json", "w") else { throw DemoError("cannot write the broker config") }
    fputs(config, file)
    fclose(file)
    broker = try ChildProcess(
      products + "/uffd-broker",
      ["--client-socket", clientSocket, "--plugin-socket", directory + "/plugin.sock", "--config", directory + "/broker.json", "--log-level", "warning"],
      stderr: directory + "/broker.log")
    setenv("UFFD_BROKER_CLIENT_SOCKET", clientSocket, 1)
  }

  /// Waits until the broker listens. (A Register naming a plugin that is still
  /// starting waits for it: the broker announces the region when it connects.)
  func waitUntilReady(timeoutMilliseconds: Int = 10_000) throws {
    let deadline = Glibc.time(nil) + time_t(timeoutMilliseconds / 1000)
    while access(clientSocket, F_OK) != 0 {
      if let status = broker?.poll() { throw DemoError("the broker exited (\(status)); see \(directory)/broker.log") }
      if Glibc.time(nil) > deadline { throw DemoError("the broker or its plugins did not start; see \(directory)/broker.log") }
      usleep(20_000)
    }
  }

  /// The broker's log (for failure messages).
  var brokerLog: String {
    guard let file = fopen(directory + "/broker.log", "r") else { return "" }
    defer { fclose(file) }
    var text = ""
    var line = [CChar](repeating: 0, count: 4096)
    while fgets(&line, Int32(line.count), file) != nil { text += String(cString: line) }
    return text
  }

  /// Stops the broker (which stops its plugins) and removes the directory.
  func shutdown() {
    broker?.terminate(graceMilliseconds: 5000)
    broker = nil
    removeDirectory()
  }

  func removeDirectory() {
    Self.remove(pluginDirectory)
    Self.remove(directory)
  }

  /// Removes `path` and the files in it.
  private static func remove(_ path: String) {
    guard let dir = opendir(path) else { return }
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
      if name != "." && name != ".." { unlink(path + "/" + name) }
    }
    closedir(dir)
    rmdir(path)
  }

  /// Reads `name=value` lines of a plugin's stats file.
  static func statistics(_ path: String) -> [String: Int] {
    guard let file = fopen(path, "r") else { return [:] }
    defer { fclose(file) }
    var result: [String: Int] = [:]
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, Int32(line.count), file) != nil {
      let parts = String(cString: line).split(whereSeparator: { $0 == "=" || $0 == "\n" })
      if parts.count == 2, let value = Int(parts[1]) { result[String(parts[0])] = value }
    }
    return result
  }
}

struct DemoError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}
