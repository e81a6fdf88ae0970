import BrokerCore
import BrokerProtocol
import CLinux
import ChildProcess
import Glibc
import LinuxSupport
import Logging

/// Spawns the configured plugins, restarts them with backoff when they exit,
/// and stops them explicitly (SIGTERM, wait, SIGKILL, reap) at shutdown.
///
/// Each plugin runs as its configured user (`PluginCredentials`), with
/// `no_new_privs`, and gets its connection to the broker ready made: its end
/// of a socket pair as fd 3 (`UFFD_BROKER_PLUGIN_FD=3`), which the PluginSDK
/// uses instead of the plugin socket. So an unprivileged plugin needs no
/// access to the plugin socket, and no uid is let in there for its sake: the
/// broker's end is handed to `adopt`, and the engine lets it serve only its
/// configured name. (`UFFD_BROKER_PLUGIN_SOCKET` is still set, for plugins
/// built on an older SDK.)
final class PluginSupervisor {
  private struct Child {
    var plugin: BrokerConfiguration.SpawnedPlugin
    /// Who it runs as (nil: as the broker, which is not root).
    var credentials: ChildProcess.Credentials?
    var process: ChildProcess?
    var startedAt: UInt64 = 0
    var restartAt: UInt64?
    var backoff: UInt64 = 250_000_000
    /// Exits in a row after less than 30 s of life.
    var quickExits = 0
    var givenUp = false
    /// Its spawns, exits and giving up, for the status.
    var tally = Tally()
    /// A reload removed or changed it: asked to stop (SIGTERM), killed at
    /// this time if still running, never restarted.
    var retiringUntil: UInt64?
    /// What starts in its place once it has exited (a reload changed it).
    var successor: (plugin: BrokerConfiguration.SpawnedPlugin, credentials: ChildProcess.Credentials?)?
  }

  /// By a number that stays theirs (the event loop's token for their pidfd).
  private var children: [UInt64: Child] = [:]
  private var nextID: UInt64 = 0
  private let pluginSocketPath: String
  private let logger: Logger
  /// Takes the broker's end of a spawned plugin's socket pair, with the
  /// plugin's pid and credentials and its configured name.
  private let adopt: (PacketSocket, PeerCredentials, String) -> Void
  /// How long a removed or changed plugin has to exit after SIGTERM.
  static let retireGrace: UInt64 = 2_000_000_000

  /// `credentials[i]`: who `plugins[i]` runs as (`PluginCredentials.resolve`).
  init(plugins: [BrokerConfiguration.SpawnedPlugin], credentials: [ChildProcess.Credentials?], pluginSocketPath: String, logger: Logger,
       adopt: @escaping (PacketSocket, PeerCredentials, String) -> Void) {
    self.pluginSocketPath = pluginSocketPath
    self.logger = logger
    self.adopt = adopt
    for (plugin, credentials) in zip(plugins, credentials) { add(plugin, credentials) }
  }

  @discardableResult
  private func add(_ plugin: BrokerConfiguration.SpawnedPlugin, _ credentials: ChildProcess.Credentials?) -> UInt64 {
    let id = nextID
    nextID += 1
    children[id] = Child(plugin: plugin, credentials: credentials)
    return id
  }

  /// The earliest restart or retirement kill due (read on every loop wakeup: no array built).
  var nextRestart: UInt64? {
    var earliest: UInt64?
    for child in children.values {
      if let due = child.restartAt, due < earliest ?? .max { earliest = due }
      if let due = child.retiringUntil, due < earliest ?? .max { earliest = due }
    }
    return earliest
  }

  func startAll(loop: EventLoop) {
    for id in children.keys.sorted() { start(id, loop: loop) }
  }

