import FoundationEssentials

/// What a Firecracker-style VMM sends its page-fault handler when it restores a
/// snapshot with `mem_backend: Uffd`: one write on a `SOCK_STREAM` connection,
/// a JSON array of `GuestRegionUffdMapping` objects, with its userfaultfd
/// attached (SCM_RIGHTS). It expects no reply and keeps the connection open for
/// the VM's life.
///
/// Each mapping gives the guest region's host address, its size, where it
/// starts in the snapshot's memory file, and its page size in bytes
/// (`page_size`; older VMMs send only `page_size_kib`, which despite its name
/// is also in bytes).
public struct FirecrackerHandshake: Equatable, Sendable {
  /// One guest region: a `GuestRegionUffdMapping`.
  public struct Mapping: Equatable, Sendable, Decodable {
    /// Where the region lies in the VMM's memory (`base_host_virt_addr`).
    public var hostAddress: UInt64
    /// Its length in bytes.
    public var size: UInt64
    /// Where the region starts in the snapshot's memory file.
    public var offset: UInt64
    /// In bytes: `page_size`, else the deprecated `page_size_kib` (also bytes).
    public var pageSize: UInt64?

    enum CodingKeys: String, CodingKey { case base_host_virt_addr, size, offset, page_size, page_size_kib }

    /// A mapping with these fields.
    public init(hostAddress: UInt64, size: UInt64, offset: UInt64, pageSize: UInt64?) {
      (self.hostAddress, self.size, self.offset, self.pageSize) = (hostAddress, size, offset, pageSize)
    }

    /// Reads Firecracker's field names; `page_size` wins over `page_size_kib`.
    public init(from decoder: any Decoder) throws {
      let fields = try decoder.container(keyedBy: CodingKeys.self)
      hostAddress = try fields.decode(UInt64.self, forKey: .base_host_virt_addr)
      size = try fields.decode(UInt64.self, forKey: .size)
      offset = try fields.decode(UInt64.self, forKey: .offset)
      pageSize = try fields.decodeIfPresent(UInt64.self, forKey: .page_size) ?? fields.decodeIfPresent(UInt64.self, forKey: .page_size_kib)
    }
  }

  /// The guest regions, in the VMM's order.
  public var mappings: [Mapping]

  /// The most bytes a handshake may take; a VMM's is a few hundred.
  public static let maxBytes = 64 << 10
  /// The most guest regions one VMM may map (a guest has a handful).
  public static let maxMappings = 64

  /// The handshake in `bytes`, nil while they may still be the start of one
  /// (the JSON array is not closed yet). Throws for bytes that can never become
  /// one: not JSON, not an array of mappings, too long, or a mapping without a
  /// page size.
  public static func parse(_ bytes: some Collection<UInt8>) throws(BrokerError) -> FirecrackerHandshake? {
    guard bytes.count <= maxBytes else { throw BrokerError(.tooLarge, "the VMM's region mappings exceed \(maxBytes) bytes") }
    guard let last = bytes.reversed().first(where: { !isWhitespace($0) }) else { return nil }
    guard last == UInt8(ascii: "]") else {
      guard let first = bytes.first(where: { !isWhitespace($0) }), first == UInt8(ascii: "[") else {
        throw BrokerError(.malformed, "the VMM's message is not a JSON array of region mappings")
      }
      return nil  // more to come
    }
    let mappings: [Mapping]
    do {
      mappings = try JSONDecoder().decode([Mapping].self, from: Data(bytes))
    } catch {
      throw BrokerError(.malformed, "the VMM's region mappings are not valid: \(error)")
    }
    guard !mappings.isEmpty, mappings.count <= maxMappings else {
      throw BrokerError(.malformed, "the VMM must map from 1 to \(maxMappings) guest regions (got \(mappings.count))")
    }
    for (index, mapping) in mappings.enumerated() where mapping.pageSize == nil {
      throw BrokerError(.malformed, "guest region \(index) gives no page size (page_size or page_size_kib)")
    }
    return FirecrackerHandshake(mappings: mappings)
  }

  /// The regions a VMM's guest memory becomes: one per mapping, numbered from
  /// 1, each served by `plugin` with `argument` (the snapshot's memory file,
  /// say) from the mapping's offset in it.
  public func regions(plugin: String, argument: String) -> [RegionSpec] {
    mappings.enumerated().map { index, mapping in
      RegionSpec(id: UInt64(index + 1), base: UInt(truncatingIfNeeded: mapping.hostAddress), length: Int(truncatingIfNeeded: mapping.size),
                 pageSize: Int(truncatingIfNeeded: mapping.pageSize ?? 0), plugin: plugin, argument: argument, backingOffset: mapping.offset)
    }
  }

  private static func isWhitespace(_ byte: UInt8) -> Bool {
    byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
  }
}
