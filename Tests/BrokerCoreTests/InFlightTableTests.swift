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

  @Test("ids(where:) finds exactly the matching entries; update replaces one in place")
  func idsWhere() {
    var table = InFlightTable<Int>(reservingCapacity: 8)
    let ids = (0..<8).map { table.insert($0) }
    let even = table.ids { $0 % 2 == 0 }
    #expect(even == [ids[0], ids[2], ids[4], ids[6]])
    table.update(ids[1], 10)
    table.remove(ids[3])
    table.update(ids[3], 30)  // gone: not brought back
    #expect(table.entry(ids[1]) == 10 && table.entry(ids[3]) == nil && table.count == 7)
  }
}
