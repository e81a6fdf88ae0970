import ArgumentParser
import BrokerProtocol
import Foundation

/// `uffd-broker vm-socket open|close NAME`: a Firecracker-style handler socket
/// for one VM, opened by an orchestrator through the control socket.
struct VMSocket: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "vm-socket",
    abstract: "Open (or close) a Firecracker-style page-fault handler socket for one VM.",
    discussion: """
      open: the running broker listens at vm-NAME.sock beside its client socket and prints that path; point the VMM's \
      Uffd memory backend at it. The one VMM that connects there has its guest memory served by PLUGIN with ARGUMENT \
      (for the snapshot plugin, the snapshot's memory file), and the socket is then removed. close: removes a socket \
      no VMM has used. Exit status 69 when no broker answers, 65 when it refuses (the reason on stderr).
      """)

  @Argument(help: "open or close.")
  var action: VMSocketCommand.Action

  @Argument(help: "The VM's name: 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot).")
  var name: String

  @Option(help: "The plugin that serves the VM's memory (open).")
  var plugin: String?

  @Option(help: "For the plugin: the snapshot's memory file, say (open).")
  var argument: String?

  @Option(help: "The broker's control socket (default: UFFD_BROKER_CONTROL_SOCKET, else control.sock in \(SocketPaths.defaultsDescription)).")
  var controlSocket: String?

  func validate() throws {
    guard VMSocketCommand.isValidName(name) else { throw ValidationError("the VM's name must be 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)") }
    if action == .open && plugin == nil { throw ValidationError("open needs --plugin") }
  }

  func run() throws {
    do {
      let path = if let controlSocket { controlSocket } else { try SocketPaths.control }
      print(try ControlChannel.vmSocket(VMSocketCommand(action, name: name, plugin: plugin, argument: argument), socketPath: path).path)
    } catch {
      FileHandle.standardError.write(Data("uffd-broker vm-socket: \(error.message)\n".utf8))
      throw ExitCode([.disconnected, .timedOut, .io].contains(error.code) ? 69 : 65)
    }
  }
}

extension VMSocketCommand.Action: ExpressibleByArgument {}
