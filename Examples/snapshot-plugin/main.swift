import Glibc
import PluginSDK

// snapshot-plugin [NAME] [--prefetch PAGES] [--stats FILE]: serves regions from snapshot files.
var name = "snapshot"
var prefetch = 1
var statsPath: String?
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
  switch argument {
  case "--prefetch": prefetch = max(arguments.popFirst().flatMap { Int($0) } ?? 1, 1)
  case "--stats": statsPath = arguments.popFirst()
  default: name = argument
  }
}
do {
  try PluginRunner.run(SnapshotPlugin(prefetchPages: prefetch), name: name, maxPrefetch: max(prefetch, 1) * Int(sysconf(Int32(_SC_PAGESIZE))), statsPath: statsPath)
} catch {
  print("snapshot-plugin: \(error)")
  exit(1)
}
