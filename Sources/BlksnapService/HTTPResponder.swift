import BlksnapControlProtocol
import BlksnapEngine
import CBlksnapLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A tiny blocking HTTP/1.1 server for one purpose: answering a Prometheus
/// scrape (`GET /metrics`). One thread, one connection at a time, every
/// reply `Connection: close`.
///
/// A scraper sends one short request and reads the reply, so nothing here
/// needs an event loop (SwiftNIO would add minutes to a clean build for a
/// request a minute). What a peer sends is bounded: the request head must
/// fit in 8 KiB and arrive within 5 seconds, else the connection is closed;
/// a body is never read.
public final class HTTPResponder: @unchecked Sendable {
    public struct Response: Sendable {
        public var status: Int
        public var contentType: String
        public var body: [UInt8]
        public init(status: Int, contentType: String = "text/plain; charset=utf-8", body: [UInt8]) {
            (self.status, self.contentType, self.body) = (status, contentType, body)
        }
    }

    /// Given the method and path of a request, its response.
    public typealias Handler = @Sendable (_ method: String, _ path: String) -> Response

    static let maximumHead = 8192
    static let receiveTimeoutSeconds = 5

    private let handler: Handler
    private let lock = Lock()
    private var listener: Int32 = -1
    private var stopped = false

    public init(handler: @escaping Handler) {
        self.handler = handler
    }

    /// Binds `address` (port 0: any free port) and serves on a thread of its
    /// own; returns the port bound.
    @discardableResult
    public func start(_ address: ListenAddress) throws(BlksnapError) -> UInt16 {
        let v6 = address.family == .ipv6
        let fd = socket(v6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot make the metrics socket") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var storage = sockaddr_storage()
        let length: socklen_t
        let bytes = address.bytes
        if v6 {
            // [::] means IPv6 only; an operator who wants IPv4 too names it.
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = address.port.bigEndian
            withUnsafeMutableBytes(of: &a.sin6_addr) { raw in for i in 0..<16 { raw[i] = bytes[i] } }
            withUnsafeMutableBytes(of: &storage) { raw in withUnsafeBytes(of: a) { raw.copyMemory(from: $0) } }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        } else {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = address.port.bigEndian
            withUnsafeMutableBytes(of: &a.sin_addr) { raw in for i in 0..<4 { raw[i] = bytes[i] } }
            withUnsafeMutableBytes(of: &storage) { raw in withUnsafeBytes(of: a) { raw.copyMemory(from: $0) } }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        let bound = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            let e = BlksnapError(Errno(rawValue: errno), "cannot listen for metrics on \(address)")
            close(fd)
            throw e
        }
        var actual = sockaddr_storage()
        var actualLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let port = withUnsafeMutablePointer(to: &actual) { p -> UInt16 in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &actualLength) }
            if v6 { return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) } }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        lock.withLock { listener = fd }
        startThread { [self] in acceptLoop(fd) }
        return port
    }

    public func stop() {
        lock.withLock {
            stopped = true
            // The accept loop closes it once woken, so its number stays ours
            // until nothing can use it.
            if listener >= 0 { shutdown(listener, Int32(SHUT_RDWR)) }
            listener = -1
        }
    }

    private func acceptLoop(_ fd: Int32) {
        while true {
            let c = blksnap_accept_cloexec(fd)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                close(fd)
                return
            }
            if lock.withLock({ stopped }) {
                close(c)
                close(fd)
                return
            }
            serve(c)
            close(c)
        }
    }

    private func serve(_ fd: Int32) {
        var timeout = timeval(tv_sec: Self.receiveTimeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard let head = readHead(fd) else { return }
        let response: Response
        var isHead = false
        switch Self.parseRequestLine(head) {
        case .success(let (method, path)):
            isHead = method == "HEAD"
            response = method == "GET" || isHead
                ? handler(method, path)
                : Response(status: 405, body: Array("only GET\n".utf8))
        case .failure:
            response = Response(status: 400, body: Array("bad request\n".utf8))
        }
        var out = Array(Self.head(of: response).utf8)
        if !isHead { out += response.body }
        var done = 0
        while done < out.count {
            let n = out.withUnsafeBytes { send(fd, $0.baseAddress! + done, out.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
    }

    /// The bytes up to the blank line that ends the head, or nil when the
    /// peer hangs up, stalls or sends more than `maximumHead` first.
    private func readHead(_ fd: Int32) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: Self.maximumHead)
        var filled = 0
        while filled < buffer.count {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + filled, $0.count - filled, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            filled += n
            if let end = Self.endOfHead(buffer[0..<filled]) { return Array(buffer[0..<end]) }
        }
        return nil
    }

    static func endOfHead(_ bytes: ArraySlice<UInt8>) -> Int? {
        let crlf: [UInt8] = [13, 10, 13, 10]
        var i = bytes.startIndex
        while i + 4 <= bytes.endIndex {
            if bytes[i..<i + 4].elementsEqual(crlf) { return i + 4 }
            if bytes[i] == 10 && bytes[i + 1] == 10 { return i + 2 }
            i += 1
        }
        if bytes.count >= 2, bytes[bytes.endIndex - 2] == 10, bytes[bytes.endIndex - 1] == 10 { return bytes.endIndex }
        return nil
    }

    struct BadRequest: Error, Equatable {}

    /// `METHOD SP PATH SP HTTP/1.x`; the query string is dropped.
    static func parseRequestLine(_ head: [UInt8]) -> Result<(String, String), BadRequest> {
        let line = head.prefix { $0 != 13 && $0 != 10 }
        let parts = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard parts.count == 3, parts[2].starts(with: Array("HTTP/1.".utf8)),
              parts.allSatisfy({ part in part.allSatisfy { $0 > 32 && $0 < 127 } }),
              parts[1].first == UInt8(ascii: "/") else {
            return .failure(BadRequest())
        }
        let method = String(decoding: parts[0], as: UTF8.self)
        let target = String(decoding: parts[1], as: UTF8.self)
        let path = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? target
        return .success((method, path))
    }

    static func head(of response: Response) -> String {
        let reason = [200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"][response.status] ?? "Error"
        return "HTTP/1.1 \(response.status) \(reason)\r\n"
            + "Content-Type: \(response.contentType)\r\n"
            + "Content-Length: \(response.body.count)\r\n"
            + "Connection: close\r\n\r\n"
    }
}
