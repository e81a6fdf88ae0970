// libFuzzer target over the four protocol decoders (scripts/fuzz.sh builds it
// with -sanitize=fuzzer and -DFUZZING; a plain `swift build` makes the replay
// runner below instead).
//
// One input is one packet for one decoder:
//
//   byte 0, bits 0-1: which socket direction decodes the rest
//       0  ClientToBroker  ClientWire.decodeRequest       (the broker, from a client)
//       1  BrokerToClient  ClientWire.decodeReply         (the client SDK, from the broker)
//       2  PluginToBroker  DecisionBatchDecoder           (the broker, from a plugin)
//       3  BrokerToPlugin  EventBatchDecoder              (the plugin SDK, from the broker)
//   byte 0, bits 2-4: how many descriptors "arrived" with a PluginToBroker
//       packet (fake numbers, which file delegations name by index)
//   bytes 1...: the packet, as received (at most PacketSocket.maxPacketSize)
//
// Every accessor of a decoded packet is read, every item (decision, event,
// reply, delegation) on its own, so a packet that decodes but is malformed
// inside goes through all the checks. A thrown BrokerError is the expected
// answer to bad input; a trap, a crash or a sanitizer report is a bug.
//
// What decodes is then re-encoded with the real encoders (ClientWire.encode,
// EventBatchEncoder, DecisionBatchEncoder) and decoded again: the values must
// come back equal. So a decoded value the encoders cannot carry, or a field
// the two sides read differently, is a bug too.
//
// Mutation: half libFuzzer's byte-level mutations, half `WireMutator`, which
// parses the packet as protobuf (no schema needed) and sets a number to a
// type's edge (2^31, 2^32-1, 2^63, ...), repeats, drops, renumbers or moves a
// field: byte flips almost never turn a 1-byte varint into a valid 10-byte one.
//
// Seeds (`--write-seeds DIR`): valid packets of every message type from the
// real encoders, each also "wide" (every varint in its 10-byte form).
import BrokerProtocol
import Glibc

// MARK: - Long-lived decoders, as in the broker and the SDKs

// The broker reuses one arena for every client packet and one decoder for
// every plugin packet; the SDKs likewise. Keeping them across inputs tests
// reset() between decodes. The sizes are the ones the real code uses.
nonisolated(unsafe) private let requestArena = WireArena(capacity: 1 << 20)   // BrokerRuntime/BrokerRuntime.swift
nonisolated(unsafe) private let replyArena = WireArena(capacity: 64 << 10)    // ClientSDK/Connection.swift
nonisolated(unsafe) private let decisionDecoder = DecisionBatchDecoder()     // BrokerRuntime/BrokerRuntime.swift
nonisolated(unsafe) private let eventDecoder = EventBatchDecoder()           // PluginSDK/PluginRunner.swift

// The round trip's own encoders and decoders (the ones above stay valid while
// they run: decisions borrow their bytes from the packet or `decisionDecoder`'s arena).
nonisolated(unsafe) private let checkArena = WireArena()
nonisolated(unsafe) private let checkDecisions = DecisionBatchDecoder()
nonisolated(unsafe) private let checkEvents = EventBatchDecoder()
nonisolated(unsafe) private let eventEncoder = EventBatchEncoder()
nonisolated(unsafe) private let decisionEncoder = DecisionBatchEncoder()
/// Re-encoded packets may exceed the 256 KiB packet limit (invalid UTF-8 in a
/// string is repaired to U+FFFD, 3 bytes), so the round trip packs into more.
nonisolated(unsafe) private let packBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)
/// Packets that decoded (the replay checks that every seed still does).
nonisolated(unsafe) private var packetsDecoded = 0
/// Stand-ins for the descriptors of a packet (never used as descriptors).
private let fakeDescriptors: [CInt] = [1000, 1001, 1002, 1003, 1004, 1005, 1006]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
  let input = UnsafeRawBufferPointer(start: data, count: size)
  guard let selector = input.first else { return 0 }
  let packet = UnsafeRawBufferPointer(rebasing: input[1...])
  switch selector & 3 {
  case 0: clientToBroker(packet)
  case 1: brokerToClient(packet)
  case 2: pluginToBroker(packet, descriptors: Array(fakeDescriptors.prefix(Int(selector >> 2) & 7)))
  default: brokerToPlugin(packet)
  }
  return 0
}

private func check(_ condition: Bool, _ message: @autoclosure () -> String) {
  if !condition { fatalError("uffd-fuzz: \(message())") }
}

