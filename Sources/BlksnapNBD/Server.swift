import BlksnapControlProtocol
import BlksnapEngine
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The NBD server: listening sockets, and a `Connection` on its own thread
/// for each client (nbdkit's `sockets.c` and `server/main.c`).
///
/// A Unix socket is the way in: it is created with mode 0600 (0660 with a
/// group), and each client is checked with SO_PEERCRED against `policy`
/// before the greeting, so a socket whose mode was loosened still serves
/// no one else. TCP is opt-in, binds 127.0.0.1 unless told otherwise, and
/// has no such check: NBD without TLS trusts whoever can reach the port.
///
/// `lock` guards the listener list, the connection registry and
/// `stopping`; `threadsGone` is signalled each time an accept or
/// connection thread ends, which `stop` waits for.
public final class Server: @unchecked Sendable {
    public let logger: Logger
    public let limits: ConnectionLimits
    private let exports: ExportTable
    private let lock = Lock()
    private let threadsGone = Condition()
    private var listeners: [Listener] = []
    /// Who may connect over a Unix socket; tests swap `admits` to play a
    /// stranger.
    public var policy = PeerPolicy.rootOnly
    var admits: (@Sendable (Int32, PeerCredentials?) -> Bool)?
    private var connections: [Int: SocketStream] = [:]
    private var clients = 0
    private var nextConnection = 0
    private var threads = 0
    /// Connections `end(connections:)` is ending: not lost, so no onLost.
    private var ending = Set<Int>()
    private var stopping = false
    /// Written once by `stop`, never drained: every accept thread polls it
    /// alongside its socket and sees it readable from then on.
    private let wakeRead: Int32
    private let wakeWrite: Int32

    private struct Listener {
        var fd: Int32
        var unixPath: String?
        var description: String
    }

    /// Export names must be distinct; the first export is also the
    /// default one, which clients get by asking for the empty name. A
    /// server may start with none and be given them later.
    public init(exports: [Export], limits: ConnectionLimits = ConnectionLimits(),
                logger: Logger = Logger(label: "blksnap-nbd")) throws(BlksnapError) {
        guard Set(exports.map(\.name)).count == exports.count else {
            throw BlksnapError(.invalidArgument, "two exports share a name")
        }
        for e in exports where e.name.utf8.count > NBD.maxString || e.name.utf8.contains(0) {
            throw BlksnapError(.invalidArgument, "export name \"\(e.name)\" is not a valid NBD string")
        }
        self.exports = ExportTable(exports: exports)
        self.limits = limits
        self.logger = logger
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw Self.error("pipe") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        wakeRead = fds[0]
        wakeWrite = fds[1]
    }

    deinit {
        stop()
        Glibc.close(wakeRead)
        Glibc.close(wakeWrite)
    }

    public var exportNames: [String] { exports.exports.map(\.name) }

    /// Offers one more export to new connections.
    public func add(_ export: Export) throws(BlksnapError) {
        guard export.name.utf8.count <= NBD.maxString, !export.name.utf8.contains(0) else {
            throw BlksnapError(.invalidArgument, "export name \"\(export.name)\" is not a valid NBD string")
        }
        try exports.add(export)
    }

    /// Withdraws an export from new connections; those using it fail their
    /// next request as the device itself does once it is gone.
    public func remove(exportNamed name: String) { exports.remove(name) }

    /// Clients connected now (those still negotiating included).
    public var connectionCount: Int { lock.withLock { connections.count } }

    private static func error(_ call: String, _ context: String = "") -> BlksnapError {
        BlksnapError(Errno(rawValue: errno), "\(call)\(context.isEmpty ? "" : " \(context)") failed")
    }

    // MARK: listening

    /// Listens on a Unix socket at `path`. A stale socket left at the path
    /// is replaced; any other file there is an error (EEXIST). With
    /// `group`, the socket is that group's too (mode 0660).
    public func listen(unixSocket path: String, group: gid_t? = nil) throws(BlksnapError) {
        let fd: Int32
        do { fd = try UnixSocket.listen(path: path, group: group) } catch { throw BlksnapError(error.errno, error.message) }
        try start(Listener(fd: fd, unixPath: path, description: "unix:\(path)"))
    }

