import BlksnapEngine
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// systemd's readiness protocol (`sd_notify(3)`), without libsystemd: one
/// datagram of `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET`.
///
/// Under `Type=notify` systemd holds back every unit ordered after
/// blksnapd.service (fstab's mounts among them) until `READY=1` arrives, so
/// blksnapd sends it only once it serves; `STOPPING=1` tells systemd a stop
/// has begun, `STATUS=` is the one-line state `systemctl status` shows.
/// With no `$NOTIFY_SOCKET` (not started by systemd) every call does nothing.
public struct SystemdNotify: Sendable {
    /// The socket address: a path, or an abstract name when it begins with '@'.
    public let socketPath: String?

    public init(environment value: String? = getenv("NOTIFY_SOCKET").map { String(cString: $0) }) {
        socketPath = value.flatMap { $0.isEmpty ? nil : $0 }
    }

    public var isEnabled: Bool { socketPath != nil }

    public func ready(status: String? = nil) throws(BlksnapError) {
        try send(["READY=1"] + (status.map { ["STATUS=" + $0] } ?? []))
    }

    public func stopping(status: String? = nil) throws(BlksnapError) {
        try send(["STOPPING=1"] + (status.map { ["STATUS=" + $0] } ?? []))
    }

    public func status(_ text: String) throws(BlksnapError) {
        try send(["STATUS=" + text])
    }

    /// Sends one datagram of `lines`. A value never holds a newline, which
    /// would start a second assignment systemd did not get from us.
    public func send(_ lines: [String]) throws(BlksnapError) {
        guard let path = socketPath else { return }
        let message = lines.map { $0.replacing("\n", with: " ") }.joined(separator: "\n") + "\n"
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        // An abstract name is the bytes after a leading NUL, and its length
        // is exactly those bytes: no terminating NUL is counted.
        if abstract { bytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        let minimum = abstract ? 2 : 1
        guard (minimum..<capacity).contains(bytes.count) else {
            throw BlksnapError(.invalidArgument, "NOTIFY_SOCKET \(path) is not a usable socket address")
        }
        guard abstract || path.hasPrefix("/") else {
            throw BlksnapError(.invalidArgument, "NOTIFY_SOCKET \(path) is neither absolute nor abstract")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (abstract ? 0 : 1))
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot make a socket for sd_notify") }
        defer { close(fd) }
        let sent = message.utf8CString.withUnsafeBytes { text in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, text.baseAddress, text.count - 1, Int32(MSG_NOSIGNAL), $0, length)
                }
            }
        }
        guard sent == message.utf8.count else {
            throw BlksnapError(Errno(rawValue: errno), "cannot notify systemd at \(path)")
        }
    }
}