/// A value with all its fields (BrokerError's description shows only its message).
private func show<T>(_ value: T) -> String {
  var text = ""
  dump(value, to: &text)
  return text
}

// MARK: - Client socket

private func clientToBroker(_ packet: UnsafeRawBufferPointer) {
  let request: ClientRequest
  do { request = try ClientWire.decodeRequest(packet, arena: requestArena) } catch { return }
  packetsDecoded += 1
  let bytes = ClientWire.encode(request)
  let again = bytes.withUnsafeBytes { (b) -> Result<ClientRequest, BrokerError> in
    Result { () throws(BrokerError) in try ClientWire.decodeRequest(b, arena: checkArena) }
  }
  check(again == .success(request), "ClientToBroker round trip: \(show(request)) came back as \(show(again))")
}

private func brokerToClient(_ packet: UnsafeRawBufferPointer) {
  let reply: BrokerReply
  do { reply = try ClientWire.decodeReply(packet, arena: replyArena) } catch { return }
  packetsDecoded += 1
  let bytes = ClientWire.encode(reply)
  let again = bytes.withUnsafeBytes { (b) -> Result<BrokerReply, BrokerError> in
    Result { () throws(BrokerError) in try ClientWire.decodeReply(b, arena: checkArena) }
  }
  check(again == .success(reply), "BrokerToClient round trip: \(show(reply)) came back as \(show(again))")
}

// MARK: - Plugin socket, broker side

private func pluginToBroker(_ packet: UnsafeRawBufferPointer, descriptors: [CInt]) {
  let decoder = decisionDecoder
  do { try decoder.decode(packet) } catch { return }
  packetsDecoded += 1
  // What the broker reads, in its order (Broker.handlePluginMessage), but every
  // item even after a bad one.
  let hello = Result { () throws(BrokerError) in try decoder.hello }
  var decisions: [DecodedDecision] = []
  var checksum: UInt8 = 0
  for index in 0..<decoder.decisionCount {
    guard let decision = decoder.decision(at: index) else { continue }
    for byte in decision.data { checksum &+= byte }  // every byte of the payload is readable
    decisions.append(decision)
  }
  check(decoder.decision(at: decoder.decisionCount) == nil, "a decision past the end")
  let regionReplies = (try? decoder.regionReplies) ?? []
  let storeReplies = decoder.storeReplies
  let keepNames = (try? decoder.keepNames) ?? []
  let delegations = Result { () throws(BrokerError) in try decoder.delegations(descriptorCount: descriptors.count) }
  if case .success(let list) = delegations {
    let files = list.compactMap(\.fileIndex)
    check(files == Array(files.indices), "file delegations took descriptors \(files) of \(descriptors.count)")
  }
  _ = Result { () throws(BrokerError) in try decoder.delegations(descriptorCount: 0) }
  blackHole(checksum)

  // Round trip: the same hello, replies, delegations and (known-kind)
  // decisions, re-encoded in as many packets as the encoder needs.
  let encoder = decisionEncoder
  if case .success(let hello?) = hello { encoder.setHello(hello) }
  regionReplies.forEach(encoder.append)
  storeReplies.forEach(encoder.append)
  for name in keepNames { encoder.keep(-1, as: name) }
  let expectedDelegations = (try? delegations.get()) ?? []
  for received in expectedDelegations { encoder.append(received.delegation, file: received.fileIndex.map { descriptors[$0] }) }
  var first = true
  var pending: [DecodedDecision] = []
  func flush() {
    let length = encoder.encode(into: packBuffer)
    let sent = encoder.descriptors
    do { try checkDecisions.decode(UnsafeRawBufferPointer(rebasing: packBuffer[..<length])) } catch {
      fatalError("uffd-fuzz: a re-encoded PluginToBroker does not decode: \(error)")
    }
    let back = (0..<checkDecisions.decisionCount).compactMap { checkDecisions.decision(at: $0) }
    // The same decisions; a packet's Decision messages come before its Decisions arrays, so not always in the same order.
    let same = back.count == pending.count && pending.allSatisfy { back.contains($0) } && back.allSatisfy { pending.contains($0) }
    check(same, "decisions round trip: \(pending.count) came back as \(back.count) different ones")
    if first {
      check((try? checkDecisions.hello) == (try? hello.get()), "PluginToBroker hello round trip: \(show(hello)) came back as \(show(Result { () throws(BrokerError) in try checkDecisions.hello }))")
      let backReplies = (try? checkDecisions.regionReplies) ?? []
      check(backReplies == regionReplies, "region replies round trip: \(show(regionReplies)) came back as \(show(backReplies))")
      check(((try? checkDecisions.keepNames) ?? []) == keepNames, "descriptor store names round trip: \(keepNames)")
      check(checkDecisions.storeReplies == storeReplies, "store replies round trip: \(show(storeReplies)) came back as \(show(checkDecisions.storeReplies))")
      let backDelegations = Result { () throws(BrokerError) in try checkDecisions.delegations(descriptorCount: sent.count) }
      check(backDelegations == .success(expectedDelegations), "delegations round trip: \(show(expectedDelegations)) came back as \(show(backDelegations))")
    }
    first = false
    pending.removeAll(keepingCapacity: true)
  }
  for decision in decisions {
    guard let kind = decision.kind else { continue }  // the broker refuses it; the encoder cannot say it
    if !encoder.canAppend(dataLength: decision.data.count), encoder.count > 0 { flush() }
    guard encoder.canAppend(dataLength: decision.data.count) else { continue }
    encoder.append(faultID: decision.faultID, kind: kind, address: decision.address, length: decision.length,
                   data: decision.data.isEmpty ? nil : decision.data, sharedOffset: decision.sharedOffset)
    pending.append(decision)
  }
  if first || !encoder.isEmpty { flush() }
}

