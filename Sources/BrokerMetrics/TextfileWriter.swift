import Glibc

/// Writes the metrics for node_exporter's textfile collector: into
/// `PATH.tmp` beside the file, then renamed over it, so a scrape never reads
/// half a file (node_exporter reads only `*.prom`, never the temp file).
struct TextfileWriter: Sendable {
  let path: String

  func write(_ bytes: [UInt8]) throws(MetricsError) {
    let temporary = path + ".tmp"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw MetricsError("cannot write metrics textfile \(temporary): \(String(cString: strerror(errno)))") }
    var written = 0
    var failure: Int32 = 0
    bytes.withUnsafeBytes { raw in
      while written < raw.count {
        let count = Glibc.write(fd, raw.baseAddress! + written, raw.count - written)
        if count < 0 && errno == EINTR { continue }
        guard count > 0 else {
          failure = errno
          return
        }
        written += count
      }
    }
    close(fd)
    guard failure == 0 else {
      unlink(temporary)
      throw MetricsError("cannot write metrics textfile \(temporary): \(String(cString: strerror(failure)))")
    }
    guard rename(temporary, path) == 0 else {
      let reason = String(cString: strerror(errno))
      unlink(temporary)
      throw MetricsError("cannot rename \(temporary) to \(path): \(reason)")
    }
  }
}
