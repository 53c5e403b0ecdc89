import BlksnapEngine
import CBlksnapLinux
import SystemPackage
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The keeper: a small process of blksnapd's own (the same binary, started
/// with `--keep-fuse-connections`) that holds duplicates of blksnapd's
/// FUSE connections where no systemd does, so that a blksnapd killed with
/// -9 leaves its devices waiting instead of failing, and hands them to the
/// next blksnapd over a Unix socket (SCM_RIGHTS; root only, SO_PEERCRED).
///
/// It runs in its own session, so a kill of blksnapd's process group does
/// not reach it, and it never reads or writes a connection: it only polls
/// them for the error that says a connection is gone (unmounted, aborted).
/// It ends when a clean stop drops what it holds, or when nothing is held
/// and no blksnapd is connected.
///
/// Messages (SOCK_SEQPACKET, one line each): `HOLD name` with a descriptor,
/// `TAKE` (answered by `FD name` with a descriptor per connection, then
/// `END`), `DROP name` (answered `OK`).
public enum FuseConnectionKeeper {
    /// The hidden blksnapd option that runs the keeper on descriptor 3.
    public static let option = "--keep-fuse-connections"
    static let maxMessage = 512

    /// The keeper's main loop on the listening socket `listening`; never returns.
    public static func serve(listening: Int32, logger: Logger) -> Never {
        signal(SIGPIPE, SIG_IGN)
        var held: [String: Int32] = [:]
        var clients: [Int32] = []
        while true {
            var fds = [pollfd(fd: listening, events: Int16(POLLIN), revents: 0)]
            fds += clients.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            // Events 0: only POLLERR, which /dev/fuse reports once its connection is aborted.
            let heldNames = Array(held.keys)
            fds += heldNames.map { pollfd(fd: held[$0]!, events: 0, revents: 0) }
            guard poll(&fds, nfds_t(fds.count), -1) >= 0 else {
                if errno == EINTR { continue }
                logger.critical("blksnapd keeper: poll: \(String(cString: strerror(errno)))")
                exit(1)
            }
            var changed = false
            for (i, name) in heldNames.enumerated() where fds[1 + clients.count + i].revents != 0 {
                close(held.removeValue(forKey: name)!)
                logger.info("blksnapd keeper: the FUSE connection \(name) is gone")
                changed = true
            }
            for (i, client) in clients.enumerated().reversed() where fds[1 + i].revents != 0 {
                if !answer(client, &held, logger: logger) {
                    close(client)
                    clients.remove(at: i)
                    changed = true
                }
            }
            if fds[0].revents & Int16(POLLIN) != 0 {
                let client = blksnap_accept_cloexec(listening)
                if client >= 0 {
                    var pid: pid_t = 0, uid: uid_t = 0, gid: gid_t = 0
                    if blksnap_peer_credentials(client, &pid, &uid, &gid) == 0, uid == 0 || uid == geteuid() {
                        clients.append(client)
                    } else {
                        logger.warning("blksnapd keeper: refused a peer (pid \(pid), uid \(uid)): root only")
                        close(client)
                    }
                }
            }
            if changed && held.isEmpty && clients.isEmpty {
                logger.info("blksnapd keeper: nothing left to keep; ending")
                exit(0)
            }
        }
    }

    /// One message of a client; false when the client is gone.
    private static func answer(_ client: Int32, _ held: inout [String: Int32], logger: Logger) -> Bool {
        var buffer = [UInt8](repeating: 0, count: maxMessage)
        var fd: Int32 = -1
        let n = buffer.withUnsafeMutableBytes { blksnap_recv_with_fd(client, $0.baseAddress, $0.count, &fd) }
        guard n > 0 else { return false }
        let text = String(decoding: buffer[0..<n], as: UTF8.self)
        let word = text.prefix { $0 != " " }
        let name = text.count > word.count ? String(text.dropFirst(word.count + 1)) : ""
        switch word {
        case "HOLD" where fd >= 0 && !name.isEmpty:
            if let old = held.updateValue(fd, forKey: name) { close(old) }
            logger.info("blksnapd keeper: holding the FUSE connection \(name)")
            return send(client, "OK")
        case "TAKE":
            for (name, fd) in held.sorted(by: { $0.key < $1.key }) where !send(client, "FD \(name)", fd: fd) { return false }
            return send(client, "END")
        case "DROP":
            if let old = held.removeValue(forKey: name) { close(old) }
            return send(client, "OK")
        default:
            if fd >= 0 { close(fd) }
            return send(client, "ERR")
        }
    }

