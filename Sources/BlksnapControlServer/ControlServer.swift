import BlksnapABI
import BlksnapControlProtocol
import BlksnapEngine
import CBlksnapABI
import CBlksnapLinux
import FoundationEssentials
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// blksnapd's control socket: the preload shim's way into the dispatcher,
/// and blksnapctl's. Root only: the socket is mode 0600, and each peer is
/// checked with SO_PEERCRED, so a non-root peer that somehow connects gets
/// EACCES for every request.
///
/// One thread per connection: requests on a connection are answered in
/// order, and a WAIT_EVENT that sleeps holds up only its own connection
/// (the tools open one descriptor per object).
public final class ControlServer: @unchecked Sendable {
    public let path: String
    let control: Control
    let logger: Logger
    private let lock = Lock()
    private var listener: Int32 = -1
    private var connections: Set<Int32> = []
    private var stopped = false
    /// The picture STATUS sends; the daemon adds what only it knows.
    public var status: (@Sendable () -> DaemonStatus)?
    /// Answers ATTACH and DETACH (the data plane); nil refuses them.
    public var deviceRequests: (@Sendable (UInt32, [UInt8]) -> (Int32, [UInt8]))?
    /// Who may send requests: root. Tests swap it to play a stranger.
    var admits: @Sendable (Int32, PeerCredentials?) -> Bool = { PeerPolicy.rootOnly.allows($0, $1) }

    /// Connections served at once; one more is closed as it arrives. Each
    /// costs a thread and at most one request's bytes (the request is read
    /// as it comes, so a header that announces more than is sent costs
    /// only what was sent).
    public var maxConnections = 256
    /// Payload caps for the requests that carry JSON: a path and a size
    /// fit many times over; anything near them is not blksnapctl talking.
    static let maxDeviceRequestBytes: UInt32 = 64 << 10
    static let maxStatusRequestBytes: UInt32 = 0

    public init(path: String, control: Control, logger: Logger) {
        self.path = path
        self.control = control
        self.logger = logger
    }

    /// Binds, restricts to root, listens, and serves in the background.
    public func start() throws(BlksnapError) {
        // A stale socket from a daemon that died is ours to replace: the
        // state directory's lock says no other daemon is alive.
        let fd: Int32
        do { fd = try UnixSocket.listen(path: path, backlog: 64) } catch {
            throw BlksnapError(error.errno, "control socket: \(error.message)")
        }
        lock.withLock { listener = fd }
        logger.info("blksnapd: control socket \(path) (mode 0600, root only)")
        startThread { [self] in acceptLoop(fd) }
    }

    /// Stops accepting, ends every connection and removes the socket.
    public func stop() {
        // Under the lock: a connection thread removes its descriptor here
        // before closing it, so no number we shut down can have been reused.
        lock.withLock {
            stopped = true
            if listener >= 0 {
                // The accept loop closes it once woken, so its number stays
                // ours until nothing can use it.
                shutdown(listener, Int32(SHUT_RDWR))
                unlink(path)
                listener = -1
            }
            for c in connections { shutdown(c, Int32(SHUT_RDWR)) }
        }
    }

