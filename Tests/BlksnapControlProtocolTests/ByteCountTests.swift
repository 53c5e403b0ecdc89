import BlksnapABI
import BlksnapControlProtocol
import FoundationEssentials
import Testing

/// `blksnapctl attach --size 10G` reaches blksnapd as bytes in the JSON:
/// the suffix is the client's business, never the daemon's.
@Suite struct ByteCountOnTheWireTests {
    @Test func aSizeWithASuffixTravelsAsBytes() throws {
        let size = try #require(ByteCount("10G"))
        let data = try JSONEncoder().encode(AttachRequest(backing: "/d", size: size.bytes))
        #expect(String(decoding: data, as: UTF8.self).contains(#""size":10737418240"#))
        #expect(try JSONDecoder().decode(AttachRequest.self, from: data).size == 10 << 30)
    }

}
