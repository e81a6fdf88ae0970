/// The faults handed to plugins and not yet answered, keyed by fault id.
///
/// A fault id is a slot index (low 32 bits) and that slot's generation (high
/// 32 bits): finding an entry is an array index and one compare, with no
/// hashing, and a late answer for a slot since reused carries an old
/// generation and finds nothing. Slots are recycled through a free list, so
/// the table allocates only while it grows to its high-water mark.
struct InFlightTable<Entry> {
  private struct Slot {
    var faultID: UInt64
    var entry: Entry?
  }

  private var slots: [Slot] = []
  private var free: [UInt32] = []
  private(set) var count = 0

  init(reservingCapacity capacity: Int) {
    slots.reserveCapacity(capacity)
    free.reserveCapacity(capacity)
  }

  /// Stores `entry` and returns its new fault id (never 0).
  mutating func insert(_ entry: Entry) -> UInt64 {
    count += 1
    if let index = free.popLast() {
      let next = UInt32(truncatingIfNeeded: slots[Int(index)].faultID >> 32) &+ 1
      let generation = UInt64(next == 0 ? 1 : next)  // ids are never 0, proto3's "unset"
      let faultID = generation << 32 | UInt64(index)
      slots[Int(index)] = Slot(faultID: faultID, entry: entry)
      return faultID
    }
    precondition(slots.count < Int(UInt32.max), "in-flight table overflow")
    let faultID = 1 << 32 | UInt64(slots.count)
    slots.append(Slot(faultID: faultID, entry: entry))
    return faultID
  }

  /// The entry of `faultID`, if it is still in flight.
  func entry(_ faultID: UInt64) -> Entry? {
    let index = Int(truncatingIfNeeded: faultID & 0xFFFF_FFFF)
    guard index < slots.count, slots[index].faultID == faultID else { return nil }
    return slots[index].entry
  }

  /// Removes and returns the entry of `faultID`, if it is still in flight.
  @discardableResult
  mutating func remove(_ faultID: UInt64) -> Entry? {
    let index = Int(truncatingIfNeeded: faultID & 0xFFFF_FFFF)
    guard index < slots.count, slots[index].faultID == faultID, let entry = slots[index].entry else { return nil }
    slots[index].entry = nil
    free.append(UInt32(index))
    count -= 1
    return entry
  }

  /// Replaces the entry of `faultID`, if it is still in flight.
  mutating func update(_ faultID: UInt64, _ entry: Entry) {
    let index = Int(truncatingIfNeeded: faultID & 0xFFFF_FFFF)
    guard index < slots.count, slots[index].faultID == faultID, slots[index].entry != nil else { return }
    slots[index].entry = entry
  }

  /// The ids of every entry for which `isIncluded` holds (off the fault path).
  func ids(where isIncluded: (Entry) -> Bool) -> [UInt64] {
    slots.compactMap { slot in slot.entry.map(isIncluded) == true ? slot.faultID : nil }
  }
}