    private func acceptLoop(_ fd: Int32) {
        while true {
            let c = blksnap_accept_cloexec(fd)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if !lock.withLock({ stopped }) {
                    logger.error("blksnapd: accept on the control socket failed: \(Errno(rawValue: errno))")
                }
                close(fd)
                return
            }
            let keep = lock.withLock { () -> Bool? in
                guard !stopped else { return nil }
                guard connections.count < maxConnections else { return false }
                connections.insert(c)
                return true
            }
            guard let keep else {
                close(c)
                close(fd)
                return
            }
            guard keep else {
                logger.warning("blksnapd: \(maxConnections) control connections are open; refusing one more")
                close(c)
                continue
            }
            startThread { [self] in
                serve(c)
                lock.withLock { _ = connections.remove(c) }
                close(c)
            }
        }
    }

    /// Answers requests until the peer hangs up.
    func serve(_ fd: Int32) {
        let cred = PeerCredentials.of(fd)
        let allowed = admits(fd, cred)
        let who = cred?.description ?? "an unknown peer"
        while let request = SocketIO.read(fd, as: blksnap_control_request.self, zero: blksnap_control_request()) {
            guard request.magic == BLKSNAP_CONTROL_MAGIC else {
                logger.error("blksnapd: bad magic on the control socket from \(who); closing")
                return
            }
            // A stranger is answered at its first header, before a byte of
            // what it announces is read, and then hung up on.
            guard allowed else {
                logger.warning("blksnapd: refusing a control request from \(who): root only (EACCES)")
                _ = SocketIO.writeAll(fd, Self.reply(result: -Errno.permissionDenied.rawValue))
                return
            }
            guard let reply = answer(fd, request) else { return }
            guard SocketIO.writeAll(fd, reply) else { return }
        }
    }

    /// Reads the rest of one request and builds its reply; nil when the
    /// stream is broken or malformed.
    private func answer(_ fd: Int32, _ request: blksnap_control_request) -> [[UInt8]]? {
        switch request.type {
        case BLKSNAP_CONTROL_IOCTL.rawValue:
            var regions: [ShippedMemory.Region] = []
            var total = 0
            for _ in 0..<request.region_count {
                guard let header = SocketIO.read(fd, as: blksnap_control_region.self, zero: blksnap_control_region()) else { return nil }
                let carries = header.flow & BLKSNAP_ABI_IN.rawValue != 0
                total += Int(header.length)
                guard total <= Int(BLKSNAP_CONTROL_MAX_BYTES) else {
                    logger.error("blksnapd: control request over \(BLKSNAP_CONTROL_MAX_BYTES) bytes; closing")
                    return nil
                }
                let bytes = carries ? SocketIO.readBytes(fd, count: Int(header.length)) : []
                guard let bytes else { return nil }
                regions.append(.init(address: header.address, flow: header.flow, length: Int(header.length), bytes: bytes))
            }
            let result = control.dispatch(command: request.command, argument: request.argument,
                                          memory: ShippedMemory(regions: regions))
            return Self.reply(result: result.kernelResult, writes: result.writes)
        default:
            let cap = switch request.type {
            case BLKSNAP_CONTROL_STATUS.rawValue: Self.maxStatusRequestBytes
            case BLKSNAP_CONTROL_ATTACH.rawValue, BLKSNAP_CONTROL_DETACH.rawValue: Self.maxDeviceRequestBytes
            default: BLKSNAP_CONTROL_MAX_BYTES
            }
            guard request.payload_length <= cap else {
                logger.error("blksnapd: control request type \(request.type) announces \(request.payload_length) bytes, over its \(cap); closing")
                return nil
            }
            guard let payload = SocketIO.readBytes(fd, count: Int(request.payload_length)) else { return nil }
            switch request.type {
            case BLKSNAP_CONTROL_STATUS.rawValue:
                let picture = status?() ?? DaemonStatus(engine: control.engine.status())
                let json = (try? JSONEncoder().encode(picture)).map { Array($0) } ?? []
                return Self.reply(result: 0, payload: json)
            case BLKSNAP_CONTROL_ATTACH.rawValue, BLKSNAP_CONTROL_DETACH.rawValue:
                guard let deviceRequests else {
                    return Self.reply(result: -Errno.notSupported.rawValue,
                                      payload: Array("this blksnapd routes no devices".utf8))
                }
                let (result, out) = deviceRequests(request.type, payload)
                return Self.reply(result: result, payload: out)
            default:
                logger.error("blksnapd: unknown control request type \(request.type)")
                return Self.reply(result: -Errno.invalidArgument.rawValue)
            }
        }
    }

    static func reply(result: Int32, writes: [CallerWrite] = [], payload: [UInt8] = []) -> [[UInt8]] {
        ControlFrame.reply(result: result, writes: writes.map { .init(address: $0.address, bytes: $0.bytes) }, payload: payload)
    }
}