// MARK: - Plugin socket, plugin side

private func brokerToPlugin(_ packet: UnsafeRawBufferPointer) {
  let decoder = eventDecoder
  do { try decoder.decode(packet) } catch { return }
  packetsDecoded += 1
  // What PluginRunner reads, but every event even after a bad one.
  let hello = Result { () throws(BrokerError) in try decoder.hello }
  let error = decoder.error
  let applied = decoder.packetsApplied
  let kept = (try? decoder.keptNames) ?? []
  var events: [BrokerEvent] = []
  for index in 0..<decoder.eventCount {
    if let event = try? decoder.event(at: index) { events.append(event) }
  }
  check((try? decoder.event(at: decoder.eventCount)) == nil, "an event past the end")

  // Round trip: the control part, then the events in as many packets as needed.
  let control = EventBatchEncoder.encodeControl(hello: try? hello.get(), error: error, kept: kept)
  control.withUnsafeBytes { bytes in
    do { try checkEvents.decode(bytes) } catch { fatalError("uffd-fuzz: a re-encoded control BrokerToPlugin does not decode: \(error)") }
  }
  check((try? checkEvents.keptNames) == kept, "BrokerToPlugin kept names round trip: \(kept) came back as \(String(describing: try? checkEvents.keptNames))")
  check((try? checkEvents.hello) == (try? hello.get()), "BrokerToPlugin hello round trip: \(show(hello)) came back as \(show(Result { () throws(BrokerError) in try checkEvents.hello }))")
  check(checkEvents.error == error, "BrokerToPlugin error round trip: \(show(error)) came back as \(show(checkEvents.error))")

  let encoder = eventEncoder
  encoder.packetsApplied = applied
  var pending: [BrokerEvent] = []
  func flush() {
    let length = encoder.encode(into: packBuffer)
    do { try checkEvents.decode(UnsafeRawBufferPointer(rebasing: packBuffer[..<length])) } catch {
      fatalError("uffd-fuzz: a re-encoded event batch does not decode: \(error)")
    }
    check(checkEvents.packetsApplied == applied, "packets_applied round trip")
    check(checkEvents.eventCount == pending.count, "event count round trip: \(pending.count) came back as \(checkEvents.eventCount)")
    for (index, event) in pending.enumerated() {
      let back = Result { () throws(BrokerError) in try checkEvents.event(at: index) }
      check(back == .success(event), "event round trip: \(show(event)) came back as \(show(back))")
    }
    pending.removeAll(keepingCapacity: true)
  }
  for event in events {
    if !encoder.hasRoom(for: event) {
      if !encoder.isEmpty { flush() }
      guard encoder.hasRoom(for: event) else { continue }  // a store too large for any packet
    }
    encoder.append(event)
    pending.append(event)
  }
  if !encoder.isEmpty { flush() }
}

@inline(never)
private func blackHole<T>(_ value: T) { withExtendedLifetime(value) {} }

// MARK: - Replay, seeds

/// Files for the replay runner and the seed writer.
enum Files {
  static func fail(_ message: String) -> Never {
    var line = message + "\n"
    _ = line.withUTF8 { write(2, $0.baseAddress, $0.count) }
    exit(2)
  }

