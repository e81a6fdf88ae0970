import ArgumentParser
import BrokerProtocol
import Foundation

/// `uffd-broker status` (or `stats`): what a running broker is doing, from its control socket.
struct Status: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Show what a running broker is doing: its clients, plugins and counters.",
    discussion: """
      Only the broker's owner and root may ask, and only a broker run by root, by you, or by UFFD_BROKER_UID is asked. \
      Exit status 69 (EX_UNAVAILABLE) when no such broker answers, 78 (EX_CONFIG) when there is no default socket. \
      `uffd-broker stats` is the same command.
      """,
    aliases: ["stats"])

  @Option(help: "The broker's control socket (default: UFFD_BROKER_CONTROL_SOCKET, else control.sock in \(SocketPaths.defaultsDescription)).")
  var controlSocket: String?

  @Flag(help: "Print the status as JSON (the format scripts should read).")
  var json = false

  @Option(help: ArgumentHelp("Print it again every SECONDS (0.1 to 3600), with the faults resolved per second since the last one, until interrupted.", valueName: "seconds"))
  var watch: Double?

  func validate() throws {
    if let watch, !(0.1...3600).contains(watch) { throw ValidationError("--watch must be from 0.1 to 3600 seconds") }
  }

  func run() throws {
    let controlSocket: String
    do throws(BrokerError) {
      controlSocket = if let given = self.controlSocket { given } else { try SocketPaths.control }
    } catch {
      FileHandle.standardError.write(Data("uffd-broker status: \(error.message)\n".utf8))
      throw ExitCode(78)
    }
    do {
      var previous: (status: BrokerStatus, at: ContinuousClock.Instant)?
      repeat {
        if json {
          print(String(decoding: try ControlChannel.request(ControlChannel.statusCommand, socketPath: controlSocket), as: UTF8.self))
        } else {
          let status = try ControlChannel.status(socketPath: controlSocket)
          let now = ContinuousClock.now
          if let previous {
            let elapsed = (now - previous.at).components
            let seconds = Double(elapsed.seconds) + Double(elapsed.attoseconds) / 1e18
            let resolved = Double(status.faults.faultsResolved &- previous.status.faults.faultsResolved)
            print("--- \(Int(resolved / max(seconds, 0.001))) faults/s over the last \(String(format: "%.1f", seconds)) s")
          }
          print(Self.describe(status), terminator: "")
          previous = (status, now)
        }
        fflush(nil)  // a watch piped into a pager or a file shows each report as it comes
        if let watch { Thread.sleep(forTimeInterval: watch) }
      } while watch != nil
    } catch {
      FileHandle.standardError.write(Data("uffd-broker status: \(controlSocket): \(error)\n".utf8))
      throw ExitCode(69)
    }
  }

  /// The status for a person: one line per client and plugin, then the counts.
  static func describe(_ status: BrokerStatus) -> String {
    let faults = status.faults
    var text = "broker pid \(status.pid), up \(Int(status.uptimeSeconds)) s\n"
    text += "faults: \(faults.faultsResolved) resolved (\(faults.resolvedLocally) by the broker), \(status.faultsInFlight) in flight, "
    text += "\(status.faultsParked) parked, \(faults.failedClosed) failed closed, \(faults.staleDecisionsDropped) stale decisions dropped\n"
    let latency = status.faultLatencyMicroseconds
    if latency.count > 0 {
      text += "latency (read to fill): p50 \(latency.p50) µs, p90 \(latency.p90) µs, p99 \(latency.p99) µs, max \(latency.max) µs\n"
    }
    text += "clients: \(status.clients.count)\n"
    for client in status.clients {
      let origin = client.parent == 0 ? "pid \(client.pid)" : "forked from client \(client.parent)"
      text += "  \(client.id)  \(origin)  \(client.phase)  \(client.regions) region pieces  \(client.faultsOut) faults out\n"
    }
    text += "plugins: \(status.plugins.count)\n"
    for plugin in status.plugins {
      var state = plugin.state
      if plugin.connectedPID != 0 { state += " (pid \(plugin.connectedPID))" }
      if let fallback = plugin.fallback { state += " to \(fallback)" }
      if plugin.spawnedPID != 0 { state += ", spawned pid \(plugin.spawnedPID)" }
      text += "  \(plugin.name)  \(state)  \(plugin.faultsSent) faults sent, \(plugin.decisionsApplied) decisions applied, \(plugin.faultsInFlight) in flight\n"
    }
    let counts = status.tally.counts.filter { !$0.key.contains(".") }.sorted { $0.key < $1.key }
    if !counts.isEmpty {
      text += "events:\n"
      for (kind, count) in counts {
        let causes = status.tally.counts.filter { $0.key.hasPrefix(kind + ".") }.sorted { $0.key < $1.key }
          .map { "\($0.key.dropFirst(kind.count + 1)) \($0.value)" }
        text += "  \(kind) \(count)\(causes.isEmpty ? "" : " (" + causes.joined(separator: ", ") + ")")\n"
      }
    }
    return text
  }
}
