#if canImport(Glibc)
import Glibc
#endif

/// A `HOST:PORT` the operator gave on the command line, for a listener:
/// `127.0.0.1:9100`, `[::1]:9100`, `localhost:9100`.
///
/// The host must be an address written out (or `localhost`, meaning
/// 127.0.0.1): a listener that serves every interface is one the operator
/// asks for by writing `0.0.0.0` or `[::]`, never a default. An IPv6
/// address goes in brackets, since its colons would otherwise swallow the
/// port.
public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
    public enum Family: Sendable, Equatable { case ipv4, ipv6 }
    public var family: Family
    /// The numeric host, without brackets.
    public var host: String
    public var port: UInt16

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    /// `host` must be numeric in `family`; port 0 asks for any free port.
    public init(family: Family, host: String, port: UInt16) {
        precondition(Self.isNumeric(host, family), "\(host) is not numeric")
        (self.family, self.host, self.port) = (family, host, port)
    }

    /// With `anyPort`, port 0 asks for any free port: for a caller that
    /// reports the port it got.
    public init(parsing text: String, anyPort: Bool = false) throws(Invalid) {
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw Invalid(description: "\(text): an IPv6 address needs its closing ], as in [::1]:9100")
            }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw Invalid(description: "\(text): a port must follow ], as in [::1]:9100") }
            portPart = rest.dropFirst()
            family = .ipv6
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw Invalid(description: "\(text): give HOST:PORT, e.g. 127.0.0.1:9100")
            }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            guard !hostPart.contains(":") else {
                throw Invalid(description: "\(text): write an IPv6 address in brackets, e.g. [::1]:9100")
            }
            family = .ipv4
        }
        // UInt16(_:) takes "+9100"; a port is digits only.
        guard !portPart.isEmpty, portPart.allSatisfy(\.isASCII), portPart.allSatisfy(\.isNumber),
              let port = UInt16(portPart), port > 0 || anyPort else {
            throw Invalid(description: "\(text): the port must be a number from \(anyPort ? 0 : 1) to 65535")
        }
        self.port = port
        guard !hostPart.isEmpty else {
            throw Invalid(description: "\(text): name the address to listen on (127.0.0.1 for this machine only)")
        }
        if family == .ipv4 && hostPart == "localhost" {
            host = "127.0.0.1"
        } else {
            host = String(hostPart)
        }
        guard Self.isNumeric(host, family) else {
            throw Invalid(description: "\(text): \(host) is not a numeric \(family == .ipv4 ? "IPv4" : "IPv6") address")
        }
    }

    public var description: String { family == .ipv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// Loopback only: 127.0.0.0/8 or ::1.
    public var isLoopback: Bool {
        switch family {
        case .ipv4: host.hasPrefix("127.")
        case .ipv6: Self.bytes(host, .ipv6) == Array(repeating: 0, count: 15) + [1]
        }
    }

    /// The address in network order: 4 or 16 bytes.
    public var bytes: [UInt8] { Self.bytes(host, family)! }

    static func isNumeric(_ host: String, _ family: Family) -> Bool { bytes(host, family) != nil }

    /// inet_pton(3): the text forms the C library accepts, nothing else
    /// (no hostnames, no shortened IPv4 such as 127.1).
    static func bytes(_ host: String, _ family: Family) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 16)
        let rc = inet_pton(family == .ipv4 ? AF_INET : AF_INET6, host, &out)
        return rc == 1 ? Array(out.prefix(family == .ipv4 ? 4 : 16)) : nil
    }
}