  static func entries(of directory: String) -> [String] {
    guard let dir = opendir(directory) else { fail("cannot open \(directory)") }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
      if name != "." && name != ".." && !name.hasPrefix(".") { names.append(directory + "/" + name) }
    }
    return names.sorted()
  }

  static func readFile(_ path: String) -> [UInt8] {
    guard let file = fopen(path, "rb") else { fail("cannot open \(path)") }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 64 << 10)
    while true {
      let read = fread(&chunk, 1, chunk.count, file)
      bytes += chunk[..<read]
      if read < chunk.count { break }
    }
    return bytes
  }

  static func writeFile(_ path: String, _ bytes: [UInt8]) {
    guard let file = fopen(path, "wb") else { fail("cannot write \(path)") }
    defer { fclose(file) }
    guard fwrite(bytes, 1, bytes.count, file) == bytes.count else { fail("cannot write \(path)") }
  }
}

/// Valid packets of every message type, made by the real encoders: the seeds
/// of Tests/Fuzz/corpus (scripts/fuzz.sh rewrites them before each run).
enum Seeds {
  static func write(to directory: String) {
    mkdir(directory, 0o755)
    var written = 0
    // Each packet twice: as encoded, and "wide", every varint in its 10-byte
    // form, so that flipping one bit of a byte gives a value past Int.max,
    // UInt32.max or Int32.max (the encoders never write such values).
    func seed(_ name: String, _ selector: UInt8, _ packet: [UInt8]) {
      Files.writeFile(directory + "/seed-" + name, [selector] + packet)
      written += 1
      if let wide = widen(packet[...]), wide != packet {
        Files.writeFile(directory + "/seed-" + name + "-wide", [selector] + wide)
        written += 1
      }
    }
    let page = 4096
    let regionA = RegionSpec(id: 1, base: 0x7f00_0000_0000, length: 16 * page, pageSize: page, plugin: "snapshot", argument: "/var/lib/image.bin", backingOffset: 8192)
    // As a client re-attaching names it: moved in two pieces, with pages swapped out.
    let movedA = RegionSpec(id: 1, base: 0x7f00_0000_0000, length: 16 * page, pageSize: page, plugin: "swap", swappedOut: [0..<8192, 16384..<65536],
                            pieces: [RegionPiece(address: 0x7f00_0000_0000, offset: 0, length: 8 * page), RegionPiece(address: 0x7f20_0000_0000, offset: 32768, length: 8 * page)],
                            dropped: [8192..<16384], unknown: [40960..<49152])
    let regionB = RegionSpec(id: 2, base: 0x7f00_0100_0000, length: 2 << 20, pageSize: 2 << 20, plugin: "zero-fill")

    // ClientToBroker
    let requests: [(String, ClientRequest.Body)] = [
      ("hello", .hello(Hello(role: .client, name: "demo-client"))),
      ("register", .register(RegisterRequest(pid: 4242, features: .init(rawValue: 0x1ff), ioctls: .init(rawValue: 0x3f), regions: [regionA, regionB]))),
      ("register-moved", .register(RegisterRequest(pid: 4242, features: .init(rawValue: 0x1ff), ioctls: .init(rawValue: 0x3f), regions: [movedA],
                                                   token: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3211))),
      ("add-regions", .addRegions([regionB])),
      ("remove-regions", .removeRegions([1, 2, 77])),
      ("swap-out", .swapOut(regionID: 1, offset: 4096, length: 8 * page)),
      ("swap-out-data", .swapOutData(regionID: 1, offset: 4096, data: (0..<(2 * page)).map { UInt8(truncatingIfNeeded: $0 &* 31) })),
      ("swap-out-done", .swapOutDone(regionID: 1, offset: 4096, length: 8 * page)),
    ]
    for (index, (name, body)) in requests.enumerated() {
      seed("c2b-" + name, 0, ClientWire.encode(ClientRequest(requestID: UInt64(index + 1), body)))
    }

    // BrokerToClient
    let replies: [(String, BrokerReply.Body)] = [
      ("hello", .hello(Hello(role: .broker, name: "uffd-broker"))),
      ("ack", .ack(clientID: 7)),
      ("ack-busy", .ack(clientID: 7, busyOffsets: [0, 4096, 65536])),
      ("error", .error(BrokerError(.badRegion, "region 3 overlaps region 1"))),
      ("error-timed-out", .error(BrokerError(.timedOut, "no Register within 5000 ms of connecting"))),
      ("error-limit", .error(BrokerError(.limit, "uid 1000 has its maximum of 64 clients connected"))),
      ("layout", .layout(regionID: 1, pieces: movedA.pieces)),
      ("layout-gone", .layout(regionID: 2, pieces: [])),
      ("forked", .forked(childID: 9, pieces: movedA.pieces)),
      ("child-closed", .childClosed(childID: 9)),
      ("dropped", .dropped(regionID: 1, dropped: [0..<4096, 16384..<32768], unknown: [65536..<131072])),
    ]
    for (index, (name, body)) in replies.enumerated() {
      seed("b2c-" + name, 1, ClientWire.encode(BrokerReply(requestID: UInt64(index + 1), body)))
    }

    // PluginToBroker
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    defer { buffer.deallocate() }
    let decisions = DecisionBatchEncoder()
    func plugin(_ name: String, descriptors: Int = 0, _ fill: (DecisionBatchEncoder) -> Void) {
      fill(decisions)
      let length = decisions.encode(into: buffer)
      seed("p2b-" + name, UInt8(2 | descriptors << 2), Array(buffer[..<length]))
    }
    let pageBytes = (0..<page).map { UInt8(truncatingIfNeeded: $0 ^ 0x5a) }
    plugin("hello") { $0.setHello(Hello(role: .plugin, name: "snapshot")) }
    pageBytes.withUnsafeBytes { bytes in
      plugin("copy") { $0.append(faultID: 11, kind: .copy, address: 0x7f00_0000_1000, length: page, data: bytes) }
      plugin("decisions") {
        $0.append(faultID: 12, kind: .copy, address: 0x7f00_0000_2000, length: page, data: bytes)
        $0.append(faultID: 13, kind: .zero, address: 0x7f00_0000_3000, length: 4 * page)
        $0.append(faultID: 14, kind: .retry, address: 0x7f00_0000_8000, length: 0)
        $0.append(faultID: 15, kind: .poison, address: 0x7f00_0000_9000, length: page)
        $0.append(faultID: 16, kind: .copy, address: 0x7f00_0000_a000, length: 2 * page, sharedOffset: 8192)
      }
    }
    plugin("region-replies") {
      $0.append(RegionReply(clientID: 7, regionID: 1, error: nil))
      $0.append(RegionReply(clientID: 7, regionID: 2, error: BrokerError(.pluginRefused, "no such file: /var/lib/image.bin")))
      $0.append(RegionReply(clientID: 7, regionID: 3, error: nil, lost: [0..<4096, 65536..<131072]))
    }
    plugin("keep", descriptors: 2) {
      $0.keep(5, as: "swap-data")
      $0.keep(6, as: "swap-index")
    }
    plugin("store-replies") {
      $0.append(StoreReply(storeID: 3, error: nil))
      $0.append(StoreReply(storeID: 4, error: BrokerError(.limit, "store full")))
    }
    plugin("delegations", descriptors: 2) {
      $0.append(Delegation(clientID: 7, regionID: 1, offsets: 0..<65536, source: .zero, prefetchPages: 16), file: nil)
      $0.append(Delegation(clientID: 7, regionID: 1, offsets: 65536..<131072, source: .file(offset: 4096)), file: 5)
      $0.append(Delegation(clientID: 7, regionID: 2, offsets: 0..<4096, source: .file(offset: 0), prefetchPages: 1), file: 6)
      $0.append(Delegation(clientID: 7, regionID: 1, offsets: 0..<8192, source: .zero, revoke: true), file: nil)
    }
    plugin("mixed", descriptors: 1) {
      $0.setHello(Hello(role: .plugin, name: "swap"))
      $0.append(faultID: 20, kind: .zero, address: 0x7f00_0000_0000, length: page)
      $0.append(RegionReply(clientID: 8, regionID: 1, error: nil))
      $0.append(StoreReply(storeID: 9, error: nil))
      $0.append(Delegation(clientID: 8, regionID: 1, offsets: 0..<4096, source: .file(offset: 0)), file: 9)
    }

    // BrokerToPlugin
    seed("b2p-hello", 3, EventBatchEncoder.encodeControl(hello: Hello(role: .broker, name: "uffd-broker"), error: nil))
    seed("b2p-error", 3, EventBatchEncoder.encodeControl(hello: nil, error: BrokerError(.notAuthorized, "uid 1000 may not serve as a plugin")))
    seed("b2p-error-timed-out", 3, EventBatchEncoder.encodeControl(hello: nil, error: BrokerError(.timedOut, "no Hello within 5000 ms of connecting")))
    seed("b2p-hello-kept", 3, EventBatchEncoder.encodeControl(hello: Hello(role: .broker, name: "uffd-broker"), error: nil, kept: ["swap-data", "swap-index"]))
    let events = EventBatchEncoder()
    func broker(_ name: String, _ list: [BrokerEvent], applied: UInt64 = 0) {
      events.packetsApplied = applied
      list.forEach(events.append)
      let length = events.encode(into: buffer)
      seed("b2p-" + name, 3, Array(buffer[..<length]))
    }
    let fault = PagefaultEvent(faultID: 11, clientID: 7, regionID: 1, address: 0x7f00_0000_1000, offset: 4096, flags: .init(rawValue: 1), threadID: 4243)
    let removed = RangeEvent(clientID: 7, regionID: 1, range: 0x7f00_0000_0000..<0x7f00_0000_4000, startOffset: 0, swappedOut: true)
    let unmapped = RangeEvent(clientID: 7, regionID: 1, range: 0x7f00_0000_4000..<0x7f00_0000_8000, startOffset: 16384)
    let remap = RemapEvent(clientID: 7, regionID: 1, from: 0x7f00_0000_0000, to: 0x7f10_0000_0000, length: 8 * page, newBase: 0x7f10_0000_0000)
    let store = StoreEvent(storeID: 3, clientID: 7, regionID: 1, offset: 4096, data: pageBytes)
    broker("pagefault", [.pagefault(fault)], applied: 1)
    broker("removed", [.removed(removed)])
    broker("unmapped", [.unmapped(unmapped)])
    broker("remapped", [.remapped(remap)])
    let client = PeerCredentials(pid: 4242, uid: 1000, gid: 1000)
    let unknown = PeerCredentials(pid: 4242, uid: PeerCredentials.unknown, gid: PeerCredentials.unknown)
    broker("region-opened", [.regionOpened(clientID: 7, client: client, region: regionA),
                             .regionOpened(clientID: 8, client: PeerCredentials(pid: 0, uid: 1000, gid: 1000), region: regionA, forkedFrom: 7),
                             .regionOpened(clientID: 7, client: client, region: movedA, token: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3211)])
    broker("region-opened-root", [.regionOpened(clientID: 9, client: PeerCredentials(pid: 1, uid: 0, gid: 0), region: regionB)])
    broker("region-opened-anonymous", [.regionOpened(clientID: 9, client: unknown, region: regionB)])
    broker("region-closed", [.regionClosed(clientID: 7, regionID: 2)])
    broker("closed", [.closed(clientID: 7, reason: "client exited")])
    broker("store", [.store(store)])
    broker("decision-refused", [.decisionRefused(faultID: 11, cause: "badRange", reason: "range 0x7f0000001000 + 8192 misses the faulting page"),
                                .decisionRefused(faultID: 0, cause: "badFile", reason: "not a regular file")])
    broker("mixed", [.regionOpened(clientID: 7, client: client, region: regionB), .removed(removed), .unmapped(unmapped),
                     .remapped(remap), .store(store), .regionClosed(clientID: 7, regionID: 1), .closed(clientID: 7, reason: "bye"), .pagefault(fault)], applied: 42)

    print("uffd-fuzz: wrote \(written) seeds to \(directory)")
  }