  /// A reloaded configuration's plugins (`credentials[i]` for `plugins[i]`):
  /// new ones start, removed ones are stopped (SIGTERM, SIGKILL after
  /// `retireGrace`), changed ones are stopped and start again as configured
  /// once they have exited (one process per name: the new one must not find
  /// its name still taken). A change of `maxRestarts` alone applies in place.
  func apply(_ plugins: [BrokerConfiguration.SpawnedPlugin], credentials: [ChildProcess.Credentials?], loop: EventLoop) {
    let next = Dictionary(uniqueKeysWithValues: zip(plugins, credentials).map { ($0.name, (plugin: $0, credentials: $1)) })
    for id in children.keys.sorted() {
      guard var child = children[id], child.retiringUntil == nil else { continue }
      guard let wanted = next[child.plugin.name] else {
        retire(id, reason: "removed from the configuration", loop: loop)
        continue
      }
      var unchanged = child.plugin
      unchanged.maxRestarts = wanted.plugin.maxRestarts
      if unchanged == wanted.plugin && child.credentials == wanted.credentials {
        child.plugin = wanted.plugin
        children[id] = child
      } else {
        children[id]?.successor = wanted
        retire(id, reason: "changed in the configuration", loop: loop)
      }
    }
    let running = Set(children.values.map(\.plugin.name))
    for plugin in plugins where !running.contains(plugin.name) {
      let id = add(plugin, next[plugin.name]?.credentials ?? nil)
      start(id, loop: loop)
    }
  }

  private func retire(_ id: UInt64, reason: String, loop: EventLoop) {
    guard let child = children[id] else { return }
    logger.notice("stopping a spawned plugin", metadata: ["plugin": "\(child.plugin.name)", "plugin.pid": "\(child.process?.pid ?? 0)", "reason": "\(reason)"])
    guard let process = child.process else { return replace(id, loop: loop) }
    children[id]?.restartAt = nil
    children[id]?.retiringUntil = monotonicNanoseconds() + Self.retireGrace
    _ = clinux_pidfd_send_signal(process.pidfd, SIGTERM)
  }

  /// A retired child is gone: its successor, if any, starts now.
  private func replace(_ id: UInt64, loop: EventLoop) {
    guard let child = children.removeValue(forKey: id) else { return }
    if let successor = child.successor { start(add(successor.plugin, successor.credentials), loop: loop) }
  }

  private func start(_ id: UInt64, loop: EventLoop) {
    guard let child = children[id] else { return }
    children[id]?.restartAt = nil
    let plugin = child.plugin
    let credentials = child.credentials
    do {
      let (mine, theirs) = try PacketSocket.pair()
      _ = fcntl(mine.fd, F_SETFL, fcntl(mine.fd, F_GETFL) | O_NONBLOCK)
      let process = try ChildProcess(
        plugin.executable, plugin.arguments, environment: ["UFFD_BROKER_PLUGIN_SOCKET": pluginSocketPath, "UFFD_BROKER_PLUGIN_FD": "3"],
        options: .init(descriptors: [theirs.fd], credentials: credentials, noNewPrivileges: true))
      children[id]?.process = process
      children[id]?.startedAt = monotonicNanoseconds()
      if process.pidfd >= 0 { try? loop.add(process.pidfd, Token(.child, id)) }
      children[id]?.tally.count(.pluginSpawned)
      let uid = credentials?.uid ?? geteuid()
      let gid = credentials?.gid ?? getegid()
      logger.info("plugin spawned", metadata: ["plugin": "\(plugin.name)", "plugin.pid": "\(process.pid)", "plugin.uid": "\(uid)", "plugin.gid": "\(gid)"])
      adopt(mine, PeerCredentials(pid: process.pid, uid: uid, gid: gid), plugin.name)
    } catch {
      // A missing executable, a user it cannot become: a quick end like any other.
      children[id]?.tally.count(.pluginSpawnFailed)
      logger.error("cannot spawn plugin", metadata: ["plugin": "\(plugin.name)", "error": "\(error)"])
      restartOrGiveUp(id, ranLong: false)
    }
  }

  /// A child's pidfd became readable: reap it and schedule its restart (or,
  /// retired by a reload, start its successor).
  func childExited(id: UInt64, loop: EventLoop) {
    guard let child = children[id], let process = child.process, let status = process.poll() else { return }
    loop.remove(process.pidfd)
    children[id]?.process = nil
    children[id]?.tally.count(.pluginExited)
    if child.retiringUntil != nil {
      logger.info("spawned plugin stopped", metadata: ["plugin": "\(child.plugin.name)", "plugin.pid": "\(process.pid)", "status": "\(status)"])
      return replace(id, loop: loop)
    }
    logger.warning("plugin exited", metadata: ["plugin": "\(child.plugin.name)", "plugin.pid": "\(process.pid)", "status": "\(status)"])
    restartOrGiveUp(id, ranLong: monotonicNanoseconds() - child.startedAt > 30_000_000_000)
  }

