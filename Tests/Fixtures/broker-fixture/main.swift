import BrokerProtocol
import ClientSDK
import Glibc
import PluginSDK
import Userfaultfd

// broker-fixture: the plugin and client processes of the integration tests.
//   broker-fixture plugin NAME MODE [EVENT_LOG]
//   broker-fixture client SCENARIO MIB THREADS PLUGIN [LOOPS]
//   broker-fixture kvm-snapshot PATH MIB (the KVM guest's memory image; see GuestImage)
//   broker-fixture kvm-vmm|kvm-vmm-balloon|kvm-vmm-huge SOCKET SNAPSHOT MIB (restores that guest on /dev/kvm; see KVMGuestVMM)
//   broker-fixture squatter PATH CONNECTIONS (as nobody: a fake broker; see Squatter)
//   broker-fixture vmm|vmm-huge|vmm-garbage|vmm-no-remove SOCKET SNAPSHOT MIB THREADS (a Firecracker-style VMM; see FakeVMM)
// Plugin modes are listed on FixturePlugin (later, later-hold: on LaterPlugin); client scenarios: touch, touch-holes, remove-pending, zero,
// dontneed-race and dontneed-late (LOOPS pages), remap, unknown-plugin, refused, exit-midway,
// guarded (LOOPS pages between guard regions), foreign-uid (as nobody: must be refused), deputy (as nobody: a file it cannot read named to PLUGIN),
// handoff (the connection handed to a child, the connecting process gone), shm-clone (a MAP_PRIVATE clone of the tmpfs file FIXTURE_SHM).
// Socket paths come from UFFD_BROKER_CLIENT_SOCKET / UFFD_BROKER_PLUGIN_SOCKET.
// Exit status 0 means every checked byte was right; the last line of stdout says what was checked.

let arguments = CommandLine.arguments
/// Runs a VMM's `body` for at most 120 s (never outliving a test that forgot
/// it); an error is printed as `label failed: ...`, exit status 2.
func runVMM(_ label: String, _ body: () throws -> Int32) -> Int32 {
  alarm(120)
  do {
    return try body()
  } catch {
    print("\(label) failed: \(error)")
    return 2
  }
}

func fail(_ message: String) -> Never {
  var line = "broker-fixture: \(message)\n"
  line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
  exit(1)
}

guard arguments.count >= 2 else { fail("usage: broker-fixture plugin|client ...") }
switch arguments[1] {
case "plugin":
  guard arguments.count >= 4 else { fail("usage: broker-fixture plugin NAME MODE [EVENT_LOG]") }
  let eventLog = arguments.count > 4 ? arguments[4] : nil
  do {
    if arguments[3].hasPrefix("later") {
      try PluginRunner.run(LaterPlugin(mode: arguments[3], eventLogPath: eventLog), name: arguments[2], statsPath: eventLog.map { $0 + ".stats" })
    } else {
      try PluginRunner.run(FixturePlugin(mode: arguments[3], eventLogPath: eventLog), name: arguments[2])
    }
  } catch {
    fail("plugin: \(error)")
  }
case "client":
  guard arguments.count >= 6, let mib = Int(arguments[3]), let threads = Int(arguments[4]) else {
    fail("usage: broker-fixture client SCENARIO MIB THREADS PLUGIN [LOOPS]")
  }
  let loops = arguments.count > 6 ? Int(arguments[6]) ?? 1 : 1
  let status = FixtureClient(scenario: arguments[2], mib: mib, threads: threads, plugin: arguments[5], loops: loops).run()
  fflush(nil)
  exit(status)
case "vmm", "vmm-huge", "vmm-garbage", "vmm-no-remove":
  guard arguments.count == 6, let mib = Int(arguments[4]), let threads = Int(arguments[5]) else { fail("usage: broker-fixture vmm SOCKET SNAPSHOT MIB THREADS") }
  let status = FakeVMM(scenario: arguments[1], socketPath: arguments[2], snapshotPath: arguments[3], mib: mib, threads: threads).run()
  fflush(nil)
  exit(status)
case "kvm-snapshot":
  guard arguments.count == 4, let mib = Int(arguments[3]), let image = GuestImage(mib: mib) else { fail("usage: broker-fixture kvm-snapshot PATH MIB (8–128, a multiple of 8)") }
  do {
    try image.write(to: arguments[2])
  } catch {
    fail("kvm-snapshot: \(error)")
  }
case "kvm-vmm", "kvm-vmm-balloon", "kvm-vmm-huge":
  guard arguments.count == 5, let mib = Int(arguments[4]), let image = GuestImage(mib: mib) else { fail("usage: broker-fixture kvm-vmm SOCKET SNAPSHOT MIB") }
  let status = KVMGuestVMM(socketPath: arguments[2], snapshotPath: arguments[3], image: image, balloon: arguments[1] == "kvm-vmm-balloon",
                           hugePages: arguments[1] == "kvm-vmm-huge").run()
  fflush(nil)
  exit(status)
case "squatter":
  guard arguments.count == 4, let connections = Int(arguments[3]) else { fail("usage: broker-fixture squatter PATH CONNECTIONS") }
  let status = Squatter(path: arguments[2], connections: connections).run()
  fflush(nil)
  exit(status)
default:
  fail("unknown role \(arguments[1])")
}