  /// `message` with every varint field 10 bytes long (protobuf accepts
  /// overlong varints); nil if it does not parse as a message.
  static func widen(_ message: ArraySlice<UInt8>) -> [UInt8]? {
    WireFormat.parse(message).map { WireFormat.serialize($0, wide: true) }
  }
}

// MARK: - Structure-aware mutation

/// A protobuf message as the wire format shows it, without the schema: a
/// length-delimited field whose bytes parse as a message is taken for one.
indirect enum WireField {
  case varint(key: UInt64, value: UInt64)
  case fixed(key: UInt64, bytes: [UInt8])  // wire types 1 (8 bytes) and 5 (4 bytes)
  case bytes(key: UInt64, bytes: [UInt8])
  case message(key: UInt64, fields: [WireField])

  /// Field number << 3 | wire type.
  var key: UInt64 {
    switch self {
    case .varint(let key, _), .fixed(let key, _), .bytes(let key, _), .message(let key, _): key
    }
  }

  func renumbered(_ number: UInt64) -> WireField {
    let key = number << 3 | key & 7
    switch self {
    case .varint(_, let value): return .varint(key: key, value: value)
    case .fixed(_, let bytes): return .fixed(key: key, bytes: bytes)
    case .bytes(_, let bytes): return .bytes(key: key, bytes: bytes)
    case .message(_, let fields): return .message(key: key, fields: fields)
    }
  }
}

