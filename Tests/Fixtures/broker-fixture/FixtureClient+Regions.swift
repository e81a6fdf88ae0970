import BrokerProtocol
import CLinux
import ClientSDK
import Glibc
import LinuxSupport

extension FixtureClient {
  /// Regions added and removed after registration (BrokerClient.addRegions /
  /// removeRegions): an added region is served with its own backing offset; an
  /// overlapping one is refused; a removed one is plain memory again.
  func addAndRemoveRegions() throws -> Int32 {
    let length = mib << 20
    let first = try AnonymousMemory(length: length)
    let second = try AnonymousMemory(length: length)
    let one = RegionSpec(id: 1, base: first.address, length: length, plugin: plugin)
    let two = RegionSpec(id: 2, base: second.address, length: length, plugin: plugin, backingOffset: UInt64(length))
    let client = try BrokerClient(regions: [one], name: "fixture-regions")
    try client.addRegions([two])
    var refusal = "none"
    do {
      try client.addRegions([RegionSpec(id: 3, base: second.address, length: pageSize, plugin: plugin)])
    } catch {
      refusal = error.broker?.code == .badRegion ? "bad region" : "\(error)"
    }
    // Refused (no such plugin): its range is unregistered again, so a touch reads plain zeros
    // instead of a fault no one serves.
    let third = try AnonymousMemory(length: pageSize)
    let unknown = (try? client.addRegions([RegionSpec(id: 4, base: third.address, length: pageSize, plugin: "no-such-plugin")])) == nil
    let plain = unknown && third.base.load(as: UInt64.self) == 0
    var wrong = 0
    for (memory, backing) in [(first, 0), (second, length)] {
      for page in stride(from: 0, to: length, by: pageSize) {
        _ = clinux_touch(UnsafeRawPointer(bitPattern: memory.address + UInt(page)))
        let bytes = UnsafeRawBufferPointer(start: memory.base + page, count: pageSize)
        if Pattern.mismatch(bytes, backingOffset: UInt64(backing + page)) != nil { wrong += 1 }
      }
    }
    // Removed: dropped pages of region 1 read as plain zero memory, not through the plugin.
    try client.removeRegions([one])
    madvise(first.base, length, MADV_DONTNEED)
    let zeros = (0..<length / pageSize).allSatisfy { page in
      UnsafeRawBufferPointer(start: first.base + page * pageSize, count: pageSize).allSatisfy { $0 == 0 }
    }
    // Region 2 is still served: its plugin hears of this remove, after region 1's close.
    madvise(second.base, pageSize, MADV_DONTNEED)
    withExtendedLifetime(client) {}
    print("regions: added 1, overlap refused: \(refusal), refused range plain: \(plain), verified \(2 * length / pageSize) pages, \(wrong) wrong, removed region reads zeros: \(zeros)")
    return wrong == 0 && zeros && plain ? 0 : 1
  }

  /// A thread faults in region 1 while its plugin holds the fault (LaterPlugin,
  /// later-hold); at SIGUSR1 the client removes region 1 (unregistering it
  /// wakes the thread onto plain memory), then touches and checks region 2
  /// (served; its holes read zeros), prints what it saw and waits for a second
  /// SIGUSR1 before it exits, so the test sees the broker while it lives.
  func removePending() throws -> Int32 {
    var signals = sigset_t()
    sigemptyset(&signals)
    sigaddset(&signals, SIGUSR1)
    pthread_sigmask(SIG_BLOCK, &signals, nil)  // before any thread starts: every thread inherits it
    let length = mib << 20
    let first = try AnonymousMemory(length: length)
    let second = try AnonymousMemory(length: length)
    let one = RegionSpec(id: 1, base: first.address, length: length, plugin: plugin)
    let two = RegionSpec(id: 2, base: second.address, length: length, plugin: plugin, backingOffset: UInt64(length))
    let client = try BrokerClient(regions: [one, two], name: "fixture-remove-pending")
    let address = first.address
    let toucher = spawnThread { _ = clinux_touch(UnsafeRawPointer(bitPattern: address)) }
    var signal: CInt = 0
    sigwait(&signals, &signal)
    try client.removeRegions([one])
    pthread_join(toucher, nil)
    var wrong = 0
    for page in stride(from: 0, to: length, by: pageSize) {
      _ = clinux_touch(UnsafeRawPointer(bitPattern: second.address + UInt(page)))
      let bytes = UnsafeRawBufferPointer(start: second.base + page, count: pageSize)
      let backing = UInt64(length + page)
      let bad = Pattern.isHole(backingOffset: backing) ? bytes.contains { $0 != 0 } : Pattern.mismatch(bytes, backingOffset: backing) != nil
      if bad { wrong += 1 }
    }
    print("removed region 1 with its fault pending; verified \(length / pageSize) pages of region 2, \(wrong) wrong")
    fflush(nil)
    sigwait(&signals, &signal)
    withExtendedLifetime(client) {}
    return wrong == 0 ? 0 : 1
  }
}
