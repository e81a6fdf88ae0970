import Glibc
import PluginSDK

// snapshot-plugin [NAME] [--prefetch PAGES] [--delegate] [--stats FILE]: serves regions from snapshot files.
// --delegate hands each region to the broker, which then reads the file itself.
var name = "snapshot"
var prefetch = 1
var statsPath: String?
var delegate = false
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
  switch argument {
  case "--prefetch": prefetch = max(arguments.popFirst().flatMap { Int($0) } ?? 1, 1)
  case "--stats": statsPath = arguments.popFirst()
  case "--delegate": delegate = true
  default: name = argument
  }
}
do {
  try PluginRunner.run(SnapshotPlugin(prefetchPages: prefetch, delegate: delegate), name: name, maxPrefetch: max(prefetch, 1) * Int(sysconf(Int32(_SC_PAGESIZE))), statsPath: statsPath)
} catch {
  print("snapshot-plugin: \(error)")
  exit(1)
}