    @discardableResult
    static func send(_ sock: Int32, _ text: String, fd: Int32 = -1) -> Bool {
        Array(text.utf8).withUnsafeBytes { blksnap_send_with_fd(sock, nil, 0, $0.baseAddress, $0.count, fd) } >= 0
    }

    static func receive(_ sock: Int32) -> (String, Int32)? {
        var buffer = [UInt8](repeating: 0, count: maxMessage)
        var fd: Int32 = -1
        let n = buffer.withUnsafeMutableBytes { blksnap_recv_with_fd(sock, $0.baseAddress, $0.count, &fd) }
        guard n > 0 else { return nil }
        return (String(decoding: buffer[0..<n], as: UTF8.self), fd)
    }
}

/// blksnapd's side of the keeper: one connection for blksnapd's life,
/// made at the first use; a keeper is started when none answers.
final class KeeperClient: ConnectionStore, @unchecked Sendable {
    var kind: String { "the keeper process" }
    let socketPath: String
    let logger: Logger
    private let lock = Lock()
    private var sock: Int32 = -1
    private var child: pid_t = 0

    init(socketPath: String, logger: Logger) {
        self.socketPath = socketPath
        self.logger = logger
    }

    private func address() -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socketPath.utf8)
        guard path.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
        }
        return address
    }

    private func connectKeeper() -> Int32 {
        guard var address = address() else { return -1 }
        let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return -1 }
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
        if ok { return fd }
        Glibc.close(fd)
        return -1
    }

    /// Starts a keeper listening at `socketPath`: the socket is bound here,
    /// before the keeper runs, so a connect right after cannot miss it.
    private func spawnKeeper() throws(BlksnapError) {
        guard var address = address() else { throw BlksnapError(.fileNameTooLong, "\(socketPath) is too long for a socket") }
        let listening = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listening >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot make the keeper's socket") }
        defer { Glibc.close(listening) }
        unlink(socketPath)
        let mask = umask(0o077)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listening, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(mask)
        guard bound == 0, listen(listening, 8) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot listen at \(socketPath)")
        }
        var exe = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/exe", &exe, exe.count - 1)
        guard length > 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot find blksnapd's own binary") }
        let path = String(decoding: exe[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup("blksnapd"), strdup(FuseConnectionKeeper.option), nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        guard blksnap_spawn_detached(path, argv, listening, &pid) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot start the keeper (\(path))")
        }
        child = pid
        logger.info("blksnapd: started the keeper of the FUSE connections (pid \(pid), \(socketPath))")
    }

    /// The connection to the keeper, starting one when `start` and none answers.
    private func connection(start: Bool) -> Int32 {
        if sock >= 0 { return sock }
        sock = connectKeeper()
        if sock < 0 && start {
            do throws(BlksnapError) {
                try spawnKeeper()
                sock = connectKeeper()
            } catch {
                logger.error("blksnapd: \(error)")
            }
        }
        return sock
    }

    func take(prefix: String) -> [KeptConnection] {
        lock.withLock {
            let sock = connection(start: false)
            guard sock >= 0, FuseConnectionKeeper.send(sock, "TAKE") else { return [] }
            var kept: [KeptConnection] = []
            while let (text, fd) = FuseConnectionKeeper.receive(sock) {
                if text.hasPrefix("FD "), fd >= 0 {
                    // The keeper still holds the others for their taker.
                    let name = String(text.dropFirst(3))
                    if name.hasPrefix(prefix) { kept.append(KeptConnection(name: name, fd: fd)) } else { Glibc.close(fd) }
                } else {
                    if fd >= 0 { Glibc.close(fd) }
                    break
                }
            }
            return kept
        }
    }

    func hold(_ name: String, fd: Int32) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            let sock = connection(start: true)
            guard sock >= 0, FuseConnectionKeeper.send(sock, "HOLD \(name)", fd: fd),
                  FuseConnectionKeeper.receive(sock)?.0 == "OK" else {
                throw BlksnapError(.ioError, "the keeper at \(socketPath) did not take the FUSE connection \(name)")
            }
        }
    }

    func drop(_ name: String) {
        lock.withLock {
            let sock = connection(start: false)
            guard sock >= 0, FuseConnectionKeeper.send(sock, "DROP \(name)") else { return }
            _ = FuseConnectionKeeper.receive(sock)
        }
    }

    /// Disconnects: a keeper holding nothing ends then. One this blksnapd
    /// started is its child and is waited for.
    func close() {
        lock.withLock {
            if sock >= 0 { Glibc.close(sock) }
            sock = -1
            if child > 0 {
                var status: Int32 = 0
                for _ in 0..<50 where waitpid(child, &status, WNOHANG) == 0 { usleep(20_000) }
                child = 0
            }
        }
    }
}
