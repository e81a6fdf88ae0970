import Testing
@testable import BrokerCore

/// The in-flight table's ids: a late answer must never reach the fault that reused its slot.
@Suite("In-flight table")
struct InFlightTableTests {
  @Test("an answered id finds nothing, even after its slot is reused; ids are never 0")
  func staleIDs() {
    var table = InFlightTable<String>(reservingCapacity: 4)
    let first = table.insert("a")
    let second = table.insert("b")
    #expect(first != 0 && second != 0 && first != second)
    #expect(table.entry(first) == "a" && table.entry(second) == "b" && table.count == 2)
    #expect(table.remove(first) == "a")
    #expect(table.remove(first) == nil && table.entry(first) == nil)
    let reused = table.insert("c")  // takes the freed slot, with a new generation
    #expect(reused != first && reused & 0xFFFF_FFFF == first & 0xFFFF_FFFF)
    #expect(table.entry(first) == nil && table.remove(first) == nil && table.entry(reused) == "c")
    #expect(table.entry(0) == nil && table.entry(UInt64.max) == nil)
  }

  @Test("removeAll(where:) takes exactly the matching entries and frees their slots")
  func removeWhere() {
    var table = InFlightTable<Int>(reservingCapacity: 8)
    let ids = (0..<8).map { table.insert($0) }
    let removed = table.removeAll { $0 % 2 == 0 }
    #expect(removed.sorted() == [0, 2, 4, 6] && table.count == 4)
    #expect(ids.enumerated().allSatisfy { index, id in (table.entry(id) != nil) == (index % 2 == 1) })
    #expect(Array(table.entries).sorted() == [1, 3, 5, 7])
  }
}