enum WireFormat {
  static func parse(_ message: ArraySlice<UInt8>, depth: Int = 0) -> [WireField]? {
    var input = message
    func varint() -> UInt64? {
      var value: UInt64 = 0
      for shift in stride(from: 0, to: 70, by: 7) {
        guard let byte = input.popFirst() else { return nil }
        value |= UInt64(byte & 0x7f) << UInt64(min(shift, 63))
        if byte & 0x80 == 0 { return value }
      }
      return nil
    }
    var fields: [WireField] = []
    while !input.isEmpty {
      guard let key = varint(), key >> 3 != 0, key >> 3 < 1 << 29 else { return nil }
      switch key & 7 {
      case 0:
        guard let value = varint() else { return nil }
        fields.append(.varint(key: key, value: value))
      case 1, 5:
        let size = key & 7 == 1 ? 8 : 4
        guard input.count >= size else { return nil }
        fields.append(.fixed(key: key, bytes: Array(input.prefix(size))))
        input = input.dropFirst(size)
      case 2:
        guard let length = varint(), length <= UInt64(input.count) else { return nil }
        let payload = input.prefix(Int(length))
        input = input.dropFirst(Int(length))
        if depth < 4, !payload.isEmpty, let inner = parse(payload, depth: depth + 1) {
          fields.append(.message(key: key, fields: inner))
        } else {
          fields.append(.bytes(key: key, bytes: Array(payload)))
        }
      default:
        return nil
      }
    }
    return fields
  }

