import Glibc
import PluginSDK

// swap-plugin [NAME] [--stats FILE] [--corrupt-offset N]: keeps swapped-out pages compressed.
var name = "swap"
var statsPath: String?
var corruptOffset: UInt64?
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
  switch argument {
  case "--stats": statsPath = arguments.popFirst()
  case "--corrupt-offset": corruptOffset = arguments.popFirst().flatMap { UInt64($0) }
  default: name = argument
  }
}
do {
  try PluginRunner.run(SwapPlugin(corruptOffset: corruptOffset), name: name, statsPath: statsPath)
} catch {
  print("swap-plugin: \(error)")
  exit(1)
}
