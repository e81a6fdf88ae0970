import Glibc
import PluginSDK

// snapshot-plugin [NAME] [--prefetch PAGES]: serves regions from snapshot files.
var name = "snapshot"
var prefetch = 1
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
  if argument == "--prefetch", let value = arguments.popFirst().flatMap({ Int($0) }), value > 0 {
    prefetch = value
  } else {
    name = argument
  }
}
do {
  try PluginRunner.run(SnapshotPlugin(prefetchPages: prefetch), name: name)
} catch {
  print("snapshot-plugin: \(error)")
  exit(1)
}
