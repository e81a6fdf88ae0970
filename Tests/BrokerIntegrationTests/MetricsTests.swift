import BrokerProtocol
import Foundation
import Glibc
import Testing

extension BrokerIntegrationTests {
  /// Issue 14: live metrics on /metrics and in a node_exporter textfile.
  @Suite("Metrics")
  struct Metrics {
    @Test("Metrics on 127.0.0.1:0 and in a textfile: after a client faulted pages through a plugin, /metrics and the textfile say what the status says, in total and per plugin, with latency quantiles")
    func metricsMatchStatus() throws {
      var template = Array("/tmp/uffd-it-metrics-textfile-XXXXXX".utf8CString)
      let textfileDirectory = String(cString: try #require(mkdtemp(&template)))
      let textfile = textfileDirectory + "/uffd-broker.prom"
      defer { unlink(textfile); rmdir(textfileDirectory) }
      let metrics = #""metrics": {"listen": "127.0.0.1:0", "textfile": \#(jsonString(textfile)), "intervalMilliseconds": 100}"#
      try Harness.run("metrics", configFields: [metrics]) { h in
        // Port 0: the status says which port the broker bound.
        let listen = try #require(try h.status().metricsListen, h.diagnostics)
        #expect(listen.hasPrefix("127.0.0.1:") && !listen.hasSuffix(":0"), h.diagnostics(listen))
        #expect(h.brokerLog.contains("metrics.listen=\(listen)"), h.diagnostics)
        let port = try #require(UInt16(listen.split(separator: ":").last ?? ""), h.diagnostics(listen))

        try h.startPlugin(name: "pattern", mode: "pattern")
        let outcome = try h.runClient("touch", mib: 8, threads: 2, plugin: "pattern")
        #expect(outcome.status == .exited(0) && outcome.summary == "verified \(pages(mib: 8)) pages, 0 wrong", h.diagnostics(outcome.stdout + outcome.stderr))
        // The client is gone: its figures are final.
        #expect(h.waitForStatus { $0.clients.isEmpty }, h.diagnostics)
        let status = try h.status()
        let plugin = try #require(status.plugin("pattern"), h.diagnostics)
        #expect(status.faults.faultsSent >= pages(mib: 8) && plugin.faultsSent == UInt64(status.faults.faultsSent), h.diagnostics("\(status.faults)"))

        // The exporter shows the snapshot of the last interval: poll until it caught up.
        var scraped = Exposition("")
        let caughtUp = waitUntil(timeout: 10, interval: 0.05) {
          scraped = Exposition(httpGet(port: port, path: "/metrics") ?? "")
          return scraped["uffd_broker_faults_sent_total"] == Double(status.faults.faultsSent) && scraped["uffd_broker_clients"] == 0
        }
        #expect(caughtUp, h.diagnostics(scraped.text))
        #expect(scraped["uffd_broker_faults_resolved_total"] == Double(status.faults.faultsResolved), h.diagnostics(scraped.text))
        #expect(scraped["uffd_broker_decisions_applied_total", ["kind": "copy"]] == Double(status.faults.decisionsAppliedByKind.copy), h.diagnostics(scraped.text))
        #expect(status.faults.decisionsAppliedByKind.copy == UInt64(status.faults.decisionsApplied), h.diagnostics("\(status.faults)"))
        #expect(scraped["uffd_broker_faults_in_flight"] == 0 && scraped["uffd_broker_faults_parked"] == 0, h.diagnostics(scraped.text))
        // Per plugin, labelled.
        let labels = ["plugin": "pattern"]
        #expect(scraped["uffd_broker_plugin_faults_sent_total", labels] == Double(plugin.faultsSent), h.diagnostics(scraped.text))
        #expect(scraped["uffd_broker_plugin_decisions_applied_total", ["plugin": "pattern", "kind": "copy"]] == Double(plugin.decisionsApplied), h.diagnostics(scraped.text))
        #expect(scraped["uffd_broker_plugin_up", labels] == 1, h.diagnostics(scraped.text))
        // Latency: the status's percentiles as summary quantiles, in seconds, and their count.
        let latency = status.faultLatencyMicroseconds
        #expect(scraped["uffd_broker_fault_latency_observations_total"] == Double(latency.count) && latency.count > 0, h.diagnostics(scraped.text))
        for (quantile, microseconds) in [("0.5", latency.p50), ("0.9", latency.p90), ("0.99", latency.p99), ("1", latency.max)] {
          #expect(scraped["uffd_broker_fault_latency_seconds", ["quantile": quantile]] == Double(microseconds) / 1e6, h.diagnostics(quantile + "\n" + scraped.text))
        }
        #expect((scraped["uffd_broker_open_descriptors"] ?? 0) > 0 && (scraped["uffd_broker_descriptor_limit"] ?? 0) >= (scraped["uffd_broker_open_descriptors"] ?? 0), h.diagnostics(scraped.text))
        #expect(httpGet(port: port, path: "/other")?.isEmpty == true, h.diagnostics("only /metrics is served"))

        // The textfile, rewritten each interval, says the same.
        var written = Exposition("")
        #expect(waitUntil(timeout: 10, interval: 0.05) {
          written = Exposition(readTextFile(textfile))
          return written["uffd_broker_faults_sent_total"] == Double(status.faults.faultsSent) && written["uffd_broker_clients"] == 0
        }, h.diagnostics(written.text))
        #expect(written["uffd_broker_plugin_faults_sent_total", labels] == Double(plugin.faultsSent), h.diagnostics(written.text))
        #expect(written["uffd_broker_fault_latency_seconds", ["quantile": "0.99"]] == Double(latency.p99) / 1e6, h.diagnostics(written.text))
        #expect(access(textfile + ".tmp", F_OK) != 0, h.diagnostics("the temp file is renamed, not left"))
      }
    }