  /// `wide`: every varint value in its 10-byte form.
  static func serialize(_ fields: [WireField], wide: Bool = false) -> [UInt8] {
    var output: [UInt8] = []
    for field in fields {
      output += varint(field.key)
      switch field {
      case .varint(_, let value):
        output += wide ? (0..<9).map { UInt8((value >> UInt64(7 * $0)) & 0x7f) | 0x80 } + [UInt8(value >> 63)] : varint(value)
      case .fixed(_, let bytes):
        output += bytes
      case .bytes(_, let bytes):
        output += varint(UInt64(bytes.count)) + bytes
      case .message(_, let inner):
        let bytes = serialize(inner, wide: wide)
        output += varint(UInt64(bytes.count)) + bytes
      }
    }
    return output
  }

  static func varint(_ value: UInt64) -> [UInt8] {
    var value = value
    var bytes: [UInt8] = []
    while value >= 0x80 {
      bytes.append(UInt8(value & 0x7f) | 0x80)
      value >>= 7
    }
    return bytes + [UInt8(value)]
  }
}

/// What byte-level mutations rarely make: a number at a type's edge in a
/// well-formed packet, a field repeated, dropped, moved to another number (a
/// oneof's other member) or reordered.
struct WireMutator {
  static let edges: [UInt64] = [
    0, 1, 2, 3, 0x7f, 0x80, 4095, 4096, 4097, 1 << 21, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x1_0000_0000,
    0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, 0xffff_ffff_ffff_f000, .max - 1, .max,
  ]
  private var state: UInt64

  init(seed: UInt32) { state = (UInt64(seed) &+ 1) &* 0x9e37_79b9_7f4a_7c15 }

  private mutating func next() -> UInt64 {  // xorshift64
    state ^= state << 13
    state ^= state >> 7
    state ^= state << 17
    return state
  }

