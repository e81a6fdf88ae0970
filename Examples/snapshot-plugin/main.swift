import BrokerProtocol
import Glibc
import PluginSDK

// snapshot-plugin [NAME] [--root DIR]... [--prefetch PAGES] [--delegate] [--stats FILE]: serves regions
// from snapshot files. A region's argument is the file's absolute path, which must lie beneath a
// --root directory (no symlinks on the way) and be readable by the client's uid; without --root
// every file is refused. --delegate hands each region to the broker, which then reads the
// descriptor the plugin opened.
var name = "snapshot"
var prefetch = 1
var statsPath: String?
var delegate = false
var roots: [String] = []
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
  switch argument {
  case "--prefetch": prefetch = max(arguments.popFirst().flatMap { Int($0) } ?? 1, 1)
  case "--stats": statsPath = arguments.popFirst()
  case "--delegate": delegate = true
  case "--root":
    guard let root = arguments.popFirst() else {
      logLine("--root needs a directory")
      exit(2)
    }
    roots.append(root)
  default: name = argument
  }
}
do {
  let files = try ClientFiles(roots: roots)
  if roots.isEmpty { logLine("no --root given: every snapshot file will be refused") }
  try PluginRunner.run(SnapshotPlugin(prefetchPages: prefetch, delegate: delegate, files: files), name: name, maxPrefetch: max(prefetch, 1) * Int(sysconf(Int32(_SC_PAGESIZE))), statsPath: statsPath)
} catch {
  print("snapshot-plugin: \(error)")
  exit(1)
}
