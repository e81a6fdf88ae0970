import CBrokerWire
import Glibc

/// C strings (and region structs) that must outlive one `pack` call: freed together.
final class CStringPool {
  @exclusivity(unchecked) private var strings: [UnsafeMutablePointer<CChar>] = []
  @exclusivity(unchecked) private var regions: [UnsafeMutablePointer<Uffdbroker__Region>] = []
  @exclusivity(unchecked) private var arrays: [UnsafeMutableRawPointer] = []

  deinit { reset() }

  func reset() {
    guard !(strings.isEmpty && regions.isEmpty && arrays.isEmpty) else { return }  // every batch of faults
    strings.forEach { free($0) }
    regions.forEach { $0.deallocate() }
    arrays.forEach { $0.deallocate() }
    arrays.removeAll(keepingCapacity: true)
    strings.removeAll(keepingCapacity: true)
    regions.removeAll(keepingCapacity: true)
  }

  func string(_ value: String) -> UnsafeMutablePointer<CChar> {
    let copy = strdup(value)!
    strings.append(copy)
    return copy
  }

  /// A packed-ready `Region` message for `spec`, alive until `reset()`.
  func region(_ spec: RegionSpec) -> UnsafeMutablePointer<Uffdbroker__Region> {
    let message = UnsafeMutablePointer<Uffdbroker__Region>.allocate(capacity: 1)
    uffdbroker__region__init(message)
    message.pointee.id = spec.id
    message.pointee.address = UInt64(spec.base)
    message.pointee.length = UInt64(spec.length)
    message.pointee.page_size = UInt32(clamping: spec.pageSize)
    message.pointee.plugin = string(spec.plugin)
    message.pointee.argument = string(spec.argument)
    message.pointee.backing_offset = spec.backingOffset
    regions.append(message)
    return message
  }

  /// A pointer array for a repeated field; freed with the pool.
  func regionArray(_ specs: [RegionSpec]) -> UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Region>?> {
    let array = UnsafeMutablePointer<UnsafeMutablePointer<Uffdbroker__Region>?>.allocate(capacity: max(specs.count, 1))
    for (index, spec) in specs.enumerated() { array[index] = region(spec) }
    arrays.append(UnsafeMutableRawPointer(array))
    return array
  }
}

extension RegionSpec {
  /// Reads a decoded `Region`; checks the numbers fit this platform.
  init(decoding message: UnsafePointer<Uffdbroker__Region>) throws(BrokerError) {
    let m = message.pointee
    guard m.length <= UInt64(Int.max), m.address <= UInt64(UInt.max) else { throw BrokerError(.badRegion, "region \(m.id) does not fit the address space") }
    self.init(
      id: m.id, base: UInt(m.address), length: Int(m.length), pageSize: Int(m.page_size),
      plugin: String(cString: m.plugin), argument: String(cString: m.argument), backingOffset: m.backing_offset)
  }
}

extension Hello {
  init(decoding message: UnsafePointer<Uffdbroker__Hello>) throws(BrokerError) {
    // protobuf-c stores any 32-bit value for an enum: a peer's -1 arrives as
    // 0xFFFFFFFF, which `Int32(_:)` would trap on (found by fuzzing).
    let raw = Int32(bitPattern: message.pointee.role.rawValue)
    guard let role = Role(rawValue: raw) else {
      throw BrokerError(.version, "unknown role \(raw) in Hello")
    }
    self.init(role: role, name: String(cString: message.pointee.name), version: message.pointee.version)
  }

  func encode(into message: inout Uffdbroker__Hello, pool: CStringPool) {
    uffdbroker__hello__init(&message)
    message.version = version
    message.role = Uffdbroker__Role(rawValue: UInt32(role.rawValue))
    message.name = pool.string(name)
  }
}

extension BrokerError {
  init(decoding message: UnsafePointer<Uffdbroker__Error>) {
    // Any 32-bit value may arrive (see Hello); the transport-only codes (100
    // and up) never go on the wire, so they read as unknown too, not as
    // `.disconnected` & co. (both found by fuzzing).
    let code = Code(rawValue: Int32(bitPattern: message.pointee.code.rawValue)).flatMap { $0.rawValue < 100 ? $0 : nil }
    self.init(code ?? .unspecified, String(cString: message.pointee.message))
  }

  func encode(into message: inout Uffdbroker__Error, pool: CStringPool) {
    uffdbroker__error__init(&message)
    // Transport-only codes never go on the wire as such.
    let wire: Code = code.rawValue < 100 ? code : .internal
    message.code = Uffdbroker__ErrorCode(rawValue: UInt32(wire.rawValue))
    message.message = pool.string(self.message)
  }
}
