import Testing
@testable import BlksnapControlProtocol
#if canImport(Glibc)
import Glibc
#endif

@Suite struct ListenAddressTests {
    @Test func ipv4AndLocalhost() throws {
        let a = try ListenAddress(parsing: "127.0.0.1:9100")
        #expect(a == ListenAddress(family: .ipv4, host: "127.0.0.1", port: 9100))
        #expect(a.isLoopback && a.bytes == [127, 0, 0, 1])
        #expect(try ListenAddress(parsing: "localhost:80").host == "127.0.0.1")
        let any = try ListenAddress(parsing: "0.0.0.0:9100")
        #expect(!any.isLoopback)
        #expect(any.description == "0.0.0.0:9100")
    }

    @Test func ipv6InBrackets() throws {
        let a = try ListenAddress(parsing: "[::1]:9100")
        #expect(a.family == .ipv6 && a.host == "::1" && a.port == 9100)
        #expect(a.isLoopback)
        #expect(a.bytes == Array(repeating: 0, count: 15) + [1])
        #expect(a.description == "[::1]:9100")
        let b = try ListenAddress(parsing: "[fe80::1:2]:65535")
        #expect(b.port == 65535 && !b.isLoopback)
        #expect(try ListenAddress(parsing: "[::]:1").bytes == Array(repeating: 0, count: 16))
    }

    @Test(arguments: [
        "9100", ":9100", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:+91", "127.0.0.1:9 1",
        "::1:9100", "[::1]9100", "[::1", "[::1]:", "[127.0.0.1]:80", "[::1::2]:80", "host.example:80",
        "127.1:80", "256.0.0.1:80", "[]:80", "127.0.0.1:٩١",
    ])
    func refused(_ text: String) {
        #expect(throws: ListenAddress.Invalid.self) { try ListenAddress(parsing: text) }
    }

    /// NBD listeners report the port they got, so they may ask for any.
    @Test func portZeroOnlyWhereAsked() throws {
        #expect(throws: ListenAddress.Invalid.self) { try ListenAddress(parsing: "127.0.0.1:0") }
        #expect(try ListenAddress(parsing: "127.0.0.1:0", anyPort: true).port == 0)
        #expect(try ListenAddress(parsing: "[::1]:0", anyPort: true) == ListenAddress(family: .ipv6, host: "::1", port: 0))
        #expect(throws: ListenAddress.Invalid.self) { try ListenAddress(parsing: "::1:10809", anyPort: true) }
    }
}