  /// After a plugin ended: restarted after its backoff, or, past `maxRestarts`
  /// quick ends in a row (exits within 30 s, failed spawns), given up. One that
  /// ran a while starts again at the shortest backoff.
  private func restartOrGiveUp(_ id: UInt64, ranLong: Bool) {
    guard var child = children[id] else { return }
    defer { children[id] = child }
    if ranLong {
      child.backoff = 250_000_000
      child.quickExits = 0
    } else {
      child.quickExits += 1
    }
    guard child.quickExits <= child.plugin.maxRestarts else {
      child.givenUp = true
      child.tally.count(.pluginGivenUp)
      logger.error("plugin given up", metadata: ["plugin": "\(child.plugin.name)", "restarts": "\(child.plugin.maxRestarts)"])
      return
    }
    child.restartAt = monotonicNanoseconds() + child.backoff
    child.backoff = min(child.backoff * 2, 8_000_000_000)
  }

  /// Kills the spawned plugin with pid `pid` (through its pidfd, never a
  /// recycled pid): a plugin that stopped answering is replaced, not left
  /// hanging (or stopped) with its name. Its exit restarts it as any exit does.
  /// Returns false if no child of ours has that pid.
  @discardableResult
  func killChild(pid: pid_t, reason: String) -> Bool {
    guard let process = children.values.lazy.compactMap(\.process).first(where: { $0.pid == pid }), process.pidfd >= 0 else { return false }
    logger.warning("killing a spawned plugin", metadata: ["plugin.pid": "\(pid)", "reason": "\(reason)"])
    return clinux_pidfd_send_signal(process.pidfd, SIGKILL) == 0
  }

  /// The plugins the supervisor stopped restarting.
  var givenUp: [String] {
    children.values.filter(\.givenUp).map(\.plugin.name)
  }

  /// Adds what the supervisor knows to `status`: each spawned plugin's pid and
  /// its spawns and exits (a plugin not yet connected is listed too).
  func annotate(_ status: inout BrokerStatus) {
    for child in children.values.sorted(by: { $0.plugin.name < $1.plugin.name }) {
      status.tally = status.tally + child.tally
      status.updatePlugin(child.plugin.name) { entry in
        if child.givenUp && entry.state == "away" { entry.state = "failed" }
        entry.spawnedPID = child.process?.pid ?? 0
        entry.tally = entry.tally + child.tally
      }
    }
  }

  /// Starts the plugins whose restart is due, and kills retired ones past
  /// their grace; whether it started any.
  @discardableResult
  func restartDue(loop: EventLoop) -> Bool {
    // Every loop wakeup comes here: with nothing scheduled, one pass, no clock read, no array built.
    guard let due = nextRestart else { return false }
    let now = monotonicNanoseconds()
    guard due <= now else { return false }
    var tried = false
    for id in children.keys.sorted() {
      guard let child = children[id] else { continue }
      if let due = child.retiringUntil, due <= now, let process = child.process {
        logger.warning("killing a spawned plugin", metadata: ["plugin": "\(child.plugin.name)", "plugin.pid": "\(process.pid)", "reason": "it did not exit on SIGTERM"])
        _ = clinux_pidfd_send_signal(process.pidfd, SIGKILL)
        children[id]?.retiringUntil = now + 60_000_000_000  // its exit is reaped as usual
      }
      if let due = child.restartAt, due <= now {
        start(id, loop: loop)
        tried = true
      }
    }
    return tried
  }

  /// SIGTERM to every child, then up to 2 s each to exit before SIGKILL; every child is reaped.
  func stopAll() {
    for child in children.values { if let process = child.process, process.poll() == nil { kill(process.pid, SIGTERM) } }
    for id in children.keys {
      children[id]?.process?.terminate(graceMilliseconds: 2000)
      children[id]?.process = nil
    }
  }
}