    @Test("check-config refuses a metrics address that is not loopback, naming the field")
    func nonLoopbackRefused() throws {
      try Harness.run("metrics-config") { h in
        for (index, listen) in ["0.0.0.0:9464", "192.168.1.1:9464", "[::]:9464", "localhost", "127.0.0.1:70000"].enumerated() {
          let path = h.directory + "/metrics-\(index).json"
          try writeTextFile(path, #"{"metrics": {"listen": \#(jsonString(listen))}}"#)
          let check = try FixtureProcess(
            label: "check-metrics-\(index)", executable: Harness.brokerExecutable, arguments: ["check-config", path], environment: [:],
            stdoutPath: h.directory + "/check-metrics-\(index).stdout", stderrPath: h.directory + "/check-metrics-\(index).stderr")
          #expect(check.wait(timeout: 10) == .exited(78), h.diagnostics(check.stdout + check.stderr))
          #expect(check.stderr.contains("metrics.listen \"\(listen)\"") && check.stderr.contains("loopback"), h.diagnostics(check.stderr))
        }
        let good = h.directory + "/metrics-good.json"
        try writeTextFile(good, #"{"metrics": {"listen": "[::1]:9464", "intervalMilliseconds": 500}}"#)
        let check = try FixtureProcess(label: "check-metrics-good", executable: Harness.brokerExecutable, arguments: ["check-config", good], environment: [:],
                                       stdoutPath: h.directory + "/check-good.stdout", stderrPath: h.directory + "/check-good.stderr")
        #expect(check.wait(timeout: 10) == .exited(0) && check.stdout.contains("metrics: http://[::1]:9464/metrics"), h.diagnostics(check.stdout + check.stderr))
      }
    }
  }
}

/// A Prometheus text exposition, read back: each sample by name and labels.
struct Exposition {
  let text: String
  private var samples: [String: [([String: String], Double)]] = [:]

  init(_ text: String) {
    self.text = text
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
      guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
      let series = line[..<space]
      var labels: [String: String] = [:]
      var name = String(series)
      if let brace = series.firstIndex(of: "{") {
        name = String(series[..<brace])
        for pair in series[series.index(after: brace)..<series.index(before: series.endIndex)].split(separator: ",") {
          let parts = pair.split(separator: "=", maxSplits: 1)
          if parts.count == 2 { labels[String(parts[0])] = String(parts[1].dropFirst().dropLast()) }
        }
      }
      samples[name, default: []].append((labels, value))
    }
  }

  /// The sample of `name` with exactly `labels`.
  subscript(_ name: String, _ labels: [String: String] = [:]) -> Double? {
    samples[name]?.first { $0.0 == labels }?.1
  }
}

/// The body of `GET path` on 127.0.0.1:`port` over a plain socket (HTTP/1.1,
/// Connection: close); "" for a status other than 200, nil when it cannot connect.
func httpGet(port: UInt16, path: String) -> String? {
  let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
  guard fd >= 0 else { return nil }
  defer { close(fd) }
  var timeout = timeval(tv_sec: 5, tv_usec: 0)
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
  var address = sockaddr_in()
  address.sin_family = sa_family_t(AF_INET)
  address.sin_port = port.bigEndian
  address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
  let connected = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
  guard connected == 0 else { return nil }
  let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8)
  guard send(fd, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else { return nil }
  var response: [UInt8] = []
  var buffer = [UInt8](repeating: 0, count: 65536)
  while true {
    let count = recv(fd, &buffer, buffer.count, 0)
    if count < 0 && errno == EINTR { continue }
    guard count > 0 else { break }
    response += buffer[..<count]
  }
  let text = String(decoding: response, as: UTF8.self)
  guard let headerEnd = text.range(of: "\r\n\r\n") else { return nil }
  return text.hasPrefix("HTTP/1.1 200 ") ? String(text[headerEnd.upperBound...]) : ""
}