    /// Listens on TCP; returns the port (useful with port 0). Loopback by
    /// default: NBD without TLS must not face a network by accident.
    @discardableResult
    public func listen(tcpHost host: String = "127.0.0.1", port: UInt16) throws(BlksnapError) -> UInt16 {
        var hints = addrinfo()
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let info = list else {
            throw BlksnapError(.invalidArgument, "cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        let fd = socket(info.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Self.error("socket") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0,
              Glibc.listen(fd, SOMAXCONN) == 0 else {
            let e = Self.error("bind/listen", "\(host):\(port)")
            Glibc.close(fd)
            throw e
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let actual = withUnsafeMutablePointer(to: &storage) { p -> UInt16 in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &length) }
            if p.pointee.ss_family == sa_family_t(AF_INET6) {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        try start(Listener(fd: fd, unixPath: nil, description: "tcp:\(host):\(actual)"))
        return actual
    }

    private func start(_ listener: Listener) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard !stopping else {
                Glibc.close(listener.fd)
                throw BlksnapError(.socketShutdown, "the server is stopping")
            }
            listeners.append(listener)
            threads += 1
        }
        logger.info("nbd-server: listening on \(listener.description), exports \(exportNames)")
        startThread { [self] in acceptLoop(listener) }
    }

    private func acceptLoop(_ listener: Listener) {
        defer {
            Glibc.close(listener.fd)
            if let path = listener.unixPath { unlink(path) }
            threadDone()
        }
        var fds = [pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 {
                if errno == EINTR { continue }
                logger.error("nbd-server: poll on \(listener.description) failed: \(Errno(rawValue: errno))")
                return
            }
            if fds[1].revents != 0 { return }
            guard fds[0].revents != 0 else { continue }
            let fd = accept(listener.fd, nil, nil)
            if fd < 0 {
                switch errno {
                case EINTR, EAGAIN, ECONNABORTED, EPROTO:
                    continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    // Out of descriptors: back off rather than spin; a
                    // client that leaves frees one.
                    logger.warning("nbd-server: accept on \(listener.description): \(Errno(rawValue: errno))")
                    usleep(100_000)
                    continue
                default:
                    logger.error("nbd-server: accept on \(listener.description) failed: \(Errno(rawValue: errno))")
                    return
                }
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            if listener.unixPath != nil {
                let peer = PeerCredentials.of(fd)
                let allowed = admits?(fd, peer) ?? policy.allows(fd, peer)
                guard allowed else {
                    logger.warning("nbd-server: refusing \(peer?.description ?? "an unknown peer") on \(listener.description): \(policy.description) may connect")
                    Glibc.close(fd)
                    continue
                }
            } else {
                // Replies are whole messages already; Nagle would only
                // delay the small ones behind a pending ACK.
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            serve(connectedSocket: fd)
        }
    }

    /// Serves a client on a socket that is already connected, such as one
    /// end of a socketpair or a descriptor inherited from a supervisor.
    /// The server owns and closes `fd` from now on.
    public func serve(connectedSocket fd: Int32) {
        serve(fd, preNegotiated: nil, client: true)
    }

    /// Serves the kernel's nbd driver on one end of a socketpair: it skips
    /// the handshake and speaks simple replies, so `export` is fixed here.
    /// `onLost` runs when the connection ends while the server still runs:
    /// the kernel shut its end (a request outlived its timeout, or the
    /// device was disconnected). Returns the connection's number for
    /// `end(connections:)`; nil once the server is stopping.
    @discardableResult
    public func serveKernel(connectedSocket fd: Int32, export: Export, onLost: (@Sendable () -> Void)? = nil) -> Int? {
        serve(fd, preNegotiated: Negotiated(export: export, structuredReplies: false, metaContexts: [],
                                           transmissionFlags: export.transmissionFlags(structuredReplies: false)),
              onLost: onLost)
    }

    @discardableResult
    private func serve(_ fd: Int32, preNegotiated: Negotiated?, client: Bool = false,
                       onLost: (@Sendable () -> Void)? = nil) -> Int? {
        let stream = SocketStream(fd: fd)
        let id: Int? = lock.withLock {
            guard !stopping, !client || clients < limits.maxConnections else { return nil }
            if client { clients += 1 }
            nextConnection += 1
            connections[nextConnection] = stream
            threads += 1
            return nextConnection
        }
        guard let id else {
            if client, !lock.withLock({ stopping }) {
                logger.warning("nbd-server: \(limits.maxConnections) clients are connected; refusing one more")
            }
            stream.close()
            return nil
        }
        startThread { [self] in
            Connection(id: id, stream: stream, exports: exports, limits: limits, logger: logger)
                .run(preNegotiated: preNegotiated)
            stream.close()
            let stopped = lock.withLock {
                connections[id] = nil
                if client { clients -= 1 }
                return stopping || ending.remove(id) != nil
            }
            if !stopped { onLost?() }
            threadDone()
        }
        return id
    }

    /// Ends the connections `ids` (numbers serveKernel gave) and returns
    /// once their threads are gone, so nothing they read reaches a device
    /// after this; their replies are dropped and their `onLost` does not
    /// run. The kernel sees its sockets close, as after a crash of
    /// blksnapd, and sends those requests again on the next connection.
    public func end(connections ids: [Int]) {
        let streams = lock.withLock { () -> [SocketStream] in
            let open = ids.filter { connections[$0] != nil }
            ending.formUnion(open)
            return open.compactMap { connections[$0] }
        }
        for s in streams { s.shutdown() }
        lock.withLock {
            while ids.contains(where: { connections[$0] != nil }) { threadsGone.wait(lock) }
        }
    }

    private func threadDone() {
        lock.withLock {
            threads -= 1
            threadsGone.broadcast()
        }
    }

    // MARK: stopping

    /// Stops listening, disconnects every client and returns once every
    /// thread of the server is gone. Requests already read still complete
    /// on the device; their replies are dropped. Safe to call twice.
    public func stop() {
        let (first, streams): (Bool, [SocketStream]) = lock.withLock {
            let first = !stopping
            if first {
                stopping = true
                var byte: UInt8 = 1
                _ = write(wakeWrite, &byte, 1)
            }
            return (first, Array(connections.values))
        }
        for s in streams { s.shutdown() }
        lock.withLock {
            while threads > 0 { threadsGone.wait(lock) }
            listeners = []
        }
        if first { logger.info("nbd-server: stopped") }
    }
}
