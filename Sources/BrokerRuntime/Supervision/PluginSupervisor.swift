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
  }

  private var children: [Child]
  private let pluginSocketPath: String
  private let logger: Logger
  /// Takes the broker's end of a spawned plugin's socket pair, with the
  /// plugin's pid and credentials and its configured name.
  private let adopt: (PacketSocket, PeerCredentials, String) -> Void

  /// `credentials[i]`: who `plugins[i]` runs as (`PluginCredentials.resolve`).
  init(plugins: [BrokerConfiguration.SpawnedPlugin], credentials: [ChildProcess.Credentials?], pluginSocketPath: String, logger: Logger,
       adopt: @escaping (PacketSocket, PeerCredentials, String) -> Void) {
    children = zip(plugins, credentials).map { Child(plugin: $0, credentials: $1) }
    self.pluginSocketPath = pluginSocketPath
    self.logger = logger
    self.adopt = adopt
  }

  /// The earliest restart due (read on every loop wakeup: no array built).
  var nextRestart: UInt64? {
    var earliest: UInt64?
    for child in children { if let due = child.restartAt, due < earliest ?? .max { earliest = due } }
    return earliest
  }

  func startAll(loop: EventLoop) {
    for index in children.indices { start(index, loop: loop) }
  }

  private func start(_ index: Int, loop: EventLoop) {
    children[index].restartAt = nil
    let plugin = children[index].plugin
    let credentials = children[index].credentials
    do {
      let (mine, theirs) = try PacketSocket.pair()
      _ = fcntl(mine.fd, F_SETFL, fcntl(mine.fd, F_GETFL) | O_NONBLOCK)
      let process = try ChildProcess(
        plugin.executable, plugin.arguments, environment: ["UFFD_BROKER_PLUGIN_SOCKET": pluginSocketPath, "UFFD_BROKER_PLUGIN_FD": "3"],
        options: .init(descriptors: [theirs.fd], credentials: credentials, noNewPrivileges: true))
      children[index].process = process
      children[index].startedAt = monotonicNanoseconds()
      if process.pidfd >= 0 { try? loop.add(process.pidfd, Token(.child, UInt64(index))) }
      children[index].tally.count(.pluginSpawned)
      let uid = credentials?.uid ?? geteuid()
      let gid = credentials?.gid ?? getegid()
      logger.info("plugin spawned", metadata: ["plugin": "\(plugin.name)", "plugin.pid": "\(process.pid)", "plugin.uid": "\(uid)", "plugin.gid": "\(gid)"])
      adopt(mine, PeerCredentials(pid: process.pid, uid: uid, gid: gid), plugin.name)
    } catch {
      // A missing executable, a user it cannot become: a quick end like any other.
      children[index].tally.count(.pluginSpawnFailed)
      logger.error("cannot spawn plugin", metadata: ["plugin": "\(plugin.name)", "error": "\(error)"])
      restartOrGiveUp(index, ranLong: false)
    }
  }

  /// A child's pidfd became readable: reap it and schedule its restart.
  func childExited(id: UInt64, loop: EventLoop) {
    let index = Int(id)
    guard children.indices.contains(index), let process = children[index].process, let status = process.poll() else { return }
    loop.remove(process.pidfd)
    children[index].process = nil
    children[index].tally.count(.pluginExited)
    logger.warning("plugin exited", metadata: ["plugin": "\(children[index].plugin.name)", "plugin.pid": "\(process.pid)", "status": "\(status)"])
    restartOrGiveUp(index, ranLong: monotonicNanoseconds() - children[index].startedAt > 30_000_000_000)
  }

  /// After a plugin ended: restarted after its backoff, or, past `maxRestarts`
  /// quick ends in a row (exits within 30 s, failed spawns), given up. One that
  /// ran a while starts again at the shortest backoff.
  private func restartOrGiveUp(_ index: Int, ranLong: Bool) {
    if ranLong {
      children[index].backoff = 250_000_000
      children[index].quickExits = 0
    } else {
      children[index].quickExits += 1
    }
    guard children[index].quickExits <= children[index].plugin.maxRestarts else {
      children[index].givenUp = true
      children[index].tally.count(.pluginGivenUp)
      logger.error("plugin given up", metadata: ["plugin": "\(children[index].plugin.name)", "restarts": "\(children[index].plugin.maxRestarts)"])
      return
    }
    scheduleRestart(index)
  }

  /// Kills the spawned plugin with pid `pid` (through its pidfd, never a
  /// recycled pid): a plugin that stopped answering is replaced, not left
  /// hanging (or stopped) with its name. Its exit restarts it as any exit does.
  /// Returns false if no child of ours has that pid.
  @discardableResult
  func killChild(pid: pid_t, reason: String) -> Bool {
    guard let process = children.lazy.compactMap(\.process).first(where: { $0.pid == pid }), process.pidfd >= 0 else { return false }
    logger.warning("killing a spawned plugin", metadata: ["plugin.pid": "\(pid)", "reason": "\(reason)"])
    return clinux_pidfd_send_signal(process.pidfd, SIGKILL) == 0
  }

  /// Whether the supervisor stopped restarting the plugin `name`.
  func hasGivenUp(_ name: String) -> Bool {
    children.contains { $0.plugin.name == name && $0.givenUp }
  }

  /// Adds what the supervisor knows to `status`: each spawned plugin's pid and
  /// its spawns and exits (a plugin not yet connected is listed too).
  func annotate(_ status: inout BrokerStatus) {
    for child in children {
      status.tally = status.tally + child.tally
      status.updatePlugin(child.plugin.name) { entry in
        if child.givenUp && entry.state == "away" { entry.state = "failed" }
        entry.spawnedPID = child.process?.pid ?? 0
        entry.tally = entry.tally + child.tally
      }
    }
  }

  private func scheduleRestart(_ index: Int) {
    children[index].restartAt = monotonicNanoseconds() + children[index].backoff
    children[index].backoff = min(children[index].backoff * 2, 8_000_000_000)
  }

  /// Starts the plugins whose restart is due; whether it tried any.
  @discardableResult
  func restartDue(loop: EventLoop) -> Bool {
    let now = monotonicNanoseconds()
    var tried = false
    for index in children.indices {
      if let due = children[index].restartAt, due <= now {
        start(index, loop: loop)
        tried = true
      }
    }
    return tried
  }

  /// SIGTERM to every child, then up to 2 s each to exit before SIGKILL; every child is reaped.
  func stopAll() {
    for child in children { if let process = child.process, process.poll() == nil { kill(process.pid, SIGTERM) } }
    for index in children.indices {
      children[index].process?.terminate(graceMilliseconds: 2000)
      children[index].process = nil
    }
  }
}
