import BlksnapControlProtocol
import Testing
@testable import BlksnapService
#if canImport(Glibc)
import Glibc
#endif

/// Sends `request` to `port` on `host` and returns all the server wrote
/// before it closed the connection.
func exchange(_ request: [UInt8], port: UInt16, ipv6: Bool = false) -> String? {
    let fd = socket(ipv6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let rc: Int32
    if ipv6 {
        var a = sockaddr_in6()
        a.sin6_family = sa_family_t(AF_INET6)
        a.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &a.sin6_addr) { $0[15] = 1 }
        rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
    } else {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    }
    guard rc == 0 else { return nil }
    _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        out += buffer[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

@Suite struct HTTPResponderTests {
    let responder = HTTPResponder { method, path in
        path == "/metrics" ? .init(status: 200, body: Array("up 1\n".utf8)) : .init(status: 404, body: Array("no\n".utf8))
    }

    @Test func answersGetAndHeadAndRefusesTheRest() throws {
        let port = try responder.start(ListenAddress(family: .ipv4, host: "127.0.0.1", port: 0))
        defer { responder.stop() }
        #expect(port != 0)
        let ok = exchange(Array("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n".utf8), port: port)
        #expect(ok == "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n"
                + "Connection: close\r\n\r\nup 1\n")
        let head = exchange(Array("HEAD /metrics HTTP/1.0\r\n\r\n".utf8), port: port)
        #expect(head?.hasPrefix("HTTP/1.1 200 OK\r\n") == true && head?.hasSuffix("\r\n\r\n") == true)
        #expect(exchange(Array("GET / HTTP/1.1\r\n\r\n".utf8), port: port)?.hasPrefix("HTTP/1.1 404 ") == true)
        #expect(exchange(Array("POST /metrics HTTP/1.1\r\n\r\n".utf8), port: port)?.hasPrefix("HTTP/1.1 405 ") == true)
        #expect(exchange(Array("GARBAGE\r\n\r\n".utf8), port: port)?.hasPrefix("HTTP/1.1 400 ") == true)
        #expect(exchange(Array("GET metrics HTTP/1.1\r\n\r\n".utf8), port: port)?.hasPrefix("HTTP/1.1 400 ") == true)
        // A head that never ends within the limit gets no answer, only a close.
        #expect(exchange(Array(repeating: UInt8(ascii: "A"), count: 9000), port: port) == "")
        // The server still answers after all of that.
        #expect(exchange(Array("GET /metrics HTTP/1.1\r\n\r\n".utf8), port: port)?.hasSuffix("up 1\n") == true)
    }

    @Test func servesIPv6Loopback() throws {
        let probe = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        close(probe)
        try #require(probe >= 0, "no IPv6 on this machine")
        let address = try ListenAddress(parsing: "[::1]:1")
        let port = try responder.start(ListenAddress(family: address.family, host: address.host, port: 0))
        defer { responder.stop() }
        #expect(exchange(Array("GET /metrics HTTP/1.1\r\n\r\n".utf8), port: port, ipv6: true)?.hasSuffix("up 1\n") == true)
    }

    @Test func aBusyPortIsAnError() throws {
        let port = try responder.start(ListenAddress(family: .ipv4, host: "127.0.0.1", port: 0))
        defer { responder.stop() }
        let other = HTTPResponder { _, _ in .init(status: 200, body: []) }
        #expect(throws: (any Error).self) { try other.start(ListenAddress(family: .ipv4, host: "127.0.0.1", port: port)) }
    }
}
