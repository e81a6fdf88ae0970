import Glibc
import PluginSDK

// swap-plugin [NAME] [--stats FILE] [--corrupt-offset N] [--state-dir DIR]: keeps swapped-out
// pages compressed: in memfds the broker keeps for it (they survive the plugin), or with
// --state-dir in files there (they also survive the broker; DIR is made if missing, 0700).
var name = "swap"
var statsPath: String?
var corruptOffset: UInt64?
var stateDirectory: String?
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
  switch argument {
  case "--stats": statsPath = arguments.popFirst()
  case "--corrupt-offset": corruptOffset = arguments.popFirst().flatMap { UInt64($0) }
  case "--state-dir": stateDirectory = arguments.popFirst()
  default: name = argument
  }
}
do {
  if let stateDirectory { mkdir(stateDirectory, 0o700) }
  try PluginRunner.run(SwapPlugin(corruptOffset: corruptOffset, stateDirectory: stateDirectory), name: name, statsPath: statsPath)
} catch {
  print("swap-plugin: \(error)")
  exit(1)
}
