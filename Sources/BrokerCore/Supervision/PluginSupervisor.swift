import BrokerProtocol
import CUserfaultfd
import Glibc
import Logging
import Userfaultfd

/// Spawns the configured plugins, restarts them with backoff when they exit,
/// and stops them explicitly (SIGTERM, wait, SIGKILL, reap) at shutdown.
/// A plugin learns the socket to connect to from `UFFD_BROKER_PLUGIN_SOCKET`.
final class PluginSupervisor {
  private struct Child {
    var plugin: BrokerConfiguration.SpawnedPlugin
    var pid: pid_t = 0
    var pidfd: CInt = -1
    var startedAt: UInt64 = 0
    var restartAt: UInt64?
    var backoff: UInt64 = 250_000_000
    var restarts = 0
  }

  private var children: [Child]
  private let pluginSocketPath: String
  private let logger: Logger

  init(plugins: [BrokerConfiguration.SpawnedPlugin], pluginSocketPath: String, logger: Logger) {
    children = plugins.map { Child(plugin: $0) }
    self.pluginSocketPath = pluginSocketPath
    self.logger = logger
  }

  var nextRestart: UInt64? { children.compactMap(\.restartAt).min() }

  func startAll(loop: EventLoop) {
    for index in children.indices { start(index, loop: loop) }
  }

  private func start(_ index: Int, loop: EventLoop) {
    children[index].restartAt = nil
    let plugin = children[index].plugin
    let argv = ([plugin.executable] + plugin.arguments).map { strdup($0) } + [nil]
    var environment = [String]()
    var cursor = environ
    while let entry = cursor.pointee {
      let text = String(cString: entry)
      if !text.hasPrefix("UFFD_BROKER_PLUGIN_SOCKET=") { environment.append(text) }
      cursor += 1
    }
    environment.append("UFFD_BROKER_PLUGIN_SOCKET=\(pluginSocketPath)")
    let envp = environment.map { strdup($0) } + [nil]
    defer {
      argv.forEach { free($0) }
      envp.forEach { free($0) }
    }
    let pid = cuffd_spawn(plugin.executable, argv, envp)
    guard pid > 0 else {
      logger.error("cannot spawn plugin", metadata: ["plugin": "\(plugin.name)", "executable": "\(plugin.executable)", "errno": "\(-pid)"])
      scheduleRestart(index)
      return
    }
    let pidfd = cuffd_pidfd_open(pid)
    children[index].pid = pid
    children[index].pidfd = pidfd
    children[index].startedAt = monotonicNanoseconds()
    if pidfd >= 0 { try? loop.add(pidfd, Token(.child, UInt64(index))) }
    logger.info("plugin spawned", metadata: ["plugin": "\(plugin.name)", "plugin.pid": "\(pid)"])
  }

  /// A child's pidfd became readable: reap it and schedule its restart.
  func childExited(id: UInt64, loop: EventLoop) {
    let index = Int(id)
    guard children.indices.contains(index), children[index].pid > 0 else { return }
    var status: CInt = 0
    waitpid(children[index].pid, &status, 0)
    loop.remove(children[index].pidfd)
    closeDescriptor(children[index].pidfd)
    logger.warning("plugin exited", metadata: ["plugin": "\(children[index].plugin.name)", "plugin.pid": "\(children[index].pid)", "status": "\(status)"])
    children[index].pid = 0
    children[index].pidfd = -1
    // A plugin that ran a while starts again at the shortest backoff.
    if monotonicNanoseconds() - children[index].startedAt > 30_000_000_000 { children[index].backoff = 250_000_000 }
    scheduleRestart(index)
  }

  private func scheduleRestart(_ index: Int) {
    children[index].restartAt = monotonicNanoseconds() + children[index].backoff
    children[index].backoff = min(children[index].backoff * 2, 8_000_000_000)
    children[index].restarts += 1
  }

  func restartDue(loop: EventLoop) {
    let now = monotonicNanoseconds()
    for index in children.indices {
      if let due = children[index].restartAt, due <= now { start(index, loop: loop) }
    }
  }

  /// SIGTERM to every child, up to 2 s to exit, then SIGKILL; every child is reaped.
  func stopAll() {
    for child in children where child.pid > 0 { kill(child.pid, SIGTERM) }
    let deadline = monotonicNanoseconds() + 2_000_000_000
    for index in children.indices where children[index].pid > 0 {
      var status: CInt = 0
      while waitpid(children[index].pid, &status, WNOHANG) == 0 {
        if monotonicNanoseconds() > deadline {
          kill(children[index].pid, SIGKILL)
          waitpid(children[index].pid, &status, 0)
          break
        }
        usleep(10_000)
      }
      closeDescriptor(children[index].pidfd)
      children[index].pid = 0
    }
  }
}
