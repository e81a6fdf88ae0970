import BrokerCore
import Testing

/// Where a config file's JSON syntax error is, for a person.
@Suite("JSON text position")
struct JSONTextPositionTests {
  @Test("a byte offset becomes a line and a column from 1, counted in characters, after a byte-order mark")
  func lineAndColumn() {
    let text = Array("{\n  \"a\": 1,\n  \"b\": [1, 2,,]\n}".utf8)
    #expect(JSONTextPosition(byteOffset: 0, in: text) == JSONTextPosition(line: 1, column: 1))
    #expect(JSONTextPosition(byteOffset: 25, in: text) == JSONTextPosition(line: 3, column: 14))
    #expect(JSONTextPosition(byteOffset: 11, in: text) == JSONTextPosition(line: 2, column: 10))  // the newline ends its line
    #expect(JSONTextPosition(byteOffset: 12, in: text) == JSONTextPosition(line: 3, column: 1))
    #expect(JSONTextPosition(byteOffset: text.count + 5, in: text) == JSONTextPosition(line: 4, column: 2))  // the end
    // "é" is two bytes and one column; the parser's offsets start after the mark.
    let marked: [UInt8] = [0xEF, 0xBB, 0xBF] + Array("{\n\t\"é\": 1 x}".utf8)
    #expect(JSONTextPosition(byteOffset: 11, in: marked) == JSONTextPosition(line: 2, column: 9))
    #expect(JSONTextPosition(byteOffset: 3, in: []).description == "line 1, column 1")
  }

  @Test("Foundation's messages: the offset they name (the end for an unexpected end), and the reason without it")
  func foundationMessages() {
    #expect(JSONTextPosition.syntaxError("Invalid value around character 25.", textLength: 40) == (25, "invalid value"))
    #expect(JSONTextPosition.syntaxError("Unexpected end of file during JSON parse.", textLength: 17) == (17, "unexpected end of file during JSON parse"))
    #expect(JSONTextPosition.syntaxError("Invalid hex encoded sequence in \"12\"}\" at 9.", textLength: 20) == (9, "invalid hex encoded sequence in \"12\"}\""))
    #expect(JSONTextPosition.syntaxError("Number 1e999 is not representable in Swift.", textLength: 20) == (nil, "number 1e999 is not representable in Swift"))
  }
}
