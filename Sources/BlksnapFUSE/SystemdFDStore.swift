import BlksnapEngine
import CBlksnapLinux
import SystemPackage
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// systemd's file descriptor store (sd_notify FDSTORE=1; the descriptors
/// come back at the next start as LISTEN_FDS with LISTEN_FDNAMES): under
/// systemd the service manager holds the FUSE connection, nothing of ours
/// needs to outlive blksnapd, and a `systemctl stop` ends it cleanly.
final class SystemdFDStore: ConnectionStore, @unchecked Sendable {
    var kind: String { "systemd's file descriptor store" }
    let notifySocket: String
    let logger: Logger
    private let lock = Lock()
    private var passed: [KeptConnection]

    /// nil unless $NOTIFY_SOCKET names systemd's socket and $FDSTORE says
    /// the unit may store descriptors.
    init?(logger: Logger, environment: [String: String] = SystemdFDStore.environment) {
        guard let socket = environment["NOTIFY_SOCKET"], !socket.isEmpty,
              let max = environment["FDSTORE"].flatMap({ Int($0) }), max > 0 else { return nil }
        notifySocket = socket
        self.logger = logger
        passed = Self.listenFds(environment)
        for kept in passed { _ = fcntl(kept.fd, F_SETFD, FD_CLOEXEC) }
        for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] { unsetenv(name) }
    }

    static var environment: [String: String] {
        var all: [String: String] = [:]
        for name in ["NOTIFY_SOCKET", "FDSTORE", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            if let value = getenv(name) { all[name] = String(cString: value) }
        }
        return all
    }

    /// sd_listen_fds_with_names: descriptors from 3 on, for this process only.
    static func listenFds(_ environment: [String: String]) -> [KeptConnection] {
        guard let pid = environment["LISTEN_PID"].flatMap({ Int32($0) }), pid == getpid(),
              let count = environment["LISTEN_FDS"].flatMap({ Int32($0) }), (1...1024).contains(count) else { return [] }
        let names = (environment["LISTEN_FDNAMES"] ?? "").split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        return (0..<count).map { i in
            KeptConnection(name: Int(i) < names.count ? names[Int(i)] : "unknown", fd: 3 + i)
        }
    }

    /// Each descriptor systemd passed is taken once; other names (the
    /// unit's sockets, another part of blksnapd's) stay for their taker.
    func take(prefix: String) -> [KeptConnection] {
        lock.withLock {
            defer { passed.removeAll { $0.name.hasPrefix(prefix) } }
            return passed.filter { $0.name.hasPrefix(prefix) }
        }
    }

    func hold(_ name: String, fd: Int32) throws(BlksnapError) {
        try notify("FDSTORE=1\nFDNAME=\(name)", fd: fd)
    }

    func drop(_ name: String) {
        do throws(BlksnapError) {
            try notify("FDSTOREREMOVE=1\nFDNAME=\(name)", fd: -1)
        } catch {
            logger.warning("blksnapd: \(error)")
        }
    }

    func close() {}

    /// One datagram to $NOTIFY_SOCKET (a path, or @name for the abstract namespace).
    private func notify(_ text: String, fd: Int32) throws(BlksnapError) {
        let sock = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard sock >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot make a socket for sd_notify") }
        defer { Glibc.close(sock) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var path = Array(notifySocket.utf8)
        if path.first == UInt8(ascii: "@") { path[0] = 0 }
        guard path.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw BlksnapError(.invalidArgument, "NOTIFY_SOCKET \(notifySocket) is too long")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
        }
        let length = UInt32(MemoryLayout<sa_family_t>.size + path.count + (path.first == 0 ? 0 : 1))
        let sent = withUnsafePointer(to: &address) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                Array(text.utf8).withUnsafeBytes { blksnap_send_with_fd(sock, sa, length, $0.baseAddress, $0.count, fd) }
            }
        }
        guard sent >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot notify systemd at \(notifySocket)") }
    }
}