  private mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }

  /// The packet with one field changed; nil if it does not parse as a message.
  mutating func mutate(_ packet: ArraySlice<UInt8>) -> [UInt8]? {
    guard var fields = WireFormat.parse(packet), !fields.isEmpty else { return nil }
    var target = below(Self.count(fields))
    let operation = below(7)
    _ = apply(operation, to: &fields, target: &target)
    return WireFormat.serialize(fields)
  }

  private static func count(_ fields: [WireField]) -> Int {
    fields.reduce(0) { total, field in
      if case .message(_, let inner) = field { return total + 1 + count(inner) }
      return total + 1
    }
  }

  /// Applies `operation` to the `target`-th field in pre-order; true once applied.
  private mutating func apply(_ operation: Int, to fields: inout [WireField], target: inout Int) -> Bool {
    for index in fields.indices {
      if target == 0 {
        let field = fields[index]
        switch operation {
        case 0, 1, 2:  // a number at an edge, or any number
          let value = operation < 2 ? Self.edges[below(Self.edges.count)] : next() >> (next() % 64)
          if case .varint(let key, _) = field {
            fields[index] = .varint(key: key, value: value)
          } else if case .message(let key, var inner) = field {
            inner.append(.varint(key: UInt64(1 + below(8)) << 3, value: value))
            fields[index] = .message(key: key, fields: inner)
          } else {
            fields.append(.varint(key: UInt64(1 + below(8)) << 3, value: value))
          }
        case 3: fields.insert(field, at: index)
        case 4: fields.remove(at: index)
        case 5: fields[index] = field.renumbered(UInt64(1 + below(9)))
        default: fields.swapAt(index, below(fields.count))
        }
        return true
      }
      target -= 1
      if case .message(let key, var inner) = fields[index], apply(operation, to: &inner, target: &target) {
        fields[index] = .message(key: key, fields: inner)
        return true
      }
    }
    return false
  }
}

#if FUZZING
/// libFuzzer's own mutations (byte flips, inserts, dictionary words, ...).
@_silgen_name("LLVMFuzzerMutate")
private func libFuzzerMutate(_ data: UnsafeMutablePointer<UInt8>, _ size: Int, _ maxSize: Int) -> Int

/// Half of the mutations are libFuzzer's, half structure-aware (`WireMutator`)
/// when the packet parses as protobuf.
@_cdecl("LLVMFuzzerCustomMutator")
public func customMutator(_ data: UnsafeMutablePointer<UInt8>, _ size: Int, _ maxSize: Int, _ seed: UInt32) -> Int {
  var mutator = WireMutator(seed: seed)
  if size > 1, seed & 1 == 0,
     let packet = mutator.mutate(ArraySlice(UnsafeBufferPointer(start: data + 1, count: size - 1))),
     !packet.isEmpty, packet.count < maxSize {
    packet.withUnsafeBufferPointer { (data + 1).update(from: $0.baseAddress!, count: $0.count) }
    return packet.count + 1
  }
  return libFuzzerMutate(data, size, maxSize)
}

/// libFuzzer's `main` calls this first: `uffd-fuzz --write-seeds DIR` writes
/// the seeds and exits (libFuzzer itself would ignore a `--` flag).
@_cdecl("LLVMFuzzerInitialize")
public func initialize(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
  let arguments = (0..<Int(argc.pointee)).map { argv.pointee?[$0].map { String(cString: $0) } ?? "" }
  if arguments.count == 3, arguments[1] == "--write-seeds" {
    Seeds.write(to: arguments[2])
    exit(0)
  }
  return 0
}
#else
/// Without libFuzzer (a plain `swift build`): replays the files (and the
/// files in the directories, recursively) named on the command line through
/// the same function, e.g. `uffd-fuzz Tests/Fuzz/corpus` as a regression
/// test; or, with `--write-seeds DIR`, writes the seeds.
@main
struct Replay {
  static func main() {
    var arguments = Array(CommandLine.arguments.dropFirst())
    if arguments.first == "--write-seeds" {
      guard arguments.count == 2 else { usage() }
      Seeds.write(to: arguments[1])
      return
    }
    if arguments.isEmpty { usage() }
    var count = 0
    while let path = arguments.first {
      arguments.removeFirst()
      if path.hasPrefix("-") { continue }  // a libFuzzer flag: only inputs matter here
      var info = stat()
      guard stat(path, &info) == 0 else { Files.fail("cannot stat \(path): \(String(cString: strerror(errno)))") }
      if info.st_mode & S_IFMT == S_IFDIR {
        arguments.insert(contentsOf: Files.entries(of: path), at: 0)
      } else {
        let bytes = Files.readFile(path)
        let decodedBefore = packetsDecoded
        _ = bytes.withUnsafeBufferPointer { fuzz($0.baseAddress, $0.count) }
        // A seed is a valid packet of its type: one that no longer decodes means a decoder refuses good input.
        if path.split(separator: "/").last?.hasPrefix("seed-") == true && packetsDecoded == decodedBefore {
          Files.fail("\(path): a seed that no longer decodes")
        }
        count += 1
      }
    }
    print("uffd-fuzz: replayed \(count) inputs, no crash")
  }

  static func usage() -> Never {
    Files.fail("usage: uffd-fuzz FILE|DIR...   (replay inputs)\n       uffd-fuzz --write-seeds DIR")
  }
}
#endif
